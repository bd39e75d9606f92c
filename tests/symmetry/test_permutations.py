"""ResNet's permutation spec and whole-network weight matching (lps_jax.symmetry.permutations)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from lps_jax.symmetry import matching as M
from lps_jax.symmetry import permutations as P
from lps_jax.training import resnet

TINY = resnet.ResNetConfig((2, 1, 1), (4, 6, 8))


def _variables(seed, config=TINY):
  """A model with non-trivial BN parameters and statistics (init has scale 1, bias 0)."""
  v = resnet.init_variables(jax.random.PRNGKey(seed), config)
  noise = jax.random.PRNGKey(seed + 1000)
  v = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(noise, x.shape), v)
  v['batch_stats'] = jax.tree_util.tree_map(jnp.abs, v['batch_stats'])
  return P.flatten(v)


def _params(flat):
  return {k: v for k, v in flat.items() if k.startswith('params/')}


def test_spec_covers_every_channel_axis_of_resnet20():
  spec = resnet.permutation_spec()
  flat = P.flatten(resnet.init_variables(jax.random.PRNGKey(0)))
  sizes = spec.sizes(flat)               # raises if a group spans axes of different sizes
  # 3 residual streams (one per stage) + one inner group per block.
  assert sorted(g for g in sizes if g.startswith('stream')) == ['stream0', 'stream2', 'stream3']
  assert sum(g.endswith('/inner') for g in sizes) == 9
  # Every variable but the dense bias is permuted on its channel axes, none on others.
  assert set(flat) - set(spec.axes_to_perm) == {'params/dense/bias'}
  for path, groups in spec.axes_to_perm.items():
    assert len(groups) == flat[path].ndim
    if path.endswith('kernel') and 'dense' not in path:
      assert groups[:2] == (None, None)


def test_permuted_copy_is_matched_back_exactly_and_computes_the_same():
  spec = resnet.permutation_spec(TINY)
  a = _variables(0)
  perms = P.random_perms(spec, a, np.random.default_rng(1))
  b = P.apply(spec, perms, a)
  model = resnet.ResNet(TINY)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
  np.testing.assert_allclose(model.apply(P.unflatten(a), x), model.apply(P.unflatten(b), x),
                             rtol=1e-5, atol=1e-5)
  found = M.weight_matching(spec, _params(a), _params(b), np.random.default_rng(2))
  back = P.apply(spec, found, b)
  for k in a:
    np.testing.assert_array_equal(back[k], a[k])      # bit for bit: a permutation is exact
  for g, p in P.inverse(perms).items():
    np.testing.assert_array_equal(found[g], p)


def test_aligned_model_computes_the_same_function():
  spec = resnet.permutation_spec(TINY)
  a, b = _variables(0), _variables(5)
  found = M.weight_matching(spec, _params(a), _params(b))
  aligned = P.apply(spec, found, b)
  assert any(not np.array_equal(aligned[k], b[k]) for k in b)   # it did permute something
  model = resnet.ResNet(TINY)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
  np.testing.assert_allclose(model.apply(P.unflatten(aligned), x),
                             model.apply(P.unflatten(b), x), rtol=1e-5, atol=1e-5)
  # And it is closer to the reference than before.
  dist = lambda u: sum(float(((u[k] - a[k]) ** 2).sum()) for k in _params(a))
  assert dist(aligned) < dist(b)


def test_weight_matching_is_coordinatewise_optimal():
  """At the answer no single group's assignment can be improved (a numpy re-derivation of
  each group's linear assignment problem)."""
  spec = resnet.permutation_spec(TINY)
  a, b = _params(_variables(0)), _params(_variables(7))
  found = M.weight_matching(spec, a, b)
  for g, axes in spec.perm_to_axes.items():
    n = len(found[g])
    gain = np.zeros((n, n))
    for path, axis in axes:
      if path in a:
        other = P.apply(spec, found, {path: b[path]}, except_axis=(path, axis))[path]
        gain += np.moveaxis(a[path], axis, 0).reshape(n, -1) @ \
            np.moveaxis(other, axis, 0).reshape(n, -1).T
    _, best = linear_sum_assignment(gain, maximize=True)
    assert gain[np.arange(n), found[g]].sum() >= gain[np.arange(n), best].sum() - 1e-9


def test_align_to_mean_undoes_random_permutations_of_noisy_copies():
  spec = resnet.permutation_spec(TINY)
  base = _params(_variables(0))
  rng = np.random.default_rng(3)
  models = []
  for i in range(4):
    noisy = {k: v + 0.01 * rng.standard_normal(v.shape) for k, v in base.items()}
    models.append(P.apply(spec, P.random_perms(spec, noisy, rng), noisy))
  reference, perms = M.align_to_mean(spec, models)
  aligned = [P.apply(spec, p, m) for p, m in zip(perms, models)]
  for m in aligned[1:]:    # all aligned to one another: only the noise differs
    for k in base:
      np.testing.assert_allclose(m[k], aligned[0][k], atol=0.1)
  spread = lambda ms: np.mean([np.abs(m['params/stage2_block1/conv1/kernel'] -
                                      ms[0]['params/stage2_block1/conv1/kernel']).mean()
                               for m in ms[1:]])
  assert spread(aligned) < 0.2 * spread(models)


def test_unstack_gives_one_flat_per_model_and_refuses_mixed_counts():
  stacked = {'a': np.arange(6.).reshape(3, 2), 'b': np.arange(3.)}
  models = P.unstack(stacked)
  assert len(models) == 3
  for m, flat in enumerate(models):
    np.testing.assert_array_equal(flat['a'], stacked['a'][m])
    assert flat['b'] == stacked['b'][m]
  with pytest.raises(ValueError, match='cannot unstack'):
    P.unstack({'a': np.zeros((3, 2)), 'b': np.zeros(4)})
  with pytest.raises(ValueError, match='cannot unstack'):
    P.unstack({})
