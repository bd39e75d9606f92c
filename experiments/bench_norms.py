"""The benchmark's batch-norm suite (`experiments.benchmark --suites=norms`) and the batch-norm
part of the step breakdown: each of ResNet-20's batch norms with what follows it (ReLU, or the
residual add + ReLU of a block's end), forward and forward + backward, through Flax / XLA,
lps-jax's oneDNN calls and PyTorch (channels_last, its own oneDNN), one at a time."""
from __future__ import annotations

import sys

import flax.linen as nn
import jax

from experiments import bench_lib
from lps_jax.training import batch_norm

# Every batch norm of one ResNet-20 step: (side, channels, what follows it, how many).
# relu: the stem and each block's first; add: each block's end (+ shortcut, ReLU); plain: the
# two projection shortcuts.
RESNET20_NORMS = ((32, 16, 'relu', 4), (32, 16, 'add', 3), (16, 32, 'relu', 3),
                  (16, 32, 'add', 3), (16, 32, 'plain', 1), (8, 64, 'relu', 3),
                  (8, 64, 'add', 3), (8, 64, 'plain', 1))
PASSES = ('forward', 'forward + backward')


class _Norm(nn.Module):
  impl: str
  mode: str
  threads: int

  @nn.compact
  def __call__(self, x, residual):
    return batch_norm.norm(x, True, 'bn', self.impl, self.threads, relu=self.mode != 'plain',
                           residual=residual if self.mode == 'add' else None)


def norm_ms(impl: str, side: int, c: int, mode: str, batch: int, threads: int,
            repeats: int = 5) -> dict:
  """Milliseconds of one training-mode batch norm (+ ReLU / + add + ReLU) through
  `batch_norm.norm`: forward (with the running-statistics update) and forward + backward."""
  module = _Norm(impl, mode, threads)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x, residual, dy = (jax.random.normal(k, (batch, side, side, c)) for k in keys)
  variables = module.init(jax.random.PRNGKey(1), x, residual)
  forward = lambda p, x, r: module.apply({'params': p, 'batch_stats': variables['batch_stats']},
                                         x, r, mutable=['batch_stats'])
  both = lambda p, x, r: jax.vjp(lambda p, x, r: forward(p, x, r)[0], p, x, r)[1](dy)
  return {name: 1e3 * bench_lib.best_time(jax.jit(f), variables['params'], x, residual,
                                          repeats=repeats)
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
  """Each batch norm shape of ResNet-20 in Flax / XLA, oneDNN (if built), PyTorch (if
  installed), with the per-step totals."""
  libs = {'xla': lambda *a: norm_ms('flax', *a, batch_size, threads)}
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
