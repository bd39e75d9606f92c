"""How well does a retrieval index name the task of checkpoints it has not seen: held-out models
of its own set vs models trained elsewhere (RESULTS.md, "Retrieval of checkpoints trained
elsewhere").

  python -m experiments.query_eval --foreign=runs/torch_models --out=results/query_eval

The index (`lps_jax.query.index`, as lps_query builds it) is trained on runs 0..index_runs-1 of every
task of --modelset; queried with the other runs of the set (trained here) and with every
checkpoint of --foreign (a folder of checkpoints + models.json naming each one's task, as
experiments/torch_models.py writes), read through `lps_jax.zoo.foreign_checkpoints` like any user file.
"""
import json
import os
import sys
import time

import numpy as np
from absl import flags

from experiments import flagdefs
from lps_jax.align import fit as second_order_fit
from lps_jax.common.checks import Range
from lps_jax.common.errors import UserError
from lps_jax.evaluation import metrics
from lps_jax.methods import registry as methods
from lps_jax.query import index
from lps_jax.training import modelset
from lps_jax.zoo import foreign_checkpoints as checkpoints

flags.DEFINE_string('modelset', 'results/modelset_cpu/first_layer_kernels.npz', 'Indexed set.')
flags.DEFINE_integer('index_runs', 8, 'Runs per task in the index; the rest are queries.')
flags.DEFINE_enum('method', 'lps', [n for n, m in methods.REGISTRY.items()
                                    if isinstance(m, methods.SecondOrder)],
                  'Second-order method of the index.')
flagdefs.define(second_order_fit.SecondOrderConfig, skip=('method', 'split_seed'))
flags.DEFINE_string('foreign', 'runs/torch_models', 'Folder of foreign checkpoints + models.json.')
flags.DEFINE_string('out', 'results/query_eval', 'Where to write results.json / results.md.')
flagdefs.input_path('modelset')
flagdefs.check('index_runs', Range(1, integer=True))


def _has_models_json(folder: str) -> None:
  if not os.path.isfile(os.path.join(folder, 'models.json')):
    raise UserError(f'no models.json in {folder} (experiments/torch_models.py writes one).')


flagdefs.parsed('foreign', _has_models_json)
flagdefs.output_path('out', 'dir')
FLAGS = flags.FLAGS


def _scores(probs, tasks, truth):
  y = np.searchsorted(tasks, truth)
  return {f'top-{k}': float(v) for k, v in metrics.topk_accuracy(probs, y, (1, 5)).items()}


def _weight_stats(k):
  return {'mean_abs': float(np.abs(k).mean()), 'std': float(k.std())}


def main(argv):
  del argv
  try:
    evaluate()
  except UserError as e:
    sys.exit(f'error: {e}')


def evaluate():
  t0 = time.time()
  config = flagdefs.build(second_order_fit.SecondOrderConfig, FLAGS, skip=('method', 'split_seed'))
  kernels, task_id, _, run = modelset.load_kernels(FLAGS.modelset, 1)
  inside = run < FLAGS.index_runs
  tasks = np.unique(task_id[inside])
  idx = index.build([kernels[0][inside]], [f'task {t}' for t in tasks],
                    np.searchsorted(tasks, task_id[inside]), run[inside],
                    [''] * int(inside.sum()), [''] * int(inside.sum()), FLAGS.method, config,
                    calibration_folds=0, source=FLAGS.modelset)
  held = np.flatnonzero(~inside)
  own = idx.estimator.predict([kernels[0][held]])
  rows = {'own held-out models (trained here)': (
      _scores(own, tasks, task_id[held]), held.size,
      _weight_stats(kernels[0][held]))}
  with open(os.path.join(FLAGS.foreign, 'models.json')) as f:
    meta = json.load(f)
  truth, ks = [], []
  for name, m in sorted(meta.items()):
    path = os.path.join(FLAGS.foreign, name)
    k, _ = checkpoints.conv_kernels(checkpoints.read_arrays(path), 1,
                                    checkpoints.default_layout(path), origin=path)
    index.check_kernels(idx, k, path)
    truth.append(m['task'])
    ks.append(k[0])
  foreign = np.stack(ks)
  acc = float(np.mean([m['heldout_accuracy'] for m in meta.values()]))
  rows[f'PyTorch-trained, PyTorch default init ({FLAGS.foreign})'] = (
      _scores(idx.estimator.predict([foreign]), tasks, np.asarray(truth)), len(truth),
      _weight_stats(foreign))
  chance = {'top-1': 1 / tasks.size, 'top-5': 5 / tasks.size}
  lines = ['## Naming the task of unseen checkpoints (lps_query\'s index)', '',
           f'Command: `python -m experiments.query_eval {" ".join(sys.argv[1:])}`', '',
           f'Index: `{FLAGS.method}` trained on runs 0-{FLAGS.index_runs - 1} of the '
           f'{tasks.size} tasks of `{FLAGS.modelset}`; chance top-1 '
           f'{100 * chance["top-1"]:.0f} %, top-5 {100 * chance["top-5"]:.0f} %.', '',
           '| queries | models | top-1 (%) | top-5 (%) | first-layer mean abs weight | std |',
           '|---|---|---|---|---|---|']
  for what, (s, n, w) in rows.items():
    lines.append(f'| {what} | {n} | {100 * s["top-1"]:.1f} | {100 * s["top-5"]:.1f} | '
                 f'{w["mean_abs"]:.3f} | {w["std"]:.3f} |')
  lines.append(f'\nPyTorch models\' mean held-out accuracy on their tasks: {acc:.3f}. '
               f'{time.time() - t0:.0f} s wall time.')
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'results.json'), 'w') as f:
    json.dump({'rows': {k: {'scores': s, 'models': n, 'weights': w}
                        for k, (s, n, w) in rows.items()},
               'chance': chance, 'foreign_heldout_accuracy': acc,
               'command': 'python -m experiments.query_eval ' + ' '.join(sys.argv[1:])}, f,
              indent=1)
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(FLAGS.out, 'results.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  flagdefs.run(main)
