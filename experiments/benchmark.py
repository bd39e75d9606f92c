"""Benchmark suite: how the cost of first- and second-order work grows with the work.

  python -m experiments.benchmark                                  # all suites, CPU defaults
  python -m experiments.benchmark --suites=train --population_sizes=1,8,32,128,500 \
      --configs=loop/lax/1,vmap/lax/1,vmap/im2col/1,vmap/lax_bf16/1     # e.g. on a GPU

Suites (figures printed as markdown tables and written to --out as JSON):
  matmul   a plain large float32 matmul: the backend's reachable GFLOP/s, the yardstick;
  train    first-order training vs population size for each strategy/conv/devices config, the
           per-model loop included: images/s, model-steps/s, GFLOP/s (useful FLOPs from XLA's
           cost analysis of one model's step), % of the matmul, compiled step memory per device;
  devices  the same population on 1, 2, 4, 8 (simulated) devices;
  align    Eq. 5-8 over a population vs population size and G: models/s forward and
           forward+backward, GFLOP/s, % of the matmul, compiled memory per chunk;
  chunks   peak resident memory of a real `train_population` run (one epoch, its own process)
           at 1x, 2x and 4x the chunk size: bounded by the chunk, not the population.
"""
import json
import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list('suites', ['matmul', 'train', 'devices', 'align', 'chunks'],
                  'Which benchmarks to run.')
flags.DEFINE_list('population_sizes', ['1', '8', '32'], 'Models per chunk (train suite).')
flags.DEFINE_list('configs', ['loop/lax/1', 'vmap/lax/1', 'vmap/im2col/1', 'unroll/lax/1',
                              'unroll/lax/2', 'unroll/im2col/2', 'unroll/lax_bf16/2'],
                  'strategy/conv_impl/num_devices to measure (train suite).')
flags.DEFINE_list('device_counts', ['1', '2', '4', '8'], 'Devices (devices suite).')
flags.DEFINE_integer('devices_population', 8, 'Population of the devices suite.')
flags.DEFINE_string('devices_config', 'unroll/lax', 'strategy/conv of the devices suite.')
flags.DEFINE_integer('batch_size', 128, 'Images per model per step.')
flags.DEFINE_integer('num_steps', 3, 'Timed steps per configuration.')
flags.DEFINE_integer('max_config_seconds', 600, 'Skip larger populations of a config once one '
                     'population took longer than this (compile + timed steps).')
flags.DEFINE_list('align_sizes', ['50', '500'], 'Population sizes (align suite).')
flags.DEFINE_list('align_filters', ['10', '100'], 'Second-order filters G (align suite).')
flags.DEFINE_integer('align_chunk', 50, 'Models aligned at once (bounds the memory).')
flags.DEFINE_list('align_impls', ['auto'], 'Eq. 5 + 6 formulations to compare for layers >= 2 '
                  '(auto, einsum, stream; see align.channel_scores).')
flags.DEFINE_list('chunk_populations', ['4', '8', '16'], 'Populations of the chunks suite.')
flags.DEFINE_integer('chunk_size', 4, 'models_per_chunk of the chunks suite.')
flags.DEFINE_integer('matmul_size', 0, 'Side of the yardstick matmul (0: 2048 on CPU, 8192 else).')
flags.DEFINE_integer('num_cpu_devices', 8, 'Simulated host devices when on CPU.')
flags.DEFINE_string('out', 'benchmark_results.json', 'Where to write the JSON figures.')
FLAGS = flags.FLAGS


def _time(fn, *args, repeats=3):
  import jax
  jax.block_until_ready(fn(*args))  # Compile + warm up.
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def _table(title, cols, rows):
  print(f'\n### {title}\n')
  print('| ' + ' | '.join(c for c, _ in cols) + ' |')
  print('|' + '---|' * len(cols))
  for r in rows:
    if 'images_per_s' not in r and ('skipped' in r or 'error' in r):
      why = r.get('skipped') or r.get('error')
      print('| ' + ' | '.join(fmt(r) for _, fmt in cols[:4]) + f' | {why[:80]} |'
            + ' |' * (len(cols) - 5))
      continue
    print('| ' + ' | '.join(fmt(r) for _, fmt in cols) + ' |')
  sys.stdout.flush()


def matmul_suite():
  import jax
  import jax.numpy as jnp
  n = FLAGS.matmul_size or (2048 if jax.default_backend() == 'cpu' else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  t = _time(jax.jit(jnp.dot), a, b, repeats=5)
  row = {'n': n, 'seconds': t, 'gflops': 2 * n**3 / t / 1e9, 'backend': jax.default_backend()}
  print(f'matmul {n}x{n} float32: {row["gflops"]:.1f} GFLOP/s ({t * 1e3:.1f} ms)')
  return row


def _trainer(size, strategy, conv_impl, n_dev, split):
  from lps_jax import population
  tasks = tuple(range(min(size, 50)))
  runs = -(-size // len(tasks))  # Enough models for one chunk of `size`.
  cfg = population.PopulationConfig(task_ids=tasks, runs_per_task=runs, dataset='npz',
                                    train=population.TrainConfig(batch_size=FLAGS.batch_size))
  ex = population.ExecutionConfig(strategy, conv_impl, size, n_dev)
  return population.PopulationTrainer(cfg, ex, split)


def _available_bytes():
  """Memory the compiled step may use: the GPU's limit, or the host's available RAM on CPU."""
  import jax
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  with open('/proc/meminfo') as f:
    info = dict(line.split(':', 1) for line in f)
  return int(info['MemAvailable'].split()[0]) * 1024


def _measure_train(size, strategy, conv_impl, n_dev, split, peak):
  """One configuration; a row with 'skipped' (won't fit) or 'error' instead of crashing."""
  try:
    return _measure_train_or_raise(size, strategy, conv_impl, n_dev, split, peak)
  except Exception as e:  # e.g. RESOURCE_EXHAUSTED from XLA: record it, keep the others.
    print(f'{size:>5} {strategy:>7} {conv_impl:>9} dev={n_dev}  failed: {type(e).__name__}: '
          f'{str(e)[:200]}', flush=True)
    return {'population': size, 'strategy': strategy, 'conv_impl': conv_impl, 'devices': n_dev,
            'error': f'{type(e).__name__}: {str(e)[:500]}'}


def _measure_train_or_raise(size, strategy, conv_impl, n_dev, split, peak):
  import jax
  from lps_jax import population
  t0 = time.perf_counter()
  trainer = _trainer(size, strategy, conv_impl, n_dev, split)
  cost = population.step_cost(trainer)
  # Simulated CPU devices share the host's RAM; a GPU has its own.
  need = (cost['step_memory_bytes_per_device'] or 0) * (
      n_dev if jax.default_backend() == 'cpu' else 1)
  have = _available_bytes()
  if need > 0.9 * have:
    print(f'{size:>5} {strategy:>7} {conv_impl:>9} dev={n_dev}  skipped: the compiled step '
          f'needs {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available', flush=True)
    return {'population': size, 'strategy': strategy, 'conv_impl': conv_impl, 'devices': n_dev,
            'skipped': f'needs {need / 2**30:.1f} GiB of {have / 2**30:.1f} GiB'}
  r = population.time_train_steps(trainer, FLAGS.num_steps)
  r.update(cost)
  r['gflops'] = r['flops_per_model_step'] * r['model_steps_per_s'] / 1e9
  r['pct_of_matmul'] = 100 * r['gflops'] / peak if peak else float('nan')
  r.update(population=size, strategy=strategy, conv_impl=conv_impl, devices=n_dev,
           backend=jax.default_backend(), batch_size=FLAGS.batch_size,
           total_seconds=time.perf_counter() - t0)
  mem = r['step_memory_bytes_per_device']
  print(f'{size:>5} {strategy:>7} {conv_impl:>9} dev={n_dev}  {r["images_per_s"]:9.1f} img/s  '
        f'{r["model_steps_per_s"]:8.3f} model-steps/s  {r["gflops"]:7.1f} GFLOP/s  '
        f'mem/dev {mem / 2**20 if mem else float("nan"):7.0f} MB  '
        f'(compile+warmup {r["warmup_seconds"]:.1f}s)', flush=True)
  return r


_TRAIN_COLS = [
    ('population', lambda r: str(r['population'])), ('strategy', lambda r: r['strategy']),
    ('conv', lambda r: r['conv_impl']), ('devices', lambda r: str(r['devices'])),
    ('images/s', lambda r: f'{r["images_per_s"]:.1f}'),
    ('model-steps/s', lambda r: f'{r["model_steps_per_s"]:.3f}'),
    ('GFLOP/s', lambda r: f'{r["gflops"]:.1f}'),
    ('% of matmul', lambda r: f'{r["pct_of_matmul"]:.1f}'),
    ('step memory/device (MB)', lambda r: f'{(r["step_memory_bytes_per_device"] or 0) / 2**20:.0f}'),
]


def train_suite(peak):
  import jax
  from lps_jax import data
  split = data.load_npz()
  print(f'\ntrain: backend={jax.default_backend()} devices={len(jax.local_devices())} '
        f'batch={FLAGS.batch_size}')
  rows, slow = [], set()
  for size in map(int, FLAGS.population_sizes):
    for spec in FLAGS.configs:
      strategy, conv_impl, n_dev = spec.split('/')
      n_dev = int(n_dev)
      if n_dev > len(jax.local_devices()) or size % n_dev or spec in slow:
        continue
      r = _measure_train(size, strategy, conv_impl, n_dev, split, peak)
      if r.get('total_seconds', 0) > FLAGS.max_config_seconds:
        slow.add(spec)
        print(f'  ({spec} took {r["total_seconds"]:.0f} s: larger populations skipped)')
      rows.append(r)
  for r in rows:
    base = [b for b in rows if b['population'] == r['population'] and b['strategy'] == 'loop'
            and 'images_per_s' in b]
    r['vs_loop'] = (r['images_per_s'] / base[0]['images_per_s']
                    if base and 'images_per_s' in r else None)
  _table('first-order training', _TRAIN_COLS + [
      ('vs loop', lambda r: f'{r["vs_loop"]:.2f}x' if r['vs_loop'] else '-')], rows)
  return rows


def devices_suite(peak):
  import jax
  from lps_jax import data
  split = data.load_npz()
  strategy, conv_impl = FLAGS.devices_config.split('/')
  size = FLAGS.devices_population
  rows = [_measure_train(size, strategy, conv_impl, n, split, peak)
          for n in map(int, FLAGS.device_counts)
          if n <= len(jax.local_devices()) and size % n == 0]
  _table(f'same population ({size}) over more devices', _TRAIN_COLS, rows)
  return rows


def align_suite(peak):
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
  print(f'\nalign: backend={backend}, chunk={FLAGS.align_chunk}')
  for m in map(int, FLAGS.align_sizes):
    for big_g in map(int, FLAGS.align_filters):
      for (name, shape, first), impl in [(sh, i) for sh in shapes for i in
                                         (['auto'] if sh[2] else FLAGS.align_impls)]:
        key = jax.random.PRNGKey(0)
        kernels = jax.random.normal(key, (m,) + shape)
        phi = jax.random.normal(jax.random.fold_in(key, 1), shape[:3] + (big_g,))
        h, w, c, g = shape
        flops = 2 * h * w * c * g * big_g * (1 if first else c)  # Eq. 7 or Eq. 5 per model.
        chunk = min(FLAGS.align_chunk, m)
        fwd = lambda k, p: align.align_population(k, p, first, models_per_chunk=chunk, impl=impl)
        t_fwd = _time(fwd, kernels, phi, repeats=2)
        grad = jax.jit(jax.grad(lambda p, k: jnp.sum(jax.vmap(
            lambda t: align.align_layer(t, p, first, impl=impl))(k))))
        t_grad = _time(grad, phi, kernels[:chunk], repeats=2) * (m / chunk)
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
  _table('alignment (Eq. 5-8), align_population defaults', [
      ('models', lambda r: str(r['models'])), ('G', lambda r: str(r['G'])),
      ('layer shape', lambda r: r['layer']), ('Eq. 5+6', lambda r: r['impl']),
      ('fwd models/s', lambda r: f'{r["fwd_models_per_s"]:.0f}'),
      ('fwd GFLOP/s', lambda r: f'{r["fwd_gflops"]:.1f}'),
      ('% of matmul', lambda r: f'{r["pct_of_matmul"]:.1f}'),
      ('fwd+bwd models/s', lambda r: f'{r["fwd_bwd_models_per_s"]:.0f}'),
      ('memory per chunk (MB)', lambda r: f'{(r["chunk_memory_bytes"] or 0) / 2**20:.0f}')], rows)
  return rows


def chunks_suite():
  """Peak RSS of `train_population` (1 epoch, own process) as the population grows."""
  import jax
  rows = []
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for pop in map(int, FLAGS.chunk_populations):
    workdir = os.path.join('/tmp', f'lps_bench_chunks_{os.getpid()}_{pop}')
    # The child reports its own high-water RSS (VmHWM): rusage's maxrss would carry this
    # (large) process's peak over into the child.
    child = ('import runpy, sys\n'
             'sys.argv = ["train_population"] + sys.argv[1:]\n'
             'try:\n'
             '  runpy.run_module("experiments.train_population", run_name="__main__")\n'
             'finally:\n'
             '  hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]\n'
             '  sys.stderr.write("VMHWM_KB=" + hwm.split()[1] + "\\n")\n')
    cmd = [sys.executable, '-c', child, '--dataset=npz',
           f'--num_tasks={pop}', '--runs_per_task=1', '--epochs=1', '--batch_size=32',
           f'--models_per_chunk={FLAGS.chunk_size}', '--checkpoint_every=1', '--noprogress',
           f'--workdir={workdir}', '--num_cpu_devices=2',
           f'--num_devices={2 if jax.default_backend() == "cpu" else 1}']
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    subprocess.run(['rm', '-rf', workdir])
    hwm = [l for l in proc.stderr.splitlines() if l.startswith('VMHWM_KB=')]
    if proc.returncode or not hwm:
      raise RuntimeError(f'chunks suite run failed: {proc.stderr[-2000:]}')
    row = {'population': pop, 'chunk': FLAGS.chunk_size,
           'peak_rss_mb': int(hwm[-1].split('=')[1]) / 1024,
           'seconds': time.perf_counter() - t0}
    rows.append(row)
    print(f'population {pop:>4} (chunks of {FLAGS.chunk_size}): peak RSS '
          f'{row["peak_rss_mb"]:.0f} MB, {row["seconds"]:.0f} s', flush=True)
  _table('host memory vs population at a fixed chunk size', [
      ('population', lambda r: str(r['population'])), ('chunk', lambda r: str(r['chunk'])),
      ('peak RSS (MB)', lambda r: f'{r["peak_rss_mb"]:.0f}'),
      ('wall (s)', lambda r: f'{r["seconds"]:.0f}')], rows)
  return rows


def main(argv):
  del argv
  import jax
  jax.config.update('jax_num_cpu_devices', FLAGS.num_cpu_devices)
  unknown = set(FLAGS.suites) - {'matmul', 'train', 'devices', 'align', 'chunks'}
  if unknown:
    sys.exit(f'error: unknown suites {sorted(unknown)}.')
  results = {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
             'cpu_count': os.cpu_count(), 'argv': sys.argv[1:]}
  def save():  # After every suite, so a later failure never loses finished figures.
    tmp = FLAGS.out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(results, f, indent=1)
    os.replace(tmp, FLAGS.out)

  results['matmul'] = matmul_suite()
  peak = results['matmul']['gflops']
  suites = [('train', lambda: train_suite(peak)), ('devices', lambda: devices_suite(peak)),
            ('align', lambda: align_suite(peak)), ('chunks', chunks_suite)]
  for name, run in suites:
    if name in FLAGS.suites:
      results[name] = run()
      save()
  save()
  print(f'\nwritten to {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
