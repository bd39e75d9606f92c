"""The per-model step: split == fused, every strategy == the plain per-model step, epochs cover
every training image once (the partial last batch included), config checks."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import onednn_available, requires_onednn
from lps_jax.training import data, popmap, resnet
from lps_jax.training import step as train_step
from lps_jax.training import trainer
from lps_jax.training.config import ExecutionConfig, PopulationConfig, TrainConfig

TINY = resnet.ResNetConfig((1, 1, 1), (4, 8, 8))


@pytest.fixture(scope='module')
def splits(data_dir):
  return data.load('npz', data_dir, classes=data.task_classes([0, 1]))


def _config(batch_size=100):
  return PopulationConfig(task_ids=(0, 1), runs_per_task=2, dataset='npz', model=TINY,
                          train=TrainConfig(epochs=2, batch_size=batch_size, lr_boundaries=(1,)))


def test_epoch_batches_cover_every_image_once():
  cfg = TrainConfig(batch_size=128)
  assert cfg.batch_sizes(1000) == [128] * 7 + [104] and cfg.steps_per_epoch(1000) == 8
  dropped = TrainConfig(batch_size=128, drop_remainder=True)
  assert dropped.batch_sizes(1000) == [128] * 7 and dropped.steps_per_epoch(1000) == 7
  with pytest.raises(ValueError, match='lower --batch_size'):
    cfg.steps_per_epoch(100)
  n = 300
  images = jnp.zeros((n, 32, 32, 3), jnp.uint8)
  ids = jnp.arange(n)
  key = jax.random.PRNGKey(0)
  seen = [np.asarray(train_step.batch(key, ids, ids, images, 3, s, batch_size=b, stride=128)[1])
          for s, b in enumerate(TrainConfig(batch_size=128).batch_sizes(n))]
  assert [len(x) for x in seen] == [128, 128, 44]
  assert sorted(np.concatenate(seen).tolist()) == list(range(n))
  other = train_step.batch(key, ids, ids, images, 4, 0, batch_size=128, stride=128)[1]
  assert not np.array_equal(other, seen[0])                  # a new order every epoch


@pytest.mark.parametrize('strategy,conv_impl,devices,step', [
    # Each strategy, step and conv once (oneDNN under vmap: test_onednn); the fast tier keeps
    # the CPU default (loop, split, oneDNN).
    pytest.param('loop', 'lax', 2, 'split', marks=pytest.mark.slow),
    pytest.param('vmap', 'lax', 2, 'fused', marks=pytest.mark.slow),
    pytest.param('vmap', 'im2col', 1, 'fused', marks=pytest.mark.slow),
    pytest.param('unroll', 'lax', 2, 'fused', marks=pytest.mark.slow),
    pytest.param('loop', 'onednn', 2, 'split', marks=requires_onednn)])
def test_population_step_equals_per_model_step(splits, strategy, conv_impl, devices, step):
  # XLA's convs with Flax's batch norm, oneDNN's with oneDNN's: this width-4 net amplifies
  # the rounding of XLA's convs around oneDNN's batch norm past the tolerance below (~4e-3 of a
  # leaf's scale in one step between the fused and split programs).
  norm = 'onednn' if conv_impl == 'onednn' else 'flax'
  tr = trainer.PopulationTrainer(
      _config(), ExecutionConfig(strategy, conv_impl, step, 4, devices, norm_impl=norm), *splits)
  chunk = tr.chunks()[0]
  _, _, host_keys, (keys, tr_idx, tr_lab, _, _) = tr.chunk_inputs(chunk)
  host_state = tr.initial_state(host_keys)
  # The reference: the plain fused per-model step, one model at a time, with the trainer's conv,
  # batch norm and thread count (this width-4 net amplifies rounding: Flax's batch norm against
  # oneDNN's, oneDNN's on 1 thread against 2, or XLA's convs against oneDNN's part by up to
  # ~6e-3 of a leaf's scale in one step; test_onednn.py and test_batch_norm.py compare those
  # pass by pass). What differs here is how the population is run: loop / vmap / unroll,
  # split / fused, devices.
  model = resnet.ResNet(TINY, tr.execution.conv_impl, conv_threads=tr.execution.conv_threads,
                        norm_impl=tr.execution.norm_impl)
  ref = jax.jit(functools.partial(train_step.train_step, model=model, tx=tr.tx, batch_size=100,
                                  stride=100))
  images = jnp.asarray(splits[0].images)
  t = tr.tasks
  expected = []
  for m in range(4):
    s_m = jax.tree_util.tree_map(lambda x: x[m], host_state)
    for st in (0,):   # one step: see the note below
      s_m, _ = ref(s_m, host_keys[m], t.train_idx[m // 2], t.train_labels[m // 2], images,
                   np.int32(0), np.int32(st))
    expected.append(s_m)
  state = tr.population.place(host_state)
  for st in (0,):   # one step: see the note below
    state, metrics = tr.step_fn(100)(state, keys, tr_idx, tr_lab, tr.images, np.int32(0),
                                     np.int32(st))
  got = tr.population.gather(state)
  # One step, and a tolerance relative to each leaf's scale: on some real batches this width-4
  # net is so badly conditioned that rounding differences between programs (split vs fused,
  # vmap vs loop, with lax convs too) reach ~6e-4 of a leaf's scale in one step (model 0 at
  # split seed 0) and ~1e-2 in two; a wrong step (batch, key, task, update) is off by O(1).
  assert tr.population.gather(metrics)['loss'].shape == (4,)
  for m in range(4):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a[m], b, rtol=0,
                                                atol=1e-3 * float(np.abs(b).max()) + 1e-7),
        got, expected[m])
  k = got['params']['conv1']['kernel']   # models differ (own keys, tasks): not vacuous
  assert not np.allclose(k[0], k[1]) and not np.allclose(k[1], k[2])


def test_split_step_is_the_fused_step():
  model, tx = resnet.ResNet(TINY), train_step.make_optimizer(TrainConfig(), 8)
  key = jax.random.PRNGKey(3)
  state = train_step.init_model_state(key, TINY, tx)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
  idx, labels = jnp.arange(64), jnp.asarray(rng.integers(0, 2, 64))
  args = (key, idx, labels, images, np.int32(0), np.int32(1))
  sizes = dict(batch_size=32, stride=32)
  fused, metrics = jax.jit(functools.partial(train_step.train_step, model=model, tx=tx,
                                             **sizes))(state, *args)
  vjp, stats, metrics2 = jax.jit(functools.partial(train_step.forward_and_vjp, model=model,
                                                   **sizes))(state, *args)
  split = jax.jit(functools.partial(train_step.apply_gradients, tx=tx))(state, vjp, stats)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         fused, split)
  np.testing.assert_allclose(metrics['loss'], metrics2['loss'], rtol=1e-6)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), fused['params'],
                                 state['params'])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3        # the update really happened


def test_execution_config_checks():
  cpu = ExecutionConfig().resolve('cpu')
  conv = 'onednn' if onednn_available() else 'lax'   # the extra is optional (README)
  assert (cpu.strategy, cpu.conv_impl, cpu.step) == ('loop', conv, 'split')
  if conv == 'onednn':
    assert cpu.conv_threads == max(1, len(os.sched_getaffinity(0)) // cpu.num_devices)
  assert ExecutionConfig().resolve('gpu').step == 'fused'
  assert ExecutionConfig('unroll').resolve('cpu').step == 'fused'
  with pytest.raises(ValueError, match='--step=split runs with --strategy=loop'):
    ExecutionConfig('vmap', step='split').resolve()
  with pytest.raises(ValueError, match='only 2 devices exist'):
    ExecutionConfig('unroll', num_devices=8).resolve()
  with pytest.raises(ValueError, match='--models_per_chunk=0: must be an integer >= 1'):
    ExecutionConfig(models_per_chunk=0)
  # Checked where each config is defined, so restored and library-built configs are too.
  for cls, kw, says in ((TrainConfig, dict(batch_size=0), '--batch_size=0: must be an integer'),
                        (TrainConfig, dict(learning_rate=float('nan')), 'finite number > 0'),
                        (TrainConfig, dict(epochs=10, lr_boundaries=(10,)), 'not inside the 10'),
                        (PopulationConfig, dict(runs_per_task=0), '--runs_per_task=0'),
                        (PopulationConfig, dict(task_ids=(60,)), 'tasks are 0-49'),
                        (ExecutionConfig, dict(conv_threads=-1), '--conv_threads=-1')):
    with pytest.raises(ValueError, match=says):
      cls(**kw)
  with pytest.raises(ValueError, match='--epochs=0'):
    PopulationConfig.from_json(dict(PopulationConfig().to_json(),
                                    train=dict(TrainConfig().__dict__, epochs=0)))
  assert popmap.Population('loop').padded_size(5) == 5
