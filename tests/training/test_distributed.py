"""Sharding the population over (simulated) devices and processes, end to end.

Each run is `python -m experiments.train_population` in a subprocess, because the number of
simulated CPU devices (--num_cpu_devices) is fixed when a process starts. Tiny population:
2 tasks x 4 runs of a 7-conv-layer ResNet, 2 epochs of 4 steps on the real train split.
"""
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lps_jax.training import modelset

pytestmark = pytest.mark.slow   # subprocesses / training: the fast tier skips it

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ['--dataset=npz', '--num_tasks=2', '--runs_per_task=4', '--widths=4,8,8',
        '--blocks_per_stage=1,1,1', '--epochs=2', '--batch_size=250', '--lr_boundaries=1',
        '--models_per_chunk=8', '--checkpoint_every=1', '--eval_every=1', '--noprogress',
        # oneDNN's rounding depends on its thread count, whose default follows the device count
        # (cores / devices): one count for every run, so only the devices differ.
        '--conv_threads=1']


def _train(workdir, *args, timeout=300, background=False):
  cmd = [sys.executable, '-m', 'experiments.train_population', *TINY,
         f'--workdir={workdir}', *args]
  kw = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, JAX_PLATFORMS='cpu'))
  if background:
    return subprocess.Popen(cmd, **kw)
  return subprocess.run(cmd, timeout=timeout, **kw)


def _ok(r):
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _params(workdir):
  return jax.tree_util.tree_leaves(modelset.load(os.path.join(workdir, 'modelset')).params)


def _assert_same(a, b, atol=1e-6):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory, data_dir):
  """The reference: 8 simulated devices, the CPU default (loop over devices, split step)."""
  wd = str(tmp_path_factory.mktemp('d8') / 'wd')
  r = _ok(_train(wd, '--num_cpu_devices=8'))
  assert 'devices=8' in r.stderr and 'strategy=loop' in r.stderr and 'step=split' in r.stderr
  return wd


def test_eight_devices_equal_one_device(eight_devices, tmp_path):
  _ok(_train(str(tmp_path / 'd1'), '--num_cpu_devices=1'))
  _assert_same(_params(eight_devices), _params(str(tmp_path / 'd1')))


def test_checkpoint_from_eight_devices_resumes_on_one(eight_devices, tmp_path):
  first = str(tmp_path / 'part')
  r = _ok(_train(first, '--num_cpu_devices=8', '--stop_after_epochs=1'))
  assert 'checkpointed at epoch 1' in r.stderr
  assert not os.path.exists(os.path.join(first, 'modelset'))
  wd = str(tmp_path / 'resume1')      # the far end from 8 devices
  shutil.copytree(first, wd)
  r = _ok(_train(wd, '--num_cpu_devices=1'))
  assert 'resumed from epoch 1 checkpoint' in r.stderr and 'onto 1 device' in r.stderr
  _assert_same(_params(eight_devices), _params(wd))
  # A checkpoint of another population (chunk) size is refused, not silently mixed.
  r = _train(first, '--num_cpu_devices=4', '--models_per_chunk=4')
  assert r.returncode != 0 and 'written for a chunk of 8 models' in r.stderr
  assert 'Traceback' not in r.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_equal_one_process(tmp_path, data_dir):
  single = str(tmp_path / 'single')
  _ok(_train(single, '--num_cpu_devices=4', '--strategy=vmap'))
  wd = str(tmp_path / 'multi')
  common = ['--strategy=vmap', '--num_cpu_devices=2', '--num_processes=2',
            f'--coordinator_address=127.0.0.1:{_free_port()}', '--distributed_timeout=60']
  procs = [_train(wd, *common, f'--process_id={i}', background=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert 'process 1 of 2: 2 local / 4 global devices' in outs[1][1]
  _assert_same(_params(single), _params(wd))


def test_bad_distributed_and_mesh_setups(tmp_path, data_dir):
  t0 = time.monotonic()
  r = _train(str(tmp_path / 'x'), f'--coordinator_address=127.0.0.1:{_free_port()}',
             '--num_processes=2', '--process_id=1', '--distributed_timeout=3', timeout=60)
  assert r.returncode != 0 and 'cannot reach the coordinator' in r.stderr
  assert time.monotonic() - t0 < 45
  r = _train(str(tmp_path / 'x'), '--num_processes=2', '--process_id=1')
  assert r.returncode != 0 and 'need --coordinator_address' in r.stderr
  r = _train(str(tmp_path / 'x'), '--num_cpu_devices=2', '--num_devices=8')
  assert r.returncode != 0 and 'only 2 devices exist' in r.stderr
  assert 'Traceback' not in r.stderr
