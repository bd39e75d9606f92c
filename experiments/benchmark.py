"""Population training throughput per execution strategy, beside the per-model loop.

  python -m experiments.benchmark                       # CPU defaults (2 simulated devices)
  python -m experiments.benchmark --population_sizes=8,64 --num_steps=20   # e.g. on a GPU

Prints one table (images/s, model-steps/s, compile+warmup time) and writes JSON to --out.
"""
import json
import os

from absl import app, flags

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
      runs = max(1, size // 50) if size >= 50 else 1
      tasks = tuple(range(min(size, 50)))
      if size > 50:
        runs = -(-size // 50)
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
  with open(FLAGS.out, 'w') as f:
    json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)
