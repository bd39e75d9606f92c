import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lps_jax.align import second_order
from lps_jax.align.fit import SecondOrderConfig, SecondOrderModel
from lps_jax.evaluation import protocols
from lps_jax.training import modelset

KERNELS = os.path.join(os.path.dirname(__file__), '..', '..', 'results', 'test_split_gpu', 'modelset',
                       'first_layer_kernels.npz')


def test_eq9_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = [jnp.asarray(rng.normal(size=7)) for _ in range(3)]
  w = jnp.asarray([1.0, 0.5, 2.0])
  p = [np.exp(z) / np.exp(z).sum() for z in map(np.asarray, logits)]
  ref = -np.log(sum(wi * pi[4] for wi, pi in zip(np.asarray(w), p)) / 3.5)
  assert float(second_order.eq9_loss(logits, 4, w)) == pytest.approx(ref, rel=1e-5)
  # One branch with w = 1: plain cross-entropy.
  assert float(second_order.eq9_loss(logits[:1], 2, jnp.ones(1))) == pytest.approx(-np.log(p[0][2]), rel=1e-5)
  mix = second_order.mixture_probs(logits, w)
  np.testing.assert_allclose(mix, sum(wi * pi for wi, pi in zip(np.asarray(w), p)) / 3.5, rtol=1e-5)


def test_only_weighted_branches_are_built_and_embedding_is_normalised():
  rng = np.random.default_rng(0)
  kernels = [rng.normal(size=(6, 3, 3, 3, 4)).astype(np.float32),
             rng.normal(size=(6, 3, 3, 4, 4)).astype(np.float32),
             rng.normal(size=(6, 3, 3, 4, 8)).astype(np.float32)]
  cfg = SecondOrderConfig(layer_weights=(1.0, 0.0, 0.5), num_filters=5, epochs=2)
  model = SecondOrderModel(cfg, num_classes=3)
  kernels[1] = None  # Not needed: w_2 = 0.
  model.fit(kernels, np.array([0, 1, 2, 0, 1, 2]))
  assert set(model.params) == {'branch_0', 'branch_2'}
  assert model.params['branch_2']['phi'].shape == (3, 3, 4, 5)
  assert model.params['branch_2']['fc']['kernel'].shape == (8 * 5, 3)
  emb = model.embed(kernels)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  probs = model.predict(kernels)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  # The fc-only baseline has no phi.
  fc = SecondOrderModel(dataclasses.replace(cfg, method='fc_only'), 3)
  fc.fit(kernels, np.array([0, 1, 2, 0, 1, 2]))
  assert 'phi' not in fc.params['branch_0']


def test_feature_norm_makes_a_branch_invariant_to_kernel_scale():
  import jax
  rng = np.random.default_rng(2)
  theta = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
  for norm in ('none', 'model'):
    branch = second_order.Branch(7, 4, first_layer=False, feature_norm=norm)
    params = branch.init(jax.random.PRNGKey(0), theta)
    a, b = branch.apply(params, theta), branch.apply(params, 3.0 * theta)
    # Eq. 5-8 are positively homogeneous in theta, so only the standardised branch is invariant.
    assert np.allclose(a, b, rtol=1e-4, atol=1e-4) == (norm == 'model')


def test_bad_inputs():
  cfg = SecondOrderConfig(num_filters=4, epochs=1)
  model = SecondOrderModel(cfg, num_classes=2)
  with pytest.raises(ValueError, match=r'\(M=2, h, w, c, g\)'):
    model.fit([np.zeros((2, 3, 3, 3))], np.array([0, 1]))
  bad = np.zeros((2, 3, 3, 3, 4), np.float32)
  bad[1, 0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN/Inf'):
    model.fit([bad], np.array([0, 1]))
  with pytest.raises(ValueError, match='only 1 kernel stacks'):
    SecondOrderModel(SecondOrderConfig(layer_weights=(0, 1)), 2).fit(
        [np.zeros((2, 3, 3, 3, 4))], np.array([0, 1]))
  with pytest.raises(ValueError, match='need more than 2'):
    protocols.classification_split(np.repeat(np.arange(5), 2))
  with pytest.raises(ValueError, match='cannot hold out'):
    protocols.retrieval_split(np.repeat(np.arange(5), 10), test_tasks=10)


def test_splits_follow_the_paper():
  task_id = np.repeat(np.arange(50), 10)
  c = protocols.classification_split(task_id, seed=3)
  assert c.train.size == 400 and c.test.size == 100 and not set(c.train) & set(c.test)
  assert np.bincount(task_id[c.test]).tolist() == [2] * 50
  r = protocols.retrieval_split(task_id, seed=3)
  assert r.train.size == 400 and r.query.size == 20 and r.gallery.size == 80
  assert not set(task_id[r.train]) & set(task_id[r.query])
  assert r.train_tasks.size == 40
  assert not np.array_equal(protocols.retrieval_split(task_id, seed=4).test_tasks, r.test_tasks)


def test_lps_beats_baselines_on_real_trained_kernels():
  """Real first-layer kernels of 500 trained ResNet-20s (committed); short schedule."""
  kernels, task_id, names, _ = modelset.load_kernels(KERNELS)
  assert names[0] == 'conv1' and kernels[0].shape == (500, 3, 3, 3, 16)
  cfg = SecondOrderConfig(num_filters=32, epochs=12, lr_boundaries=(8,),
                                       learning_rate=3e-3)
  lps = protocols.run_classification(kernels, task_id, 'lps', cfg, split_seed=0)
  fc = protocols.run_classification(kernels, task_id, 'fc_only', cfg, split_seed=0)
  # Chance top-1 is 2% (50 tasks).
  assert lps['top-1'] > 0.15 and lps['top-1'] > fc['top-1'] + 0.08, (lps, fc)
  assert 0.0 <= fc['top-1'] <= fc['top-5'] <= fc['top-10'] <= 1.0
