"""Benchmark suite: how the cost of first- and second-order work grows with the work.

  python -m experiments.benchmark                                  # all suites, CPU defaults
  python -m experiments.benchmark --suites=train --configs=default # what the trainer runs here
  python -m experiments.benchmark --suites=train --population_sizes=1,8,32,128,500 \
      --configs=default,loop/lax/1,vmap/lax/1,vmap/im2col/1,vmap/lax_bf16/1     # e.g. on a GPU
  python -m experiments.benchmark --suites=torch                   # side by side with PyTorch

Suites (figures printed as markdown tables and written to --out as JSON):
  matmul   a plain large float32 matmul: the backend's reachable GFLOP/s, the yardstick;
  train    first-order training vs population size for each execution config (`default` =
           whatever `ExecutionConfig()` resolves to on this backend; else
           strategy/conv/devices[/step[/norm]]): images/s, model-steps/s, GFLOP/s (useful FLOPs from
           XLA's cost analysis of one model's step), % of the matmul, compiled step memory;
  devices  the same population on 1, 2, 4, 8 (simulated) devices (--num_cpu_devices=8);
  torch    the default config and PyTorch's per-model loop (plain and channels_last, each run in
           its own process, rounds interleaved) on the same ResNet-20 step, with their ratio;
           needs the optional `torch` package, skipped with a message otherwise;
  convs    each stride-1 3x3 conv shape of ResNet-20, forward / input grad / weight grad one at
           a time: XLA, lps-jax's oneDNN custom calls (if built) and PyTorch channels_last (if
           installed, oneDNN too), and reformulations of the
           weight gradient and forward (checked equal first): what bounds the CPU train step;
  norms    each batch norm of ResNet-20 with its ReLU / residual add, forward and forward +
           backward, one at a time: Flax / XLA, lps-jax's oneDNN calls, PyTorch channels_last;
  breakdown  one model's split train step (one device, all cores per call) and its parts timed
           alone: data (gather + augment), optimizer, every conv pass, every batch norm, the
           rest (pooling, loss, glue), one program dispatch; for each --breakdown_impls;
  align    Eq. 5-8 over a population vs population size and G: models/s forward and
           forward+backward, GFLOP/s, % of the matmul, compiled memory per chunk;
  chunks   peak resident memory of a real `train_population` run (one epoch, its own process)
           at 1x, 2x and 4x the chunk size: bounded by the chunk, not the population.
Training suites read CIFAR-100 from the offline folder (--data_dir, default $LPS_DATA_DIR).
"""
import os
import subprocess
import sys
import time

from absl import flags

from experiments import bench_kernels, bench_lib, bench_norms, flagdefs
from lps_jax.common import files

from lps_jax import align
from lps_jax.common.checks import Range
from lps_jax.training import config as train_config
from lps_jax.training import data as data_lib

SUITES = ('matmul', 'train', 'devices', 'torch', 'convs', 'norms', 'breakdown', 'align',
          'chunks')
flags.DEFINE_list('suites', ['matmul', 'train', 'devices', 'align', 'chunks'],
                  f'Which benchmarks to run, of {SUITES}.')
flags.DEFINE_list('population_sizes', ['1', '8', '32'], 'Models per chunk (train suite).')
flags.DEFINE_list('configs', ['default', 'loop/lax/1/fused', 'loop/lax/1/split', 'loop/lax/2/split',
                              'vmap/lax/1', 'unroll/lax/2', 'loop/lax_bf16/2/split'],
                  'Execution configs (train suite): default, or '
                  'strategy/conv/devices[/step[/norm]].')
flags.DEFINE_list('breakdown_impls', ['lax', 'onednn', 'onednn/onednn'],
                  'conv[/norm] impls of the breakdown suite (norm: flax unless named).')
flags.DEFINE_list('device_counts', ['1', '2', '4', '8'], 'Devices (devices suite).')
flags.DEFINE_integer('devices_population', 8, 'Population of the devices suite.')
flags.DEFINE_string('devices_config', 'default', 'Config of the devices suite (its device count '
                    'is replaced by each of --device_counts).')
flags.DEFINE_integer('batch_size', 128, 'Images per model per step.')
flags.DEFINE_integer('num_steps', 3, 'Timed steps per configuration.')
flags.DEFINE_integer('max_config_seconds', 600, 'Skip larger populations of a config once one '
                     'population took longer than this (compile + timed steps).')
flags.DEFINE_integer('norm_threads', 1, 'OpenMP threads per call in the norms suite (1: what '
                     'each of the CPU default\'s two devices gives a call on 2 cores).')
flags.DEFINE_integer('torch_models', 8, 'Models per round of the torch suite.')
flags.DEFINE_integer('torch_rounds', 3, 'Interleaved rounds of the torch suite (medians).')
flags.DEFINE_list('align_sizes', ['50', '500'], 'Population sizes (align suite).')
flags.DEFINE_list('align_filters', ['10', '100'], 'Second-order filters G (align suite).')
flags.DEFINE_integer('align_chunk', 50, 'Models aligned at once (bounds the memory).')
flags.DEFINE_list('align_impls', ['auto'], 'Eq. 5 + 6 formulations to compare for layers >= 2 '
                  '(auto, einsum, stream; see align.channel_scores).')
flags.DEFINE_list('chunk_populations', ['4', '8', '16'], 'Populations of the chunks suite.')
flags.DEFINE_integer('chunk_size', 4, 'models_per_chunk of the chunks suite.')
flags.DEFINE_integer('matmul_size', 0, 'Side of the yardstick matmul (0: 2048 on CPU, 8192 else).')
flags.DEFINE_integer('num_cpu_devices', train_config.CPU_DEVICES,
                     'Simulated host devices when on CPU (the trainer\'s default, so `default` '
                     'measures what it runs; the devices suite needs more, e.g. 8).')
flags.DEFINE_string('data_dir', data_lib.default_data_dir(),
                    f'Offline data folder (train_*.npz + test.npz); default ${data_lib.DATA_DIR_ENV}.')
flags.DEFINE_list('task_ids', None, 'Training suites: the tasks (ranges A-B) populations '
                  'draw their models from, runs as needed; default 0.. (a staged data folder '
                  'holds only its tasks: experiments.slices).')
flags.DEFINE_string('out', 'benchmark_results.json', 'Where to write the JSON figures.')
flagdefs.names('suites', SUITES, 'suite')
flagdefs.parsed('configs', lambda specs: [bench_lib.config_spec(s) for s in specs])
flagdefs.parsed('devices_config', bench_lib.config_spec)
flagdefs.parsed('breakdown_impls', lambda specs: [bench_lib.impls_spec(s) for s in specs])
flagdefs.names('align_impls', align.CHANNEL_IMPLS, 'formulation')
for _name in ('population_sizes', 'device_counts', 'align_sizes', 'align_filters',
              'chunk_populations'):
  flagdefs.check(_name, Range(1, integer=True, nonempty=True), item=int)
for _name in ('devices_population', 'batch_size', 'num_steps', 'max_config_seconds',
              'norm_threads',
              'torch_models', 'torch_rounds', 'align_chunk', 'chunk_size', 'num_cpu_devices'):
  flagdefs.check(_name, Range(1, integer=True))
flagdefs.check('matmul_size', Range(0, integer=True))
flagdefs.input_path('data_dir', 'dir', when=lambda f: f['data_dir'].present)
flagdefs.parsed('task_ids', data_lib.parse_task_ids)
flagdefs.output_path('out', 'file')
FLAGS = flags.FLAGS


def matmul_suite():
  import jax
  n = FLAGS.matmul_size or (2048 if jax.default_backend() == 'cpu' else 8192)
  row = bench_lib.matmul_gflops(n)
  print(f'matmul {n}x{n} float32: {row["gflops"]:.1f} GFLOP/s ({row["seconds"] * 1e3:.1f} ms)')
  return row


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


def _describe(size, spec, ex):
  return {'population': size, 'config': spec, 'strategy': ex.strategy, 'conv_impl': ex.conv_impl,
          'norm_impl': ex.norm_impl, 'step': ex.step, 'devices': ex.num_devices}


def _measure_train(size, spec, splits, peak):
  """One configuration; a row with 'skipped' (won't fit) or 'error' instead of crashing."""
  try:
    ex = bench_lib.parse_config(spec)
  except ValueError as e:
    return {'population': size, 'config': spec, 'error': str(e)}
  row = _describe(size, spec, ex)
  try:
    return _measure_train_or_raise(size, ex, splits, peak, row)
  except Exception as e:  # e.g. RESOURCE_EXHAUSTED from XLA: record it, keep the others.
    print(f'{size:>5} {spec:>20}  failed: {type(e).__name__}: {str(e)[:200]}', flush=True)
    return dict(row, error=f'{type(e).__name__}: {str(e)[:500]}')


def _measure_train_or_raise(size, ex, splits, peak, row):
  import jax
  t0 = time.perf_counter()
  tr = bench_lib.make_trainer(size, ex, FLAGS.batch_size, splits, _task_ids())
  cost = bench_lib.step_cost(tr)
  # Simulated CPU devices share the host's RAM; a GPU has its own.
  need = (cost['step_memory_bytes_per_device'] or 0) * (
      ex.num_devices if jax.default_backend() == 'cpu' and ex.strategy != 'loop' else 1)
  have = _available_bytes()
  if need > 0.9 * have:
    print(f'{size:>5} {row["config"]:>20}  skipped: the compiled step needs '
          f'{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available', flush=True)
    return dict(row, skipped=f'needs {need / 2**30:.1f} GiB of {have / 2**30:.1f} GiB')
  r = bench_lib.time_train_steps(tr, FLAGS.num_steps)
  r.update(cost)
  r['gflops'] = r['flops_per_model_step'] * r['model_steps_per_s'] / 1e9
  r['pct_of_matmul'] = 100 * r['gflops'] / peak if peak else float('nan')
  r.update(row, backend=jax.default_backend(), batch_size=FLAGS.batch_size,
           total_seconds=time.perf_counter() - t0)
  mem = r['step_memory_bytes_per_device']
  print(f'{size:>5} {row["config"]:>20} ({ex.strategy}/{ex.conv_impl}/{ex.num_devices}/'
        f'{ex.step}/{ex.norm_impl})  {r["images_per_s"]:9.1f} img/s  {r["model_steps_per_s"]:8.3f} model-steps/s  '
        f'{r["gflops"]:7.1f} GFLOP/s  mem/dev {mem / 2**20 if mem else float("nan"):7.0f} MB  '
        f'(compile+warmup {r["warmup_seconds"]:.1f}s)', flush=True)
  return r


_TRAIN_COLS = [
    ('population', lambda r: str(r['population'])), ('config', lambda r: r['config']),
    ('strategy', lambda r: r.get('strategy', '-')), ('conv', lambda r: r.get('conv_impl', '-')),
    ('batch norm', lambda r: r.get('norm_impl', '-')),
    ('devices / step', lambda r: f'{r.get("devices", "-")} / {r.get("step", "-")}'),
    ('images/s', lambda r: f'{r["images_per_s"]:.1f}'),
    ('model-steps/s', lambda r: f'{r["model_steps_per_s"]:.3f}'),
    ('GFLOP/s', lambda r: f'{r["gflops"]:.1f}'),
    ('% of matmul', lambda r: f'{r["pct_of_matmul"]:.1f}'),
    ('step memory/device (MB)', lambda r: f'{(r["step_memory_bytes_per_device"] or 0) / 2**20:.0f}'),
]


def _task_ids():
  return data_lib.parse_task_ids(FLAGS.task_ids) if FLAGS.task_ids else None


def _splits(size):
  try:
    return bench_lib.load_splits(FLAGS.data_dir, size, _task_ids())
  except data_lib.DataError as e:
    sys.exit(f'error: {e}')


def train_suite(peak):
  import jax
  sizes = [int(s) for s in FLAGS.population_sizes]
  splits = _splits(max(sizes))
  print(f'\ntrain: backend={jax.default_backend()} devices={len(jax.local_devices())} '
        f'batch={FLAGS.batch_size}')
  rows, slow = [], set()
  for size in sizes:
    for spec in FLAGS.configs:
      if spec in slow:
        continue
      r = _measure_train(size, spec, splits, peak)
      if r.get('total_seconds', 0) > FLAGS.max_config_seconds:
        slow.add(spec)
        print(f'  ({spec} took {r["total_seconds"]:.0f} s: larger populations skipped)')
      rows.append(r)
  for r in rows:
    base = [b for b in rows if b['population'] == r['population'] and b['config'] == 'default'
            and 'images_per_s' in b]
    r['vs_default'] = (r['images_per_s'] / base[0]['images_per_s']
                       if base and 'images_per_s' in r else None)
  bench_lib.print_table('first-order training', _TRAIN_COLS + [
      ('vs default', lambda r: f'{r["vs_default"]:.2f}x' if r['vs_default'] else '-')], rows)
  return rows


def torch_suite(peak):
  """The default config and PyTorch's per-model loop, interleaved rounds, medians and ratios."""
  import numpy as np
  if not bench_lib.torch_available():
    print('\ntorch suite skipped: PyTorch is not installed (optional extra: pip install torch).')
    return {'skipped': 'torch not installed'}
  size = FLAGS.torch_models
  splits = _splits(size)
  runs = {'lps-jax default': [], 'PyTorch': [], 'PyTorch channels_last': []}
  for i in range(FLAGS.torch_rounds):
    r = _measure_train(size, 'default', splits, peak)
    if 'images_per_s' not in r:
      raise RuntimeError(f'the default config failed: {r}')
    runs['lps-jax default'].append(r)
    for name, cl in (('PyTorch', False), ('PyTorch channels_last', True)):
      t = bench_lib.torch_images_per_s(size, FLAGS.num_steps, FLAGS.batch_size, cl)
      print(f'round {i + 1}: {name}: {t["images_per_s"]:.1f} img/s', flush=True)
      runs[name].append(t)
  median = {k: float(np.median([r['images_per_s'] for r in v])) for k, v in runs.items()}
  flops = runs['lps-jax default'][0]['flops_per_model_step']
  rows = [{'what': k, 'images_per_s': median[k], 'rounds': [r['images_per_s'] for r in v],
           'pct_of_matmul': 100 * flops * median[k] / FLAGS.batch_size / 1e9 / peak,
           'ours_vs_this': median['lps-jax default'] / median[k]} for k, v in runs.items()]
  d = runs['lps-jax default'][0]
  print(f'\n### ResNet-20 training step side by side ({size} models one after another, batch '
        f'{FLAGS.batch_size}, medians of {FLAGS.torch_rounds} interleaved rounds; default = '
        f'{d["strategy"]}/{d["conv_impl"]}/{d["devices"]} devices/{d["step"]} step/'
        f'{d.get("norm_impl", "flax")} batch norm)\n')
  print('| what | images/s (median) | rounds | % of matmul | lps-jax default / this |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["what"]} | {r["images_per_s"]:.1f} | '
          + ', '.join(f'{x:.0f}' for x in r['rounds'])
          + f' | {r["pct_of_matmul"]:.1f} | {r["ours_vs_this"]:.2f}x |')
  sys.stdout.flush()
  return {'rows': rows, 'torch': runs['PyTorch'][0].get('torch'), 'default': _describe(
      size, 'default', bench_lib.parse_config('default'))}


def devices_suite(peak):
  import jax
  size = FLAGS.devices_population
  splits = _splits(size)
  ex = bench_lib.parse_config(FLAGS.devices_config)
  spec = f'{ex.strategy}/{ex.conv_impl}/{{}}/{ex.step}/{ex.norm_impl}'
  rows = [_measure_train(size, spec.format(n), splits, peak)
          for n in map(int, FLAGS.device_counts)
          if n <= len(jax.local_devices()) and size % n == 0]
  bench_lib.print_table(f'same population ({size}) over more devices', _TRAIN_COLS, rows)
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
           f'--data_dir={FLAGS.data_dir}',
           f'--num_tasks={pop}', '--runs_per_task=1', '--epochs=1', '--batch_size=50',
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
  bench_lib.print_table('host memory vs population at a fixed chunk size', [
      ('population', lambda r: str(r['population'])), ('chunk', lambda r: str(r['chunk'])),
      ('peak RSS (MB)', lambda r: f'{r["peak_rss_mb"]:.0f}'),
      ('wall (s)', lambda r: f'{r["seconds"]:.0f}')], rows)
  return rows


def main(argv):
  del argv
  import jax
  jax.config.update('jax_num_cpu_devices', FLAGS.num_cpu_devices)
  results = {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
             'cpu_count': os.cpu_count(), 'argv': sys.argv[1:]}
  def save():  # After every suite, so a later failure never loses finished figures.
    files.write_json(FLAGS.out, results)

  results['matmul'] = matmul_suite()
  peak = results['matmul']['gflops']
  suites = [('train', lambda: train_suite(peak)), ('devices', lambda: devices_suite(peak)),
            ('torch', lambda: torch_suite(peak)),
            ('convs', lambda: bench_kernels.convs_suite(FLAGS.batch_size)),
            ('norms', lambda: bench_norms.norms_suite(FLAGS.batch_size, FLAGS.norm_threads)),
            ('breakdown', lambda: bench_kernels.breakdown_suite(FLAGS.breakdown_impls,
                                                                FLAGS.batch_size)),
            ('align', lambda: bench_kernels.align_suite(
                peak, [int(s) for s in FLAGS.align_sizes], [int(s) for s in FLAGS.align_filters],
                FLAGS.align_chunk, FLAGS.align_impls)),
            ('chunks', chunks_suite)]
  for name, run in suites:
    if name in FLAGS.suites:
      results[name] = run()
      save()
  save()
  print(f'\nwritten to {FLAGS.out}')


if __name__ == '__main__':
  flagdefs.run(main)
