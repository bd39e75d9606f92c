import functools
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lps_jax import data, modelset, population, resnet

TINY = resnet.ResNetConfig((1, 1, 1), (4, 8, 8))


@pytest.fixture(scope='module')
def split():
  return data.load_npz()


def _config(epochs=2, tasks=(0, 1), runs=2, lr=0.1, **kw):
  return population.PopulationConfig(
      task_ids=tasks, runs_per_task=runs, dataset='npz', model=TINY,
      train=population.TrainConfig(epochs=epochs, batch_size=32, learning_rate=lr,
                                   lr_boundaries=(max(1, epochs - 1),)), **kw)


@pytest.mark.parametrize('strategy,conv_impl,devices', [
    ('loop', 'lax', 1), ('vmap', 'lax', 2), ('vmap', 'im2col', 1), ('unroll', 'lax', 2)])
def test_population_step_equals_per_model_step(split, strategy, conv_impl, devices):
  cfg = _config()
  trainer = population.PopulationTrainer(
      cfg, population.ExecutionConfig(strategy, conv_impl, 4, devices), split)
  chunk = trainer.chunks()[0]
  tasks, runs, (keys, tr_idx, tr_lab, _, _) = trainer._chunk_inputs(chunk)
  state = trainer._init(keys)
  # The reference: plain per-model train_step with lax convs, one model at a time.
  ref_model = resnet.ResNet(TINY, 'lax')
  step = jax.jit(functools.partial(population.train_step, model=ref_model, tx=trainer.tx,
                                   batch_size=32))
  expected = []
  for m in range(4):
    s_m = jax.tree_util.tree_map(lambda x: x[m], state)
    for epoch, st in [(0, 0), (0, 1)]:
      s_m, _ = step(s_m, keys[m], tr_idx[m], tr_lab[m], trainer.images, jnp.int32(epoch),
                    jnp.int32(st))
    expected.append(s_m)
  got = population.shard_models(state, trainer.mesh)
  for epoch, st in [(0, 0), (0, 1)]:
    got, metrics = trainer._train(got, keys, tr_idx, tr_lab, trainer.images, jnp.int32(epoch),
                                  jnp.int32(st))
  assert metrics['loss'].shape == (4,)
  for m in range(4):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a)[m], b, rtol=2e-4, atol=2e-5),
        got, expected[m])
  # Different models really differ (own keys / tasks), so the comparison is not vacuous.
  k = np.asarray(got['params']['conv1']['kernel'])
  assert not np.allclose(k[0], k[1])


def test_trained_population_beats_chance_and_compiles_once(split, tmp_path):
  cfg = _config(epochs=6, tasks=(1, 4), runs=2)
  trainer = population.PopulationTrainer(
      cfg, population.ExecutionConfig('unroll', 'lax', 2, 2), split, eval_every=3)
  ms = trainer.train(str(tmp_path), progress=False)
  assert len(ms) == 4 and ms.task_id.tolist() == [1, 1, 4, 4] and ms.run.tolist() == [0, 1, 0, 1]
  # 40 held-out images per model, chance = 0.5.
  assert ms.heldout_accuracy.mean() > 0.65, ms.heldout_accuracy
  assert trainer._train._cache_size() == 1  # Two chunks x 6 epochs x 5 steps, one compile.
  loaded = modelset.load(str(tmp_path))
  np.testing.assert_array_equal(loaded.params['conv1']['kernel'], ms.params['conv1']['kernel'])
  np.testing.assert_array_equal(loaded.heldout_accuracy, ms.heldout_accuracy)
  assert loaded.config == cfg.to_json()
  # Rerunning a finished workdir returns the stored model set without training.
  again = population.PopulationTrainer(
      cfg, population.ExecutionConfig('unroll', 'lax', 2, 2), split).train(str(tmp_path),
                                                                           progress=False)
  np.testing.assert_array_equal(again.params['dense']['kernel'], ms.params['dense']['kernel'])


class _Kill(Exception):
  pass


def test_kill_and_resume_equals_uninterrupted(split, tmp_path):
  cfg = _config(epochs=4, tasks=(0, 1, 2), runs=1)
  ex = population.ExecutionConfig('unroll', 'lax', 2, 2)  # 3 models -> 2 chunks (1 padded).
  full = population.PopulationTrainer(cfg, ex, split, checkpoint_every=1).train(
      str(tmp_path / 'a'), progress=False)

  def kill_at(chunk_index, epoch):
    def hook(c, e):
      if (c, e) == (chunk_index, epoch):
        raise _Kill()
    return hook

  wd = str(tmp_path / 'b')
  trainer = population.PopulationTrainer(cfg, ex, split, checkpoint_every=1)
  with pytest.raises(_Kill):
    trainer.train(wd, progress=False, on_epoch_end=kill_at(0, 2))
  with pytest.raises(_Kill):  # Resumes chunk 0 at epoch 2, finishes it, dies inside chunk 1.
    trainer.train(wd, progress=False, on_epoch_end=kill_at(1, 3))
  assert os.path.isdir(os.path.join(wd, 'chunks', 'chunk_00000'))
  resumed = trainer.train(wd, progress=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, full.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.batch_stats, full.batch_stats)
  np.testing.assert_array_equal(resumed.heldout_accuracy, full.heldout_accuracy)


def test_bad_runs_are_clear_errors(split, tmp_path):
  ex = population.ExecutionConfig('loop', 'lax', 2)
  with pytest.raises(population.TrainingError, match='NaN/Inf training loss'):
    population.PopulationTrainer(_config(epochs=2, runs=1, lr=float('nan')), ex, split).train(
        str(tmp_path / 'nan'), progress=False)
  # A workdir made by another config is refused.
  wd = str(tmp_path / 'wd')
  trainer = population.PopulationTrainer(_config(epochs=3, runs=1), ex, split, checkpoint_every=1)
  with pytest.raises(_Kill):
    trainer.train(wd, progress=False,
                  on_epoch_end=lambda c, e: (_ for _ in ()).throw(_Kill()) if e == 2 else None)
  with pytest.raises(population.TrainingError, match='different config'):
    population.PopulationTrainer(_config(epochs=5, runs=1), ex, split).train(wd, progress=False)
  # A corrupt checkpoint: a clear error, and the file is left for the user to inspect.
  for f in glob.glob(os.path.join(wd, 'ckpt', 'chunk_00000', '2', '**', '*'), recursive=True):
    if os.path.isfile(f):
      with open(f, 'wb') as fh:
        fh.write(b'\0garbage')
  with pytest.raises(population.TrainingError, match='unreadable or does not match'):
    trainer.train(wd, progress=False)
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    f.write('{not json')
  with pytest.raises(population.TrainingError, match='not a train_population workdir'):
    trainer.train(wd, progress=False)
  with pytest.raises(ValueError, match='batch_size'):
    population.PopulationTrainer(
        population.PopulationConfig(task_ids=(0,), runs_per_task=1, dataset='npz', model=TINY,
                                    train=population.TrainConfig(batch_size=1000)), ex, split)
  with pytest.raises(ValueError, match='only 2 devices exist'):
    population.ExecutionConfig('unroll', 'lax', 4, 8).resolve()


def test_modelset_errors(tmp_path):
  with pytest.raises(modelset.ModelSetError, match='no model set'):
    modelset.load(str(tmp_path))
  d = tmp_path / 'ms'
  d.mkdir()
  (d / 'meta.json').write_text(json.dumps({'num_models': 2}))
  with pytest.raises(modelset.ModelSetError, match='unreadable'):
    modelset.load(str(d))


def test_committed_first_layer_kernels_are_real_trained_weights():
  path = os.path.join(os.path.dirname(__file__), '..', 'results', 'modelset_test',
                      'first_layer_kernels.npz')
  f = np.load(path)
  k = f['kernel/conv1']
  assert k.shape == (500, 3, 3, 3, 16) and np.all(np.isfinite(k))
  assert sorted(set(f['task_id'].tolist())) == list(range(50))
  assert np.bincount(f['task_id']).tolist() == [10] * 50
  assert f['heldout_accuracy'].mean() > 0.6
  # Trained kernels moved away from their initialisation (same key derivation as training).
  cfg = population.PopulationConfig.from_json(json.loads(str(f['config'])))
  init = resnet.init_variables(
      jax.random.fold_in(population.model_key(cfg.seed, int(f['task_id'][0]), int(f['run'][0])), 0),
      cfg.model)['params']['conv1']['kernel']
  assert np.abs(np.asarray(init) - k[0]).max() > 1e-2
