"""The benchmark's kernel suites (`experiments.benchmark` convs, breakdown, align): one conv
pass, one model's step in parts, Eq. 5-8 over a population; settings as arguments, no flags."""
from __future__ import annotations

import os
import sys

from experiments import bench_lib


def convs_suite(batch_size: int) -> dict:
  """Each stride-1 3x3 conv shape of ResNet-20, one pass at a time: XLA against PyTorch's
  channels_last (oneDNN) kernels, and the weight gradient as shifted matmuls (what bounds the
  train step; BENCHMARKS.md)."""
  with_torch, with_onednn = bench_lib.torch_available(), bench_lib.onednn_available()
  if not with_torch:
    print('\nconvs suite: PyTorch is not installed, no torch columns (pip install torch).')
  if not with_onednn:
    print('\nconvs suite: the oneDNN extension is unavailable, no onednn columns '
          '(pip install -e .[onednn]).')
  rows, passes = [], ('forward', 'input grad', 'weight grad')
  for side, cin, cout, count in bench_lib.RESNET20_CONVS:
    row = {'shape': f'{side}x{side} {cin}->{cout}', 'c_in': cin, 'count': count,
           'xla': bench_lib.xla_conv_ms(side, cin, cout, batch_size)}
    if with_onednn:
      row['onednn'] = bench_lib.onednn_conv_ms(side, cin, cout, batch_size)
    if with_torch:
      row['torch'] = bench_lib.torch_conv_ms(side, cin, cout, batch_size)
    rows.append(row)
  # A train step needs no input gradient of the first conv (its input is the image, c_in 3).
  needed = lambda r, p: r['count'] * (p != 'input grad' or r['c_in'] != 3)
  totals = {lib: {p: sum(needed(r, p) * r[lib][p] for r in rows) for p in passes}
            for lib in ('xla', 'onednn', 'torch') if lib in rows[0]}
  cols = [(lib, p) for lib in totals for p in passes]
  cols += [('xla', p) for p in rows[0]['xla'] if p not in passes]   # the reformulations
  print(f'\n### 3x3 convs of ResNet-20, batch {batch_size}, best of 5 (ms)\n')
  print('| conv | per network | ' + ' | '.join(f'{lib} {p}' for lib, p in cols) + ' |')
  print('|---|---|' + '---|' * len(cols))
  for r in rows:
    print(f'| {r["shape"]} | {r["count"]} | '
          + ' | '.join(f'{r[lib][p]:.1f}' for lib, p in cols) + ' |')
  print('| per model step (count-weighted) | | '
        + ' | '.join(f'{totals[lib][p]:.0f}' if p in passes else '' for lib, p in cols) + ' |')
  sys.stdout.flush()
  return {'rows': rows, 'per_model_step_ms': totals, 'batch_size': batch_size}


def breakdown_suite(impls, batch_size: int) -> dict:
  """Where one model's train step spends its time, for each 'conv[/norm]' impl pair."""
  threads = len(os.sched_getaffinity(0))
  rows = {impl: bench_lib.step_breakdown(*bench_lib.impls_spec(impl), batch_size, threads)
          for impl in impls}
  parts = list(next(iter(rows.values())))
  print(f'\n### One model\'s train step, batch {batch_size}, one device, {threads} '
        'threads per call, best of 5 (ms)\n')
  print('| part | ' + ' | '.join(rows) + ' |')
  print('|---|' + '---|' * len(rows))
  for p in parts:
    print(f'| {p} | ' + ' | '.join(f'{rows[i][p]:.1f}' for i in rows) + ' |')
  sys.stdout.flush()
  return {'rows': rows, 'threads': threads, 'batch_size': batch_size}


def align_suite(peak, sizes, filters, chunk_size: int, impls) -> list:
  """Aligns populations of each ResNet-20 layer shape against G filters: fwd and fwd+bwd."""
  import jax
  import jax.numpy as jnp
  from lps_jax import align
  shapes = [('conv1 (layer 1)', (3, 3, 3, 16), True),
            ('16->16 (layers 2-7)', (3, 3, 16, 16), False),
            ('32->32 (layers 9-13)', (3, 3, 32, 32), False),
            ('64->64 (layers 15-19)', (3, 3, 64, 64), False)]
  backend = jax.default_backend()
  rows = []
  print(f'\nalign: backend={backend}, chunk={chunk_size}')
  for m in map(int, sizes):
    for big_g in map(int, filters):
      for (name, shape, first), impl in [(sh, i) for sh in shapes for i in
                                         (['auto'] if sh[2] else impls)]:
        key = jax.random.PRNGKey(0)
        kernels = jax.random.normal(key, (m,) + shape)
        phi = jax.random.normal(jax.random.fold_in(key, 1), shape[:3] + (big_g,))
        h, w, c, g = shape
        flops = 2 * h * w * c * g * big_g * (1 if first else c)  # Eq. 7 or Eq. 5 per model.
        chunk = min(chunk_size, m)
        fwd = lambda k, p: align.align_population(k, p, first, models_per_chunk=chunk, impl=impl)
        t_fwd = bench_lib.best_time(fwd, kernels, phi, repeats=2)
        grad = jax.jit(jax.grad(lambda p, k: jnp.sum(jax.vmap(
            lambda t: align.align_layer(t, p, first, impl=impl))(k))))
        t_grad = bench_lib.best_time(grad, phi, kernels[:chunk], repeats=2) * (m / chunk)
        compiled = jax.jit(jax.vmap(lambda t, p: align.align_layer(t, p, first, impl=impl),
                                    (0, None))).lower(kernels[:chunk], phi).compile()
        mem = compiled.memory_analysis()
        chunk_mem = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                     + mem.output_size_in_bytes) if mem is not None else None
        row = {'layer': name, 'models': m, 'G': big_g, 'chunk': chunk, 'backend': backend,
               'impl': impl,
               'fwd_models_per_s': m / t_fwd, 'fwd_bwd_models_per_s': m / t_grad,
               'fwd_gflops': flops * m / t_fwd / 1e9, 'chunk_memory_bytes': chunk_mem}
        row['pct_of_matmul'] = 100 * row['fwd_gflops'] / peak if peak else float('nan')
        rows.append(row)
        print(f'{m:>5} G={big_g:<4} {name:>22} {impl:>6}: fwd {row["fwd_models_per_s"]:9.0f} models/s '
              f'({row["fwd_gflops"]:6.1f} GFLOP/s) | fwd+bwd {row["fwd_bwd_models_per_s"]:8.0f} '
              f'models/s | chunk memory {(chunk_mem or 0) / 2**20:.0f} MB', flush=True)
  bench_lib.print_table('alignment (Eq. 5-8), align_population defaults', [
      ('models', lambda r: str(r['models'])), ('G', lambda r: str(r['G'])),
      ('layer shape', lambda r: r['layer']), ('Eq. 5+6', lambda r: r['impl']),
      ('fwd models/s', lambda r: f'{r["fwd_models_per_s"]:.0f}'),
      ('fwd GFLOP/s', lambda r: f'{r["fwd_gflops"]:.1f}'),
      ('% of matmul', lambda r: f'{r["pct_of_matmul"]:.1f}'),
      ('fwd+bwd models/s', lambda r: f'{r["fwd_bwd_models_per_s"]:.0f}'),
      ('memory per chunk (MB)', lambda r: f'{(r["chunk_memory_bytes"] or 0) / 2**20:.0f}')], rows)
  return rows
