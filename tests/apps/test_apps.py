"""The absl apps fail on bad input with one clear line (subprocess, as a user runs them)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import onednn_available

pytestmark = pytest.mark.slow   # subprocesses / training: the fast tier skips it

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_train_population_missing_data(tmp_path):
  r = _run('experiments.train_population', '--dataset=npz', f'--data_dir={tmp_path}/x',
           f'--workdir={tmp_path}/wd', '--num_tasks=2', '--runs_per_task=1')
  assert r.returncode != 0
  assert f'error: flag --data_dir={tmp_path}/x: not found' in r.stderr and 'Traceback' not in r.stderr


def test_train_population_too_many_tasks(tmp_path, data_dir):
  r = _run('experiments.train_population', '--dataset=npz', '--num_tasks=60',
           f'--workdir={tmp_path}/wd')
  assert r.returncode != 0 and '--num_tasks=60: must be an integer in [1, 50]' in r.stderr


def test_train_population_bad_flags_fail_before_training(tmp_path):
  """Bad flags of train_population: each a one-line error naming the flag, before any compile."""
  base = ['experiments.train_population', '--dataset=npz', '--task_ids=0', '--epochs=2',
          '--lr_boundaries=1', f'--workdir={tmp_path}/wd']
  for flag, says in (('--batch_size=0', '--batch_size=0: must be an integer >= 1'),
                     ('--epochs=-1', '--epochs=-1: must be an integer >= 1'),
                     ('--runs_per_task=0', '--runs_per_task=0: must be an integer >= 1'),
                     ('--num_cpu_devices=0', '--num_cpu_devices'),
                     ('--learning_rate=nan', '--learning_rate=nan: must be a finite number > 0'),
                     ('--task_ids=60', 'task 60 is outside 0-49'),
                     ('--lr_boundaries=5', 'epoch 5 is not inside the 2 epochs')):
    r = _run(*base, flag)
    assert r.returncode != 0 and 'Traceback' not in r.stderr, (flag, r.stderr[-1500:])
    assert says in r.stderr.strip().splitlines()[-1] or says in r.stderr, (flag, r.stderr[-500:])
  assert not os.path.exists(tmp_path / 'wd')       # nothing written


def test_lps_main_bad_model_sets(tmp_path):
  """What lps_main's loading refuses, each in one line (in-process: lps_modes.load is what the
  app calls; bad flag values are the flag sweep's); then one truncated file through the app."""
  from experiments import lps_modes
  from lps_jax.training import modelset
  from lps_jax.align.fit import SecondOrderConfig
  kernels = os.path.join(ROOT, 'results', 'test_split_gpu', 'modelset', 'first_layer_kernels.npz')
  src = np.load(kernels)
  arrays = {k: src[k] for k in src.files}
  arrays['kernel/conv1'] = arrays['kernel/conv1'].copy()
  arrays['kernel/conv1'][3, 0, 0, 0, 0] = np.nan
  np.savez(tmp_path / 'nan.npz', **arrays)
  table = lps_modes.MODES['classification']
  cases = [(str(tmp_path / 'nan.npz'), SecondOrderConfig(), ['lps'], r'NaN/Inf weights in models \[3\]'),
           (kernels, SecondOrderConfig(layer_weights=(0.0, 1.0)), ['lps'],
            r"no kernels for \['stage1_block1/conv1'\]"),
           (kernels, SecondOrderConfig(), ['lps_fusion'], r"\(method 'lps_fusion'\)"),
           (kernels, SecondOrderConfig(), ['lps', 'wn_probe'], 'wn_probe read every layer.*modelset_cpu')]
  for path, config, names, message in cases:
    with pytest.raises(modelset.ModelSetError, match=message):
      lps_modes.load(table, path, config, names, None)
  blob = open(kernels, 'rb').read()
  (tmp_path / 'cut.npz').write_bytes(blob[:len(blob) // 2])   # a truncated download
  r = _run('experiments.lps_main', f'--modelset={tmp_path}/cut.npz')
  assert r.returncode != 0 and 'not a readable kernels file' in r.stderr
  assert 'Traceback' not in r.stderr
  assert [l for l in r.stderr.splitlines() if 'error' in l.lower()] == [r.stderr.splitlines()[-1]]


def test_branches_mode_reads_the_layers_a_kernels_file_holds(tmp_path):
  """The committed ModelSet500 slices keep stage-1 kernels (layers 1-7): merged with them,
  Fig. 3b's branches 1-7 run from the file; deeper branches ask for the folder."""
  from experiments import lps_modes
  from lps_jax.zoo import manifest
  from lps_jax.training import modelset
  from lps_jax.align.fit import SecondOrderConfig
  path = str(tmp_path / 'stage1.npz')
  manifest.merge(os.path.join(ROOT, 'results', 'modelset500'), path, stage1=True)
  kernels, task_id, _, branches = lps_modes.load(lps_modes.MODES['branches'], path,
                                                 SecondOrderConfig(), ['lps'], None)
  assert branches == list(range(1, 8)) and len(kernels) == 7
  assert kernels[6].shape[1:] == (3, 3, 16, 16) and kernels[6].dtype == np.float32
  with pytest.raises(modelset.ModelSetError, match=r'holds the kernels of branches \[1, 2, 3, '
                                                   r'4, 5, 6, 7\], not \[8\]'):
    lps_modes.load(lps_modes.MODES['branches'], path, SecondOrderConfig(), ['lps'], [1, 8])


def test_benchmark_runs_and_writes_json(tmp_path):
  out = tmp_path / 'b.json'
  impls = ['lax'] + (['onednn', 'onednn/onednn'] if onednn_available() else [])
  r = _run('experiments.benchmark', '--suites=align,convs,norms,breakdown', '--align_sizes=3',
           '--align_filters=2', '--align_chunk=2', '--matmul_size=64', '--num_cpu_devices=1',
           '--batch_size=2', f'--breakdown_impls={",".join(impls)}', f'--out={out}')
  assert r.returncode == 0, r.stderr[-2000:]
  import json
  res = json.load(open(out))
  assert res['matmul']['gflops'] > 0 and len(res['align']) == 4
  assert all(row['fwd_models_per_s'] > 0 and row['models'] == 3 for row in res['align'])
  assert '| models | G | layer shape |' in r.stdout
  # The convs suite checked the shifted-matmul weight gradient against XLA's before timing.
  convs = res['convs']
  assert [row['count'] for row in convs['rows']] == [1, 6, 5, 5]
  assert all(v > 0 for row in convs['rows'] for v in row['xla'].values())
  assert convs['per_model_step_ms']['xla']['weight grad'] > 0
  if 'onednn' in impls:   # beside XLA, each pass checked equal to XLA's first
    assert convs['per_model_step_ms']['onednn']['weight grad'] > 0
  norms = res['norms']
  assert sum(row['count'] for row in norms['rows']) == 21       # every batch norm of ResNet-20
  assert all(v > 0 for row in norms['rows'] for v in row['xla'].values())
  assert ('onednn' in norms['per_model_step_ms']) == ('onednn' in impls)
  for impl in impls:
    parts = res['breakdown']['rows'][impl]
    assert all(parts[k] > 0 for k in ('step', 'convs (all passes)', 'optimizer update',
                                      'data (gather + augment)',
                                      'batch norms + ReLU / add (all passes)'))
