"""The benchmark's batch-norm suite (`experiments.benchmark --suites=norms`) and the batch-norm
part of the step breakdown: each of ResNet-20's batch norms with what follows it (ReLU, or the
residual add + ReLU of a block's end), forward and forward + backward, through Flax / XLA,
lps-jax's oneDNN calls and PyTorch (channels_last, its own oneDNN), one at a time."""
from __future__ import annotations

import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments import bench_lib
from lps_jax.training import batch_norm

# Every batch norm of one ResNet-20 step: (side, channels, what follows it, how many).
# relu: the stem and each block's first; add: each block's end (+ shortcut, ReLU); plain: the
# two projection shortcuts.
RESNET20_NORMS = ((32, 16, 'relu', 4), (32, 16, 'add', 3), (16, 32, 'relu', 3),
                  (16, 32, 'add', 3), (16, 32, 'plain', 1), (8, 64, 'relu', 3),
                  (8, 64, 'add', 3), (8, 64, 'plain', 1))
PASSES = ('forward', 'forward + backward')


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def hand_vjp_batch_norm(x, scale, bias, relu: bool):
  """A pure-JAX reformulation for comparison: batch norm (+ ReLU) with a hand-written VJP
  (two reductions per pass, the textbook backward), for XLA to fuse."""
  return _hand_fwd(x, scale, bias, relu)[0]


def _hand_fwd(x, scale, bias, relu):
  mean = jnp.mean(x, (0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
  inv = jax.lax.rsqrt(var + batch_norm.EPSILON)
  y = (x - mean) * (inv * scale) + bias
  y = jnp.maximum(y, 0) if relu else y
  return (y, mean, var), (x, scale, mean, inv, y)


def _hand_bwd(relu, residuals, cotangents):
  x, scale, mean, inv, y = residuals
  dy = jnp.where(y > 0, cotangents[0], 0) if relu else cotangents[0]
  xhat = (x - mean) * inv
  dbias, dscale = jnp.sum(dy, (0, 1, 2)), jnp.sum(dy * xhat, (0, 1, 2))
  n = x.size // x.shape[-1]
  return (scale * inv) * (dy - dbias / n - xhat * (dscale / n)), dscale, dbias


hand_vjp_batch_norm.defvjp(_hand_fwd, _hand_bwd)


class _HandVJPNorm(nn.Module):
  """hand_vjp_batch_norm with Flax's variables and running-statistics update."""

  @nn.compact
  def __call__(self, x, relu, residual):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    y, mean, var = hand_vjp_batch_norm(x, scale, bias, relu and residual is None)
    for name, value in (('mean', mean), ('var', var)):
      stat = self.variable('batch_stats', name, jnp.zeros, (c,))
      stat.value = batch_norm.MOMENTUM * stat.value + (1 - batch_norm.MOMENTUM) * value
    return y if residual is None else nn.relu(residual + y)


class _Norm(nn.Module):
  impl: str     # batch_norm.NORM_IMPLS, or 'hand_vjp' (hand_vjp_batch_norm)
  mode: str
  threads: int

  @nn.compact
  def __call__(self, x, residual):
    relu, residual = self.mode != 'plain', residual if self.mode == 'add' else None
    if self.impl == 'hand_vjp':
      return _HandVJPNorm(name='bn')(x, relu, residual)
    return batch_norm.norm(x, True, 'bn', self.impl, self.threads, relu, residual)


def _passes(impl, mode, threads, x, residual, dy):
  """(forward, forward + backward) of one batch norm as functions of (params, x, residual)."""
  module = _Norm(impl, mode, threads)
  variables = module.init(jax.random.PRNGKey(1), x, residual)
  forward = lambda p, x, r: module.apply({'params': p, 'batch_stats': variables['batch_stats']},
                                         x, r, mutable=['batch_stats'])
  both = lambda p, x, r: jax.vjp(lambda p, x, r: forward(p, x, r)[0], p, x, r)[1](dy)
  return variables['params'], jax.jit(forward), jax.jit(both)


def norm_ms(impl: str, side: int, c: int, mode: str, batch: int, threads: int,
            repeats: int = 5) -> dict:
  """Milliseconds of one training-mode batch norm (+ ReLU / + add + ReLU): forward (with the
  running-statistics update) and forward + backward; a formulation other than Flax's is
  checked against Flax's gradients first."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x, residual, dy = (jax.random.normal(k, (batch, side, side, c)) for k in keys)
  params, forward, both = _passes(impl, mode, threads, x, residual, dy)
  if impl != 'flax':
    want = jax.tree.leaves(_passes('flax', mode, threads, x, residual, dy)[2](params, x, residual))
    for g, w in zip(jax.tree.leaves(both(params, x, residual)), want):
      rel = float(jnp.linalg.norm(g - w) / max(float(jnp.linalg.norm(w)), 1e-30))
      assert rel < 1e-2, f'{impl} {mode} {x.shape}: gradients differ from Flax\'s ({rel:.1e})'
  return {name: 1e3 * bench_lib.best_time(f, params, x, residual, repeats=repeats)
          for name, f in zip(PASSES, (forward, both))}


def torch_norm_ms(side: int, c: int, mode: str, batch: int, repeats: int = 5) -> dict:
  """The same in PyTorch: `F.batch_norm` in training mode (channels_last), then ReLU / add."""
  import torch
  import torch.nn.functional as F
  cl = torch.channels_last
  x = torch.randn(batch, c, side, side).contiguous(memory_format=cl).requires_grad_()
  residual = torch.randn(batch, c, side, side).contiguous(memory_format=cl).requires_grad_()
  dy = torch.randn(batch, c, side, side).contiguous(memory_format=cl)
  weight, bias = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
  mean, var = torch.zeros(c), torch.ones(c)

  def forward():
    y = F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.1, eps=1e-5)
    if mode == 'add':
      y = y + residual
    return F.relu(y) if mode != 'plain' else y

  def both():
    forward().backward(dy)

  return {name: bench_lib.best_call_ms(f, repeats)
          for name, f in zip(PASSES, (lambda: forward().detach(), both))}


def step_ms(impl: str, batch: int, threads: int, repeats: int = 5) -> float:
  """All batch norms of one model's train step, forward + backward, count-weighted."""
  return sum(count * norm_ms(impl, side, c, mode, batch, threads, repeats)['forward + backward']
             for side, c, mode, count in RESNET20_NORMS)


def norms_suite(batch_size: int, threads: int) -> dict:
  """Each batch norm shape of ResNet-20 in Flax / XLA, as a hand-written VJP in pure JAX,
  in oneDNN (if built), in PyTorch (if installed), with the per-step totals."""
  libs = {'xla': lambda *a: norm_ms('flax', *a, batch_size, threads),
          'xla hand VJP': lambda *a: norm_ms('hand_vjp', *a, batch_size, threads)}
  if bench_lib.onednn_available():
    libs['onednn'] = lambda *a: norm_ms('onednn', *a, batch_size, threads)
  else:
    print('\nnorms suite: the oneDNN extension is unavailable, no onednn columns '
          '(pip install -e .[onednn]).')
  if bench_lib.torch_available():
    import torch
    torch.set_num_threads(threads)
    libs['torch'] = lambda *a: torch_norm_ms(*a, batch_size)
  else:
    print('\nnorms suite: PyTorch is not installed, no torch columns (pip install torch).')
  rows = []
  for side, c, mode, count in RESNET20_NORMS:
    row = {'shape': f'{side}x{side}x{c}', 'then': mode, 'count': count}
    row.update({lib: fn(side, c, mode) for lib, fn in libs.items()})
    rows.append(row)
  totals = {lib: {p: sum(r['count'] * r[lib][p] for r in rows) for p in PASSES} for lib in libs}
  cols = [(lib, p) for lib in libs for p in PASSES]
  print(f'\n### Batch norms of ResNet-20, training mode, batch {batch_size}, {threads} '
        'thread(s), best of 5 (ms)\n')
  print('| batch norm | then | per network | ' + ' | '.join(f'{l} {p}' for l, p in cols) + ' |')
  print('|---|---|---|' + '---|' * len(cols))
  for r in rows:
    print(f'| {r["shape"]} | {r["then"]} | {r["count"]} | '
          + ' | '.join(f'{r[l][p]:.2f}' for l, p in cols) + ' |')
  print('| per model step (count-weighted) | | | '
        + ' | '.join(f'{totals[l][p]:.1f}' for l, p in cols) + ' |')
  sys.stdout.flush()
  return {'rows': rows, 'per_model_step_ms': totals, 'batch_size': batch_size,
          'threads': threads}
