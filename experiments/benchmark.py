"""Benchmarks: population training per execution strategy, and LPS alignment throughput.

  python -m experiments.benchmark --suites=train           # CPU defaults (2 simulated devices)
  python -m experiments.benchmark --suites=align --align_models=500 --num_filters=100
  python -m experiments.benchmark --population_sizes=8,64 --num_steps=20   # e.g. on a GPU

Prints tables (training: images/s, model-steps/s beside the per-model loop; align: models/s,
GFLOP/s and compiled peak memory per layer shape, vmapped + chunked vs a per-model loop) and
writes JSON to --out.
"""
import json
import time

from absl import app, flags

flags.DEFINE_list('suites', ['train', 'align'], 'Which benchmarks to run.')
flags.DEFINE_integer('align_models', 500, 'Population size of the align benchmark.')
flags.DEFINE_integer('num_filters', 100, 'Second-order filters G in the align benchmark.')
flags.DEFINE_integer('align_chunk', 50, 'Models aligned at once (bounds the (g,G,c,c) memory).')
flags.DEFINE_list('population_sizes', ['2', '4'], 'Models trained together (per chunk).')
flags.DEFINE_list('configs', ['loop/lax/1', 'vmap/lax/1', 'vmap/im2col/1', 'unroll/lax/1',
                              'unroll/lax/2', 'vmap/im2col/2'],
                  'strategy/conv_impl/num_devices to measure.')
flags.DEFINE_integer('batch_size', 128, 'Images per model per step.')
flags.DEFINE_integer('num_steps', 3, 'Timed steps per configuration.')
flags.DEFINE_integer('num_cpu_devices', 2, 'Simulated host devices when on CPU.')
flags.DEFINE_string('out', 'benchmark_results.json', 'Where to write the JSON figures.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  jax.config.update('jax_num_cpu_devices', FLAGS.num_cpu_devices)
  results = {}
  if 'train' in FLAGS.suites:
    results['train'] = train_suite()
  if 'align' in FLAGS.suites:
    results['align'] = align_suite()
  with open(FLAGS.out, 'w') as f:
    json.dump(results, f, indent=1)


def _time(fn, *args, repeats=3):
  import jax
  jax.block_until_ready(fn(*args))  # Compile + warm up.
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def align_suite():
  """Aligns a population's kernels of each ResNet-20 layer shape against G filters."""
  import jax
  import jax.numpy as jnp
  from lps_jax import align
  m, G = FLAGS.align_models, FLAGS.num_filters
  shapes = [('conv1 (layer 1)', (3, 3, 3, 16), True), ('16->16 (layers 2-7)', (3, 3, 16, 16), False),
            ('32->32 (layers 9-13)', (3, 3, 32, 32), False),
            ('64->64 (layers 15-19)', (3, 3, 64, 64), False)]
  rows = []
  print(f'\nalign: {m} models, G={G}, chunk={FLAGS.align_chunk}, backend={jax.default_backend()}')
  for name, shape, first in shapes:
    key = jax.random.PRNGKey(0)
    kernels = jax.random.normal(key, (m,) + shape)
    phi = jax.random.normal(jax.random.fold_in(key, 1), shape[:3] + (G,))
    h, w, c, g = shape
    flops = 2 * h * w * c * g * G * (1 if first else c)  # Eq. 7 or Eq. 5 per model.
    chunk = min(FLAGS.align_chunk, m)
    vm = lambda k, p: align.align_population(k, p, first, models_per_chunk=chunk, strategy='vmap')
    t_vmap = _time(vm, kernels, phi)
    compiled = jax.jit(jax.vmap(lambda t, p: align.align_layer(t, p, first), (0, None))).lower(
        kernels[:chunk], phi).compile()
    mem = compiled.memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            if mem is not None else float('nan'))
    loop = lambda k, p: align.align_population(k, p, first, strategy='loop')
    t_loop = _time(loop, kernels, phi, repeats=1)
    grad = jax.jit(jax.grad(lambda p, k: jnp.sum(jax.vmap(
        lambda t: align.align_layer(t, p, first))(k))))
    t_grad = _time(grad, phi, kernels[:chunk]) * (m / chunk)
    row = {'layer': name, 'models': m, 'G': G, 'chunk': chunk,
           'vmap_models_per_s': m / t_vmap, 'loop_models_per_s': m / t_loop,
           'vmap_gflops': flops * m / t_vmap / 1e9, 'loop_gflops': flops * m / t_loop / 1e9,
           'fwd_bwd_models_per_s': m / t_grad, 'chunk_peak_mb': peak / 2**20,
           'backend': jax.default_backend()}
    rows.append(row)
    print(f'{name:>22}: vmap {row["vmap_models_per_s"]:9.0f} models/s '
          f'({row["vmap_gflops"]:6.1f} GFLOP/s) | loop {row["loop_models_per_s"]:8.0f} models/s '
          f'({row["loop_gflops"]:6.1f} GFLOP/s) | fwd+bwd {row["fwd_bwd_models_per_s"]:8.0f} '
          f'models/s | chunk peak {row["chunk_peak_mb"]:.0f} MB', flush=True)
  print('\n| layer shape | vmap models/s | vmap GFLOP/s | loop models/s | loop GFLOP/s | '
        'vmap/loop | fwd+bwd models/s | peak MB per chunk |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["layer"]} | {r["vmap_models_per_s"]:.0f} | {r["vmap_gflops"]:.1f} | '
          f'{r["loop_models_per_s"]:.0f} | {r["loop_gflops"]:.1f} | '
          f'{r["vmap_models_per_s"] / r["loop_models_per_s"]:.1f}x | '
          f'{r["fwd_bwd_models_per_s"]:.0f} | {r["chunk_peak_mb"]:.0f} |')
  return rows


def train_suite():
  import jax
  from lps_jax import data, population
  split = data.load_npz()
  rows = []
  backend = jax.default_backend()
  print(f'backend={backend} devices={len(jax.local_devices())} batch={FLAGS.batch_size}')
  for size in map(int, FLAGS.population_sizes):
    for spec in FLAGS.configs:
      strategy, conv_impl, n_dev = spec.split('/')
      n_dev = int(n_dev)
      if n_dev > len(jax.local_devices()) or size % n_dev:
        continue
      tasks = tuple(range(min(size, 50)))
      runs = -(-size // len(tasks))  # Enough models for one chunk of `size`.
      cfg = population.PopulationConfig(
          task_ids=tasks, runs_per_task=runs, dataset='npz',
          train=population.TrainConfig(batch_size=FLAGS.batch_size))
      ex = population.ExecutionConfig(strategy, conv_impl, size, n_dev)
      trainer = population.PopulationTrainer(cfg, ex, split)
      r = population.time_train_steps(trainer, FLAGS.num_steps)
      r.update(population=size, strategy=strategy, conv_impl=conv_impl, devices=n_dev,
               backend=backend, batch_size=FLAGS.batch_size)
      rows.append(r)
      print(f'{size:>5} {strategy:>7} {conv_impl:>7} dev={n_dev}  '
            f'{r["images_per_s"]:9.1f} img/s  {r["model_steps_per_s"]:8.2f} model-steps/s  '
            f'warmup {r["warmup_seconds"]:.1f}s', flush=True)
  print('\n| population | strategy | conv | devices | images/s | model-steps/s | vs loop |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    base = [b for b in rows if b['population'] == r['population'] and b['strategy'] == 'loop']
    rel = f'{r["images_per_s"] / base[0]["images_per_s"]:.2f}x' if base else '-'
    print(f'| {r["population"]} | {r["strategy"]} | {r["conv_impl"]} | {r["devices"]} | '
          f'{r["images_per_s"]:.1f} | {r["model_steps_per_s"]:.2f} | {rel} |')
  return rows


if __name__ == '__main__':
  app.run(main)
