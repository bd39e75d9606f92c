"""The oneDNN batch norm against Flax's: on every ResNet-20 shape, with and without the fused ReLU
and the residual add, outputs, running statistics and the input / scale / bias gradients agree
within float32 rounding; evaluation is bit for bit Flax's; vmap is the per-model call; a whole
train step agrees; the variables are Flax's; bad operands are refused in one line."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import requires_onednn
from lps_jax.training import batch_norm, resnet

pytestmark = requires_onednn
# ResNet-20's batch norms (N, H, W, C), at a small batch: each stage's width and side.
SHAPES = [(8, 32, 32, 16), (8, 16, 16, 32), (8, 8, 8, 64)]
MODES = ('plain', 'relu', 'add')


class _Norm(nn.Module):
  impl: str
  mode: str
  threads: int = 1

  @nn.compact
  def __call__(self, x, residual, train):
    return batch_norm.norm(x, train, 'bn', self.impl, self.threads, relu=self.mode != 'plain',
                           residual=residual if self.mode == 'add' else None)


def _operands(shape, seed):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = (rng.normal(size=shape) * 2 + 0.5).astype(np.float32)
  residual, dy = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
  params = {'scale': rng.normal(size=c).astype(np.float32),
            'bias': rng.normal(size=c).astype(np.float32)}
  stats = {'mean': rng.normal(size=c).astype(np.float32),
           'var': rng.uniform(0.5, 2, size=c).astype(np.float32)}
  return x, residual, dy, {'params': {'bn': params}, 'batch_stats': {'bn': stats}}


def _train_pass(impl, mode, variables, x, residual, dy, mask=None, threads=1):
  """Output, new running statistics and the gradients of <dy, output> w.r.t. x, scale, bias,
  residual. `mask` replaces the ReLU's own mask (so that both sides use the same one)."""
  module = _Norm(impl, 'plain' if mask is not None else mode, threads)

  def f(params, x, residual):
    out, new = module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            residual, True, mutable=['batch_stats'])
    if mask is not None:
      out = (out + residual if mode == 'add' else out) * mask
    return out, new['batch_stats']

  out, vjp, stats = jax.vjp(f, variables['params'], x, residual, has_aux=True)
  d_params, dx, dres = vjp(dy)
  return out, stats, dx, d_params['bn']['scale'], d_params['bn']['bias'], dres


@pytest.mark.parametrize('threads', (1, 2))
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_training_pass_equals_flax(shape, mode, threads):
  x, residual, dy, variables = _operands(shape, sum(shape) + len(mode))
  got = jax.jit(lambda *a: _train_pass('onednn', mode, variables, *a, threads=threads))(
      x, residual, dy)
  # Flax's side through oneDNN's own ReLU mask: a pre-activation within rounding of 0 may
  # flip sign between the two, which is not a disagreement of the normalisation.
  mask = (np.asarray(got[0]) > 0).astype(np.float32) if mode != 'plain' else None
  want = jax.jit(lambda *a: _train_pass('flax', mode, variables, *a, mask=mask))(
      x, residual, dy)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  for key in ('mean', 'var'):
    np.testing.assert_allclose(got[1]['bn'][key], want[1]['bn'][key], rtol=1e-5, atol=1e-6)
  names = ('input grad', 'scale grad', 'bias grad', 'residual grad')
  for name, g, w in zip(names, got[2:], want[2:]):
    scale = float(np.abs(w).max()) + 1e-6
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5 * scale, err_msg=name)
  if mode != 'plain':                            # the fused ReLU masks what it should
    np.testing.assert_array_equal(np.asarray(got[0]) > 0, np.asarray(want[0]) > 0)


def test_evaluation_is_flax_bit_for_bit():
  x, residual, _, variables = _operands(SHAPES[1], 3)
  for mode in MODES:
    got, want = (_Norm(impl, mode).apply(variables, x, residual, False)
                 for impl in ('onednn', 'flax'))
    np.testing.assert_array_equal(got, want)


def test_vmap_over_models_is_the_per_model_call():
  from lps_jax.training.onednn import norm
  rng = np.random.default_rng(4)
  xs = rng.normal(size=(3, 4, 8, 8, 16)).astype(np.float32)
  scales, biases = (rng.normal(size=(3, 16)).astype(np.float32) for _ in range(2))
  dys = rng.normal(size=xs.shape).astype(np.float32)

  def passes(x, s, b, dy):
    (y, mean, var), vjp = jax.vjp(lambda *a: norm.batch_norm(*a, relu=True, threads=1), x, s, b)
    return (y, mean, var) + vjp((dy, jnp.zeros_like(mean), jnp.zeros_like(var)))

  batched = jax.jit(jax.vmap(passes))(xs, scales, biases, dys)
  for m in range(3):
    for b, s in zip(batched, jax.jit(passes)(xs[m], scales[m], biases[m], dys[m])):
      np.testing.assert_array_equal(b[m], s)


@pytest.mark.slow
def test_variables_are_flaxs_and_a_train_step_agrees():
  cfg = resnet.ResNetConfig()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  labels = jnp.arange(8) % 2
  flax_model, ours = (resnet.ResNet(cfg, conv_impl='lax', norm_impl=impl, conv_threads=1)
                      for impl in ('flax', 'onednn'))
  variables = flax_model.init(jax.random.PRNGKey(1), x[:1])
  same = ours.init(jax.random.PRNGKey(1), x[:1])
  assert jax.tree.structure(same) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, same, variables)

  def loss(model, params):
    logits, new = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              train=True, mutable=['batch_stats'])
    onehot = jax.nn.one_hot(labels, 2)
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), new['batch_stats']

  (want, want_stats), want_grad = jax.jit(jax.value_and_grad(
      lambda p: loss(flax_model, p), has_aux=True))(variables['params'])
  (got, got_stats), got_grad = jax.jit(jax.value_and_grad(
      lambda p: loss(ours, p), has_aux=True))(variables['params'])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5),
               got_stats, want_stats)
  flat_got, flat_want = (jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])
                         for t in (got_grad, want_grad))
  rel = float(jnp.linalg.norm(flat_got - flat_want) / jnp.linalg.norm(flat_want))
  # A pre-activation within rounding of 0 that flips its ReLU moves this small batch's gradient
  # by up to ~0.5 %: Flax's own float32 step strays 4.7e-3 from a float64 one here, oneDNN's
  # 2.8e-3. A wrong term of the batch-norm backward would move it by O(1).
  assert rel < 2e-2, rel


def test_bad_operands_are_refused():
  from lps_jax.training.onednn import norm
  with pytest.raises(ValueError, match='NHWC x with scale and bias of shape'):
    norm.batch_norm(jnp.zeros((8, 8, 3)), jnp.ones(3), jnp.zeros(3))
  with pytest.raises(ValueError, match='NHWC x with scale and bias of shape'):
    norm.batch_norm(jnp.zeros((1, 8, 8, 3)), jnp.ones(4), jnp.zeros(4))
  with pytest.raises(ValueError, match='runs in float32'):
    norm.batch_norm(jnp.zeros((1, 8, 8, 3), jnp.bfloat16), jnp.ones(3), jnp.zeros(3))
  with pytest.raises(ValueError, match="unknown norm impl 'batch'"):
    _Norm('batch', 'plain').init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)), None, False)
