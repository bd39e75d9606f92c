import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lps_jax import align
from lps_jax.training import resnet



def _np_scores(theta, phi):
  h, w, c, g = theta.shape
  G = phi.shape[-1]
  s = np.zeros((g, G, c, c))
  for gi in range(g):
    for gj in range(G):
      for ci in range(c):
        for cj in range(c):
          s[gi, gj, ci, cj] = np.sum(theta[:, :, ci, gi] * phi[:, :, cj, gj])
  return s


def test_each_equation_matches_numpy_reference():
  rng = np.random.default_rng(0)
  theta = rng.normal(size=(3, 3, 5, 4)).astype(np.float32)
  phi = rng.normal(size=(3, 3, 5, 6)).astype(np.float32)
  s_ref = _np_scores(theta, phi)
  s = align.frobenius_scores(theta, phi)
  assert s.shape == (4, 6, 5, 5)
  np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-4)
  cm_ref = np.array([[sum(max(s_ref[gi, gj, ci, cj] for ci in range(5)) for cj in range(5))
                      for gj in range(6)] for gi in range(4)])
  np.testing.assert_allclose(align.channel_max(s), cm_ref, rtol=1e-4, atol=1e-4)
  fl_ref = np.array([[np.sum(theta[..., gi] * phi[..., gj]) for gj in range(6)] for gi in range(4)])
  np.testing.assert_allclose(align.first_layer_scores(theta, phi), fl_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(align.sort_filters(cm_ref), np.sort(cm_ref, axis=0))
  np.testing.assert_allclose(align.align_layer(theta, phi, first_layer=False),
                             np.sort(cm_ref, axis=0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(align.align_layer(theta, phi, first_layer=True),
                             np.sort(fl_ref, axis=0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(align.align_layer(theta, phi, False, channel_align=False,
                                               filter_align=False), fl_ref, rtol=1e-4, atol=1e-4)


def test_streamed_channel_max_equals_einsum_values_and_gradients():
  rng = np.random.default_rng(3)
  theta = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)
  phi = jnp.asarray(rng.normal(size=(3, 3, 6, 7)), jnp.float32)
  u = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  ref = align.channel_max(align.frobenius_scores(theta, phi))
  np.testing.assert_allclose(align.streamed_channel_max(theta, phi), ref, rtol=1e-5, atol=1e-5)

  def loss(impl):  # Through the sort too, as the second-order network uses it.
    return lambda t, p: jnp.sum(align.align_layer(t, p, False, impl=impl) * u)

  g_ref = jax.grad(loss('einsum'), argnums=(0, 1))(theta, phi)
  g_new = jax.jit(jax.grad(loss('stream'), argnums=(0, 1)))(theta, phi)
  for a, b in zip(g_ref, g_new):
    assert float(jnp.max(jnp.abs(a))) > 0
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
  pop = jnp.asarray(rng.normal(size=(4, 3, 3, 6, 5)), jnp.float32)
  per_model = jax.vmap(jax.grad(lambda p, t: loss('stream')(t, p)), in_axes=(None, 0))(phi, pop)
  for i in range(4):
    np.testing.assert_allclose(per_model[i], jax.grad(loss('einsum'), argnums=1)(pop[i], phi),
                               rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='unknown impl'):
    align.channel_scores(theta, phi, impl='fast')


def _phis(key, params, G=7, config=resnet.ResNetConfig()):
  kernels = resnet.conv_kernels(params, config)
  return [jax.random.normal(k, kern.shape[:3] + (G,))
          for k, kern in zip(jax.random.split(key, len(kernels)), kernels)]


def test_exact_permutation_invariance_of_whole_resnet20():
  v = resnet.init_variables(jax.random.PRNGKey(0))
  # Non-trivial BN statistics and affine parameters so the check covers them.
  v = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape), v)
  v['batch_stats'] = jax.tree_util.tree_map(jnp.abs, v['batch_stats'])
  pv = resnet.random_permutation(v, jax.random.PRNGKey(2))
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  apply = jax.jit(resnet.ResNet().apply)
  np.testing.assert_allclose(apply(v, x), apply(pv, x), rtol=1e-4, atol=1e-4)
  assert not np.allclose(v['params']['stage2_block1']['conv1']['kernel'],
                         pv['params']['stage2_block1']['conv1']['kernel'])
  phis = _phis(jax.random.PRNGKey(4), v['params'])
  aligned = jax.jit(align.align_network, static_argnames=('channel_align', 'filter_align'))
  a = aligned(v['params'], phis)
  b = aligned(pv['params'], phis)
  assert len(a) == 19
  for x_, y_ in zip(a, b):
    np.testing.assert_allclose(x_, y_, rtol=1e-4, atol=1e-4)
  # Without alignment the features change.
  a0 = aligned(v['params'], phis, channel_align=True, filter_align=False)
  b0 = aligned(pv['params'], phis, channel_align=True, filter_align=False)
  assert all(not np.allclose(x_, y_, atol=1e-3) for x_, y_ in zip(a0, b0))


def test_population_compiles_once_and_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  pop = jnp.asarray(rng.normal(size=(6, 3, 3, 8, 5)), jnp.float32)
  phi = jnp.asarray(rng.normal(size=(3, 3, 8, 4)), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def aligned(kernels, phi):
    return jax.vmap(lambda t: align.align_layer(t, phi, first_layer=False))(kernels)

  out = aligned(pop, phi)
  out2 = aligned(pop + 1.0, phi * 2.0)  # New values, same shapes: no retrace.
  assert out.shape == out2.shape == (6, 5, 4)
  for strategy in ('vmap', 'loop', 'auto'):
    np.testing.assert_allclose(
        align.align_population(pop, phi, False, models_per_chunk=4, strategy=strategy), out,
        rtol=1e-5, atol=1e-5)
  # Sharded over the 2 simulated devices (conftest): chunk 3 rounds up to 4, output the same.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ('models',))
  sharded = align.align_population(pop, phi, False, models_per_chunk=3, strategy='vmap',
                                   mesh=mesh)
  np.testing.assert_allclose(sharded, out, rtol=1e-5, atol=1e-5)

  w = jnp.asarray(rng.normal(size=(6, 5, 4)), jnp.float32)
  loss = lambda p: jnp.sum(w * aligned(pop, p))
  g = jax.grad(loss)(phi)
  loss64 = lambda p: float(np.sum(np.asarray(w, np.float64) * np.stack(
      [np.sort(_np_scores(np.asarray(t, np.float64), p).max(axis=2).sum(-1), axis=0)
       for t in np.asarray(pop)])))
  p0 = np.asarray(phi, np.float64)
  eps = 1e-4
  for idx in [(0, 0, 0, 0), (1, 2, 3, 1), (2, 1, 7, 3), (0, 2, 5, 2)]:
    e = np.zeros_like(p0)
    e[idx] = eps
    fd = (loss64(p0 + e) - loss64(p0 - e)) / (2 * eps)
    assert abs(fd - float(g[idx])) < 1e-2 * max(1.0, abs(fd)), (idx, fd, g[idx])


def test_bad_inputs():
  theta = jnp.zeros((3, 3, 16, 8))
  with pytest.raises(ValueError, match='rank 4'):
    align.frobenius_scores(jnp.zeros((16, 3, 3)), jnp.zeros((3, 3, 16, 4)))
  with pytest.raises(ValueError, match='must match theta'):
    align.align_layer(theta, jnp.zeros((3, 3, 8, 4)), first_layer=False)
  with pytest.raises(ValueError, match='must match theta'):
    align.first_layer_scores(theta, jnp.zeros((5, 5, 16, 4)))
  v = resnet.init_variables(jax.random.PRNGKey(0))
  phis = _phis(jax.random.PRNGKey(1), v['params'])
  with pytest.raises(ValueError, match='unknown layer'):
    align.align_network(v['params'], phis[:1], layers=['stage7_block1/conv1'])
  with pytest.raises(ValueError, match='out of range'):
    align.align_network(v['params'], phis[:1], layers=[19])
  with pytest.raises(ValueError, match='phi arrays'):
    align.align_network(v['params'], phis[:2], layers=[0])
  out = align.align_network(v['params'], [phis[0], phis[5]], layers=['conv1', 5])
  assert [o.shape for o in out] == [(16, 7), (16, 7)]


@pytest.mark.slow
def test_vmapped_align_network_over_a_population_compiles_once():
  cfg = resnet.ResNetConfig((1, 1, 1), (4, 8, 8))
  pops = [jax.vmap(lambda k: resnet.init_variables(k, cfg)['params'])(
      jax.random.split(jax.random.PRNGKey(s), 5)) for s in (0, 1)]
  single = jax.tree_util.tree_map(lambda x: x[0], pops[0])
  phis = _phis(jax.random.PRNGKey(2), single, G=6, config=cfg)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def aligned(params, phis):
    return jax.vmap(lambda p: align.align_network(p, phis))(params)

  a, b = aligned(pops[0], phis), aligned(pops[1], phis)
  assert len(a) == len(resnet.conv_layer_names(cfg)) == 7
  assert [x.shape for x in a] == [(5, 4, 6), (5, 4, 6), (5, 4, 6), (5, 8, 6), (5, 8, 6),
                                  (5, 8, 6), (5, 8, 6)]
  np.testing.assert_allclose(a[3][2], align.align_network(
      jax.tree_util.tree_map(lambda x: x[2], pops[0]), phis)[3], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[0], b[0])
