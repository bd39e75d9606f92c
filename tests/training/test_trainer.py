"""The chunked trainer: learns, compiles once, resumes exactly (after hooks and after real
SIGKILLs), refuses what would mix runs, and fails clearly."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lps_jax.training import data, modelset, popmap, resnet, trainer, workdir
from lps_jax.training.config import ExecutionConfig, PopulationConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = resnet.ResNetConfig((1, 1, 1), (4, 8, 8))


@pytest.fixture(scope='module')
def splits(data_dir):
  return data.load('npz', data_dir, classes=data.task_classes(range(5)))


def _config(epochs=2, tasks=(0, 1), runs=2, lr=0.1, batch_size=250):
  return PopulationConfig(task_ids=tasks, runs_per_task=runs, dataset='npz', model=TINY,
                          train=TrainConfig(epochs=epochs, batch_size=batch_size,
                                            learning_rate=lr, lr_boundaries=(max(1, epochs - 1),)))


@pytest.mark.slow
def test_trained_population_beats_chance_and_compiles_once(splits, tmp_path):
  cfg = _config(epochs=3, tasks=(1, 4), batch_size=100)
  ex = ExecutionConfig(models_per_chunk=2, eval_every=3)       # the CPU default: loop, split
  tr = trainer.PopulationTrainer(cfg, ex, *splits)
  ms = tr.train(str(tmp_path), progress=False)
  assert len(ms) == 4 and ms.task_id.tolist() == [1, 1, 4, 4] and ms.run.tolist() == [0, 1, 0, 1]
  # 200 held-out test-split images per model, chance = 0.5.
  assert ms.heldout_accuracy.mean() > 0.65, ms.heldout_accuracy
  # 2 chunks x 3 epochs x 10 steps: one forward and one backward program per device.
  forward, backward = tr.step_fn(100).parts
  assert popmap.compiled_count(forward) == popmap.compiled_count(backward) == 2
  loaded = modelset.load(str(tmp_path))
  np.testing.assert_array_equal(loaded.params['conv1']['kernel'], ms.params['conv1']['kernel'])
  np.testing.assert_array_equal(loaded.heldout_accuracy, ms.heldout_accuracy)
  assert loaded.config == cfg.to_json()
  again = trainer.PopulationTrainer(cfg, ex, *splits).train(str(tmp_path), progress=False)
  np.testing.assert_array_equal(again.params['dense']['kernel'], ms.params['dense']['kernel'])


class _Kill(Exception):
  pass


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(splits, tmp_path):
  cfg = _config(epochs=4, tasks=(0, 1, 2), runs=1)
  ex = ExecutionConfig('unroll', 'lax', models_per_chunk=2, num_devices=2, checkpoint_every=1)
  full = trainer.PopulationTrainer(cfg, ex, *splits).train(str(tmp_path / 'a'), progress=False)

  def kill_at(chunk_index, epoch):
    def hook(c, e):
      if (c, e) == (chunk_index, epoch):
        raise _Kill()
    return hook

  wd = str(tmp_path / 'b')
  tr = trainer.PopulationTrainer(cfg, ex, *splits)
  with pytest.raises(_Kill):
    tr.train(wd, progress=False, on_epoch_end=kill_at(0, 2))
  with pytest.raises(_Kill):  # Resumes chunk 0 at epoch 2, finishes it, dies inside chunk 1.
    tr.train(wd, progress=False, on_epoch_end=kill_at(1, 3))
  assert os.path.isdir(workdir.chunk_dir(wd, 0))
  resumed = tr.train(wd, progress=False)
  for a, b in [(resumed.params, full.params), (resumed.batch_stats, full.batch_stats)]:
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  np.testing.assert_array_equal(resumed.heldout_accuracy, full.heldout_accuracy)


@pytest.mark.slow
def test_a_full_disk_keeps_finished_work_and_the_rerun_resumes(splits, tmp_path, monkeypatch):
  """ENOSPC while checkpointing, then while writing a finished chunk: each a TrainingError that
  says so; the last good checkpoint and the finished chunk survive; the rerun finishes equal to
  an uninterrupted run."""
  import errno
  cfg = _config(epochs=3, tasks=(0, 1), runs=1)
  ex = ExecutionConfig(models_per_chunk=1, checkpoint_every=1)
  tr = trainer.PopulationTrainer(cfg, ex, *splits)
  full = tr.train(str(tmp_path / 'a'), progress=False)
  full_disk = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  wd = str(tmp_path / 'b')

  real_manager = workdir.checkpoint_manager
  def failing_manager(path):   # the epoch-2 checkpoint of chunk 0 cannot be written
    mngr = real_manager(path)
    save = mngr.save
    def fail_at_2(step, *a, **k):
      if step == 2:
        raise full_disk
      return save(step, *a, **k)
    mngr.save = fail_at_2
    return mngr
  monkeypatch.setattr(workdir, 'checkpoint_manager', failing_manager)
  with pytest.raises(workdir.TrainingError, match='No space left on device.*rerun the same'):
    tr.train(wd, progress=False)
  assert workdir.checkpoint_manager(workdir.ckpt_dir(wd, 0)).latest_step() == 1
  monkeypatch.setattr(workdir, 'checkpoint_manager', real_manager)

  real_save = modelset.save
  def fail_chunk_1(path, ms):  # chunk 1 trains, but its finished model set cannot be written
    if path == workdir.chunk_dir(wd, 1):
      raise full_disk
    return real_save(path, ms)
  monkeypatch.setattr(modelset, 'save', fail_chunk_1)
  with pytest.raises(workdir.TrainingError, match='No space left on device'):
    tr.train(wd, progress=False)
  monkeypatch.setattr(modelset, 'save', real_save)
  assert os.path.isdir(workdir.chunk_dir(wd, 0)) and not os.path.isdir(workdir.chunk_dir(wd, 1))
  resumed = tr.train(wd, progress=False)
  for a, b in [(resumed.params, full.params), (resumed.batch_stats, full.batch_stats)]:
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------ SIGKILL, as in real life

APP = ['--dataset=npz', '--num_tasks=4', '--runs_per_task=1', '--widths=4,8,8',
       '--blocks_per_stage=1,1,1', '--epochs=4', '--batch_size=250', '--lr_boundaries=2',
       '--models_per_chunk=1', '--checkpoint_every=1', '--eval_every=2', '--noprogress']


def _app(workdir_path):
  return [sys.executable, '-m', 'experiments.train_population', *APP,
          f'--workdir={workdir_path}']


def _run_and_kill(cmd, wd, target, rng, timeout=120, keep_chunks=1):
  """Starts the app; SIGKILLs it when `target` is being written (or at a random moment, but
  no later than when all but `keep_chunks` chunks are finished, so work is left on any machine).
  Returns (killed?, stderr)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  patterns = {'checkpoint': os.path.join(wd, 'ckpt', '*', '*tmp*'),
              'finished chunk': os.path.join(wd, 'chunks', '.*.tmp*'),   # common.files
              'model set': os.path.join(wd, '.modelset.tmp*')}
  deadline = time.monotonic() + timeout
  at = time.monotonic() + rng.uniform(3, 9) if target == 'random' else None
  flags = dict(a[2:].split('=') for a in APP if '=' in a)
  num_chunks = int(flags['num_tasks']) * int(flags['runs_per_task']) // int(flags['models_per_chunk'])
  while proc.poll() is None and time.monotonic() < deadline:
    if at is not None:
      due = time.monotonic() >= at or len(_stamps(wd)) >= num_chunks - keep_chunks
    else:
      due = bool(glob.glob(patterns[target]))
    if due:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True, proc.stderr.read()
    time.sleep(0.001)
  if proc.poll() is None:
    proc.kill()
    raise AssertionError(f'the run neither finished nor reached a {target} write in time')
  return False, proc.stderr.read()


def _stamps(wd):
  return {p: os.path.getmtime(p) for p in glob.glob(os.path.join(wd, 'chunks', '*', 'meta.json'))}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(data_dir, tmp_path):
  ref = str(tmp_path / 'ref')
  r = subprocess.run(_app(ref), cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 0, r.stderr[-3000:]
  wd = str(tmp_path / 'killed')
  rng = np.random.default_rng(0)
  kills, finished_before = [], {}
  # Order matters for a test that cannot flake: the random kill (3-9 s after start, and before
  # the last chunk is finished) comes after the two targeted ones, so at least one chunk, and
  # so a checkpoint write, is still ahead of the fourth run on any machine, however fast.
  for target in ['checkpoint', 'finished chunk', 'random', 'checkpoint', 'model set']:
    killed, err = _run_and_kill(_app(wd), wd, target, rng)
    assert 'Traceback' not in err, err[-3000:]
    if not killed:
      break
    kills.append(target)
    for chunk, stamp in finished_before.items():   # a finished chunk is never rewritten
      assert os.path.getmtime(chunk) == stamp, chunk
    finished_before = _stamps(wd)
  assert len(kills) >= 4, kills
  assert {'checkpoint', 'finished chunk', 'random'} <= set(kills)
  r = subprocess.run(_app(wd), cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 0, r.stderr[-3000:]
  for chunk, stamp in finished_before.items():
    assert os.path.getmtime(chunk) == stamp, chunk
  if finished_before:
    assert 'not retrained' in r.stderr or 'already complete' in r.stderr
  got, want = modelset.load(wd), modelset.load(ref)
  for a, b in [(got.params, want.params), (got.batch_stats, want.batch_stats)]:
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  np.testing.assert_array_equal(got.heldout_accuracy, want.heldout_accuracy)
  assert glob.glob(os.path.join(wd, '**', '*.tmp*'), recursive=True, include_hidden=True) == []


@pytest.mark.slow
def test_bad_runs_are_clear_errors(splits, tmp_path):
  ex = ExecutionConfig('loop', 'lax', 'fused', models_per_chunk=2, checkpoint_every=1)
  with pytest.raises(workdir.TrainingError, match='NaN/Inf training loss'):
    trainer.PopulationTrainer(_config(runs=1, lr=1e30), ex, *splits).train(
        str(tmp_path / 'nan'), progress=False)
  wd = str(tmp_path / 'wd')
  tr = trainer.PopulationTrainer(_config(epochs=3, runs=1), ex, *splits)
  with pytest.raises(_Kill):
    tr.train(wd, progress=False,
             on_epoch_end=lambda c, e: (_ for _ in ()).throw(_Kill()) if e == 2 else None)
  with pytest.raises(workdir.TrainingError, match='different config'):
    trainer.PopulationTrainer(_config(epochs=5, runs=1), ex, *splits).train(wd, progress=False)
  # A corrupt checkpoint: a clear error, and the file is left for the user to inspect.
  for f in glob.glob(os.path.join(wd, 'ckpt', 'chunk_00000', '2', '**', '*'), recursive=True):
    if os.path.isfile(f):
      with open(f, 'wb') as fh:
        fh.write(b'\0garbage')
  with pytest.raises(workdir.TrainingError, match='unreadable or does not match'):
    tr.train(wd, progress=False)
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    f.write('{not json')
  with pytest.raises(workdir.TrainingError, match='not a train_population workdir'):
    tr.train(wd, progress=False)
  with pytest.raises(ValueError, match='batch_size'):
    trainer.PopulationTrainer(_config(batch_size=5000), ex, *splits)


def test_modelset_errors(tmp_path):
  with pytest.raises(modelset.ModelSetError, match='no model set'):
    modelset.load(str(tmp_path))
  d = tmp_path / 'ms'
  d.mkdir()
  (d / 'meta.json').write_text(json.dumps({'num_models': 2}))
  with pytest.raises(modelset.ModelSetError, match='unreadable'):
    modelset.load(str(d))


def test_kernel_files_handed_in(tmp_path):
  """Each way a kernels file can be wrong is one ModelSetError saying what it is."""
  src = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'results',
                     'test_split_gpu', 'modelset', 'first_layer_kernels.npz')
  with np.load(src) as f:
    good = {k: f[k] for k in f.files}
  cases = {'int': dict(good, **{'kernel/conv1': good['kernel/conv1'].astype(np.int32)}),
           'rank': dict(good, **{'kernel/conv1': good['kernel/conv1'][..., 0]}),
           'rows': dict(good, run=good['run'][:-1]),
           'nan': dict(good, **{'kernel/conv1': np.where(np.arange(good['task_id'].size)[
               :, None, None, None, None] == 7, np.nan, good['kernel/conv1'])})}
  says = {'int': 'kernel/conv1 is int32', 'rank': r'is float32 \(500, 3, 3, 3\), not float',
          'rows': 'run has shape', 'nan': r'NaN/Inf weights in models \[7\]'}
  for name, arrays in cases.items():
    np.savez(tmp_path / f'{name}.npz', **arrays)
    with pytest.raises(modelset.ModelSetError, match=says[name]):
      modelset.load_kernels(str(tmp_path / f'{name}.npz'))
  (tmp_path / 'empty.npz').write_bytes(b'')
  with pytest.raises(modelset.ModelSetError, match='not a readable kernels file'):
    modelset.load_kernels(str(tmp_path / 'empty.npz'))
  (tmp_path / 'folder.npz').mkdir()
  with pytest.raises(modelset.ModelSetError, match='not found|not a readable'):
    modelset.load_kernels(str(tmp_path / 'folder.npz'))


@pytest.mark.slow
def test_one_run_per_workdir(splits, tmp_path):
  wd = str(tmp_path / 'wd')
  with workdir.exclusive(wd):                      # a run holds it (here: this test)
    with pytest.raises(workdir.TrainingError, match=r'in use by another run \(pid \d+ on '):
      trainer.PopulationTrainer(_config(runs=1), ExecutionConfig(models_per_chunk=2),
                                *splits).train(wd, progress=False)
    r = subprocess.run([sys.executable, '-m', 'experiments.train_population', '--dataset=npz',
                        '--task_ids=0', '--runs_per_task=1', f'--workdir={wd}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert f'pid {os.getpid()}' in r.stderr.strip().splitlines()[-1]
  assert os.listdir(wd) == ['.lock']               # the refused runs wrote nothing
  # A holder killed with SIGKILL leaves the file, not the lock: the rerun goes ahead.
  holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from lps_jax.training '
                             'import workdir\nwith workdir.exclusive(sys.argv[1]): print(1, flush=True); '
                             'time.sleep(600)', wd], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == '1'
  with pytest.raises(workdir.TrainingError, match=f'pid {holder.pid} '):
    with workdir.exclusive(wd):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir.exclusive(wd):
    assert f'pid {os.getpid()} ' in open(os.path.join(wd, '.lock')).read()
