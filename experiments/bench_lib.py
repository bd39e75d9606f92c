"""Measurements behind `experiments.benchmark` (one function per figure; no flags here)."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lps_jax.common.errors import UserError
from lps_jax.training import config as train_config
from lps_jax.training import data, trainer
from lps_jax.training import step as train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_time(fn, *args, repeats=3) -> float:
  """Best wall time of `fn(*args)` over `repeats` calls after one compile + warm-up call."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_gflops(n: int) -> dict:
  """The yardstick: a plain n x n float32 matmul."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  t = best_time(jax.jit(jnp.dot), a, b, repeats=5)
  return {'n': n, 'seconds': t, 'gflops': 2 * n**3 / t / 1e9, 'backend': jax.default_backend()}


def config_spec(spec: str) -> train_config.ExecutionConfig:
  """'default' or 'strategy/conv/devices[/step[/norm]]' as an ExecutionConfig, unresolved
  (checks the names and numbers only: no devices, no extension)."""
  if spec == 'default':
    return train_config.ExecutionConfig()
  parts = spec.split('/')
  if len(parts) not in (3, 4, 5) or not parts[2].isdigit():
    raise UserError(f'config {spec!r}: use default or strategy/conv/devices[/step[/norm]].')
  step, norm = (parts[3:] + ['auto', 'auto'])[:2]
  return train_config.ExecutionConfig(parts[0], parts[1], step, num_devices=int(parts[2]),
                                      norm_impl=norm)


def impls_spec(spec: str) -> tuple[str, str]:
  """'conv[/norm]' (the breakdown suite's items) as (conv impl, norm impl); norm: flax."""
  from lps_jax.training import batch_norm, resnet
  conv, _, norm = spec.partition('/')
  norm = norm or 'flax'
  if conv not in resnet.CONV_IMPLS or norm not in batch_norm.NORM_IMPLS:
    raise UserError(f'impls {spec!r}: use conv[/norm], conv one of {resnet.CONV_IMPLS}, norm '
                    f'one of {batch_norm.NORM_IMPLS}.')
  return conv, norm


def parse_config(spec: str) -> train_config.ExecutionConfig:
  """`config_spec`, resolved: what the trainer runs here for it."""
  return config_spec(spec).resolve()


def bench_tasks(size: int, task_ids=None) -> tuple[int, ...]:
  """The tasks of a benchmark population of `size` models: `task_ids`, or 0.. (<= 50)."""
  return tuple(task_ids) if task_ids else tuple(range(min(size, 50)))


def make_trainer(size: int, ex: train_config.ExecutionConfig, batch_size: int,
                 splits, task_ids=None) -> trainer.PopulationTrainer:
  """A trainer whose first chunk holds `size` ResNet-20s (tasks as `bench_tasks`, runs as
  needed)."""
  tasks = bench_tasks(size, task_ids)
  cfg = train_config.PopulationConfig(
      task_ids=tasks, runs_per_task=-(-size // len(tasks)), dataset='npz',
      train=train_config.TrainConfig(batch_size=batch_size))
  return trainer.PopulationTrainer(cfg, dataclasses.replace(ex, models_per_chunk=size), *splits)


def time_train_steps(tr: trainer.PopulationTrainer, num_steps: int, warmup: int = 1) -> dict:
  """Wall time of `num_steps` full-batch population steps of the first chunk, after
  `warmup` steps (compiles); images/s and model-steps/s."""
  chunk = tr.chunks()[0]
  _, _, host_keys, (keys, tr_idx, tr_lab, _, _) = tr.chunk_inputs(chunk)
  state = tr.population.place(tr.initial_state(host_keys))
  step = tr.step_fn(tr.config.train.batch_size)
  full_steps = tr.config.train.batch_sizes(tr.tasks.train_idx.shape[1]).count(
      tr.config.train.batch_size)
  t_compile = time.perf_counter()
  for i in range(warmup):
    state, m = step(state, keys, tr_idx, tr_lab, tr.images, np.int32(0), np.int32(i % full_steps))
  tr.population.gather(m)
  t0 = time.perf_counter()
  for i in range(num_steps):
    state, m = step(state, keys, tr_idx, tr_lab, tr.images, np.int32(1), np.int32(i % full_steps))
  tr.population.gather(state), tr.population.gather(m)
  seconds = time.perf_counter() - t0
  n = tr.chunk_size * num_steps
  return {'seconds': seconds, 'warmup_seconds': t0 - t_compile,
          'images_per_s': n * tr.config.train.batch_size / seconds,
          'model_steps_per_s': n / seconds}


def step_cost(tr: trainer.PopulationTrainer) -> dict:
  """Useful FLOPs of one model's step (XLA's cost analysis of the plain fused single-model
  step, the same whatever the strategy) and the largest compiled program's memory per device
  (arguments + outputs + temporaries)."""
  chunk = tr.chunks()[0]
  _, _, host_keys, _ = tr.chunk_inputs(chunk)
  host_state = tr.initial_state(host_keys)
  one = lambda x: jnp.asarray(np.asarray(x)[0])
  b = tr.config.train.batch_size
  t = tr.tasks
  single = (jax.tree_util.tree_map(one, host_state), one(host_keys), jnp.asarray(t.train_idx[0]),
            jnp.asarray(t.train_labels[0]), jnp.asarray(_images(tr)), np.int32(0), np.int32(0))
  # Counted on lax convs and Flax's batch norm: XLA's cost analysis sees no FLOPs inside custom
  # calls (oneDNN).
  model = dataclasses.replace(tr.model, conv_impl='lax', norm_impl='flax')
  fused = jax.jit(functools.partial(train_step.train_step, model=model, tx=tr.tx,
                                    batch_size=b, stride=b))
  cost = fused.lower(*single).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'flops_per_model_step': float(cost.get('flops', float('nan'))),
          'step_memory_bytes_per_device': _step_memory(tr, single, host_state)}


def _images(tr):
  images = tr.images
  if hasattr(images, 'copies'):  # loop layout: one copy per device.
    images = next(iter(images.copies.values()))
  return np.asarray(images)


def _memory(compiled) -> int | None:
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def _step_memory(tr, single, host_state):
  """Memory of the compiled step programs on one device (the larger of forward / backward)."""
  ex, b = tr.execution, tr.config.train.batch_size
  if ex.strategy == 'loop':
    args, stacked = single, False
  else:
    chunk = tr.chunks()[0]
    _, _, _, (keys, tr_idx, tr_lab, _, _) = tr.chunk_inputs(chunk)
    args, stacked = (tr.population.place(host_state), keys, tr_idx, tr_lab, tr.images,
                     np.int32(0), np.int32(0)), True
  step = tr.step_fn(b)
  parts = getattr(step, 'parts', (step,))
  jitted = [getattr(p, 'jitted', p) for p in parts] if len(parts) == 1 else list(parts)
  first = jitted[0].lower(*args).compile()
  sizes = [_memory(first)]
  if len(jitted) == 2:  # split: the backward takes the forward's outputs.
    vjp, batch_stats, _ = jitted[0](*args)
    with warnings.catch_warnings():  # The residuals are donated on purpose (lps_jax.training.trainer).
      warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
      sizes.append(_memory(jitted[1].lower(args[0], vjp, batch_stats).compile()))
  sizes = [s for s in sizes if s is not None]
  per_device = max(sizes) if sizes else None
  if stacked and per_device is not None:
    per_device //= len(tr.population.devices)
  return per_device


def torch_images_per_s(models: int, steps: int, batch_size: int, channels_last: bool,
                       timeout: int = 900) -> dict:
  """PyTorch's ResNet-20 step (experiments.torch_reference) in its own process."""
  cmd = [sys.executable, '-m', 'experiments.torch_reference', f'--models={models}',
         f'--steps={steps}', f'--batch_size={batch_size}'] + (['--channels_last']
                                                            if channels_last else [])
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  if r.returncode:
    raise RuntimeError(f'torch reference failed: {r.stderr[-1000:]}')
  return json.loads(r.stdout.strip().splitlines()[-1])


# Stride-1 3x3 convs of ResNet-20 by shape: (side, c_in, c_out, how many in one network). The
# stride-2 convs and 1x1 shortcuts (2 each) are left out.
RESNET20_CONVS = ((32, 3, 16, 1), (32, 16, 16, 6), (16, 32, 32, 5), (8, 64, 64, 5))


def xla_conv_ms(side: int, cin: int, cout: int, batch: int, repeats: int = 5) -> dict:
  """Milliseconds of one NHWC / HWIO conv's forward, input gradient and weight gradient as
  XLA compiles them, and of reformulations: the weight gradient as 9 shifted matmuls (no conv
  op) or as an explicit conv contracting the batch (CHWN input), the forward as im2col
  patches @ kernel. Each reformulation is checked equal to XLA's own pass first."""
  dn = ('NHWC', 'HWIO', 'NHWC')
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dn)
  kx, kk, ky = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (batch, side, side, cin))
  k = 0.1 * jax.random.normal(kk, (3, 3, cin, cout))
  dy = jax.random.normal(ky, (batch, side, side, cout))

  def shifted_matmuls(x, dy):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack([jnp.einsum('bhwc,bhwo->co', xp[:, i:i + side, j:j + side], dy)
                      for i in range(3) for j in range(3)]).reshape(3, 3, cin, cout)

  def batch_contracting_conv(x, dy):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jax.lax.conv_general_dilated(xp, dy, (1, 1), 'VALID',
                                        dimension_numbers=('CHWN', 'IHWO', 'NHWC')
                                        ).transpose(1, 2, 0, 3)

  def im2col(x, k):   # patches are channel-major: (c, i, j)
    p = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), 'SAME', dimension_numbers=dn)
    return p @ k.transpose(2, 0, 1, 3).reshape(9 * cin, cout)

  fns = {'forward': (conv, (x, k)),
         'input grad': (lambda x, k, dy: jax.vjp(lambda a: conv(a, k), x)[1](dy)[0], (x, k, dy)),
         'weight grad': (lambda x, k, dy: jax.vjp(lambda w: conv(x, w), k)[1](dy)[0], (x, k, dy)),
         'weight grad as matmuls': (shifted_matmuls, (x, dy)),
         'weight grad as batch-contracting conv': (batch_contracting_conv, (x, dy)),
         'forward as im2col': (im2col, (x, k))}
  fns = {name: (jax.jit(f), args) for name, (f, args) in fns.items()}
  for variant, of in (('weight grad as matmuls', 'weight grad'),
                      ('weight grad as batch-contracting conv', 'weight grad'),
                      ('forward as im2col', 'forward')):
    ref = np.asarray(fns[of][0](*fns[of][1]))
    np.testing.assert_allclose(fns[variant][0](*fns[variant][1]), ref, rtol=1e-3,
                               atol=1e-3 * np.abs(ref).max(), err_msg=variant)
  return {name: 1e3 * best_time(f, *args, repeats=repeats) for name, (f, args) in fns.items()}


def onednn_conv_ms(side: int, cin: int, cout: int, batch: int, repeats: int = 5) -> dict:
  """The three passes through lps-jax's oneDNN custom calls (jitted, all cores per call),
  each checked equal to XLA's first."""
  from lps_jax.training.onednn import conv as onednn_conv
  threads = len(os.sched_getaffinity(0))
  dn = ('NHWC', 'HWIO', 'NHWC')
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dn)
  ours = lambda x, k: onednn_conv.conv(x, k, 1, threads)
  kx, kk, ky = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (batch, side, side, cin))
  k = 0.1 * jax.random.normal(kk, (3, 3, cin, cout))
  dy = jax.random.normal(ky, (batch, side, side, cout))
  passes = lambda conv: {
      'forward': (conv, (x, k)),
      'input grad': (lambda x, k, dy: jax.vjp(lambda a: conv(a, k), x)[1](dy)[0], (x, k, dy)),
      'weight grad': (lambda x, k, dy: jax.vjp(lambda w: conv(x, w), k)[1](dy)[0], (x, k, dy))}
  out = {}
  for (name, (f, args)), (_, (g, _)) in zip(passes(ours).items(), passes(ref).items()):
    f = jax.jit(f)
    want = np.asarray(jax.jit(g)(*args))
    np.testing.assert_allclose(f(*args), want, rtol=1e-3, atol=1e-4 * np.abs(want).max(),
                               err_msg=f'onednn {name}')
    out[name] = 1e3 * best_time(f, *args, repeats=repeats)
  return out


def onednn_available() -> bool:
  from lps_jax.training.onednn import build
  try:
    build.library_path()
    return True
  except build.OneDNNUnavailable:
    return False


# Every conv of one ResNet-20 step: (side, c_in, c_out, kernel, stride, how many).
RESNET20_ALL_CONVS = ((32, 3, 16, 3, 1, 1), (32, 16, 16, 3, 1, 6), (32, 16, 32, 3, 2, 1),
                      (32, 16, 32, 1, 2, 1), (16, 32, 32, 3, 1, 5), (16, 32, 64, 3, 2, 1),
                      (16, 32, 64, 1, 2, 1), (8, 64, 64, 3, 1, 5))


def step_breakdown(conv_impl: str, norm_impl: str, batch: int, threads: int,
                   repeats: int = 5) -> dict:
  """Milliseconds of one model's train step (split: forward + backward programs, one device)
  and of its parts timed in isolation: the batch gather + augmentation, the optimizer update,
  every conv pass of the step (count-weighted; no input gradient for the stem), every batch
  norm with its ReLU / residual add (forward + backward), one dispatch of a program over the
  state; `rest` = step - data - optimizer - convs - batch norms (pooling, loss, what XLA adds
  between ops)."""
  from experiments import bench_norms
  from lps_jax.training import resnet
  cfg = train_config.TrainConfig(batch_size=batch)
  tx = train_step.make_optimizer(cfg, 8)
  model = resnet.ResNet(conv_impl=conv_impl, conv_threads=threads, norm_impl=norm_impl)
  key = jax.random.PRNGKey(0)
  state = train_step.init_model_state(key, resnet.ResNetConfig(), tx)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8))
  idx, labels = jnp.arange(1000, dtype=jnp.int32), jnp.asarray(rng.integers(0, 2, 1000))
  args = (key, idx, labels, images, np.int32(0), np.int32(1))
  sizes = dict(batch_size=batch, stride=batch)
  forward = jax.jit(functools.partial(train_step.forward_and_vjp, model=model, **sizes))
  backward = jax.jit(functools.partial(train_step.apply_gradients, tx=tx))
  step = lambda st: backward(st, *forward(st, *args)[:2])
  data_fn = jax.jit(functools.partial(train_step.batch, **sizes))
  def update(st):
    updates, opt = tx.update(st['params'], st['opt_state'], st['params'])
    return {'params': optax.apply_updates(st['params'], updates), 'opt_state': opt}
  out = {'step': 1e3 * best_time(step, state, repeats=repeats),
         'data (gather + augment)': 1e3 * best_time(data_fn, *args, repeats=repeats),
         'optimizer update': 1e3 * best_time(jax.jit(update), state, repeats=repeats),
         'dispatch of one program': 1e3 * best_time(jax.jit(lambda st: st), state,
                                                    repeats=repeats)}
  convs = 0.0
  for side, cin, cout, k, stride, count in RESNET20_ALL_CONVS:
    convs += count * _conv_step_ms(conv_impl, threads, side, cin, cout, k, stride, batch,
                                   input_grad=cin != 3, repeats=repeats)
  out['convs (all passes)'] = convs
  out['batch norms + ReLU / add (all passes)'] = bench_norms.step_ms(norm_impl, batch, threads,
                                                                     repeats)
  out['rest'] = (out['step'] - convs - out['batch norms + ReLU / add (all passes)']
                 - out['data (gather + augment)'] - out['optimizer update'])
  return out


def _conv_step_ms(conv_impl, threads, side, cin, cout, k, stride, batch, input_grad, repeats):
  """Forward + kernel gradient (+ input gradient) of one conv, in milliseconds."""
  from lps_jax.training import resnet
  conv = resnet.Conv(cout, k, stride, conv_impl, threads)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, side, side, cin))
  variables = conv.init(jax.random.PRNGKey(2), x)
  dy = jax.random.normal(jax.random.PRNGKey(3), conv.apply(variables, x).shape)
  def passes(v, x):
    y, vjp = jax.vjp(lambda v, x: conv.apply(v, x), v, x)
    grads = vjp(dy)
    return y, grads if input_grad else grads[0]
  return 1e3 * best_time(jax.jit(passes), variables, x, repeats=repeats)


def torch_conv_ms(side: int, cin: int, cout: int, batch: int, repeats: int = 5) -> dict:
  """The same three passes in PyTorch (channels_last, oneDNN), in this process."""
  import torch
  cl = torch.channels_last
  x = torch.randn(batch, cin, side, side).contiguous(memory_format=cl)
  k = (0.1 * torch.randn(cout, cin, 3, 3)).contiguous(memory_format=cl)
  dy = torch.randn(batch, cout, side, side).contiguous(memory_format=cl)

  def backward(mask):
    return torch.ops.aten.convolution_backward(dy, x, k, None, (1, 1), (1, 1), (1, 1), False,
                                               (0, 0), 1, mask)

  fns = {'forward': lambda: torch.nn.functional.conv2d(x, k, padding=1),
         'input grad': lambda: backward((True, False, False)),
         'weight grad': lambda: backward((False, True, False))}
  with torch.no_grad():
    return {name: best_call_ms(f, repeats) for name, f in fns.items()}


def best_call_ms(fn, repeats: int) -> float:
  """Best of `repeats` wall times of `fn()` after one warm-up call, in ms (eager code: PyTorch)."""
  fn()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return 1e3 * best


def torch_available() -> bool:
  import importlib.util
  return importlib.util.find_spec('torch') is not None


def load_splits(data_dir, size: int, task_ids=None):
  """Train / held-out splits with the classes of a population of `size` models."""
  return data.load('npz', data_dir, classes=data.task_classes(bench_tasks(size, task_ids)))


def print_table(title, cols, rows):
  """A markdown table of `rows` under `title`; `cols` are (header, row -> str); a row that
  was skipped or failed prints its reason after the first five columns."""
  print(f'\n### {title}\n')
  print('| ' + ' | '.join(c for c, _ in cols) + ' |')
  print('|' + '---|' * len(cols))
  for r in rows:
    if 'images_per_s' not in r and ('skipped' in r or 'error' in r):
      why = r.get('skipped') or r.get('error')
      print('| ' + ' | '.join(fmt(r) for _, fmt in cols[:5]) + f' | {why[:80]} |'
            + ' |' * (len(cols) - 6))
      continue
    print('| ' + ' | '.join(fmt(r) for _, fmt in cols) + ' |')
  sys.stdout.flush()
