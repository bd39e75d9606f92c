"""Can an index say "no indexed task is close"? Leave-tasks-out calibration (lps_jax.query.open_set)
of each method's index on one model set, over several task splits (RESULTS.md, "An honest
unknown").

  python -m experiments.open_set_eval --flagfile=experiments/flags/open_set.flags

Per method: the seen held-out models' top-1 among the seen tasks, the cross-fitted false-accept
(unseen tasks named) and false-reject (seen tasks called unknown) rates at the threshold
lps_query would choose, and the whole trade-off (AUC; the false accepts when at most 10 % of the
seen are rejected, the false rejects when at most 10 % of the unseen are accepted).
"""
import os
import sys
import time

import numpy as np
from absl import flags

from experiments import flagdefs
from lps_jax.align.fit import SecondOrderConfig
from lps_jax.common import files
from lps_jax.common.checks import Range
from lps_jax.common.errors import UserError
from lps_jax.methods import registry as methods
from lps_jax.query import index, open_set
from lps_jax.query import zoo as zoo_lib

flags.DEFINE_string('modelset', 'results/modelset500', 'The model set (kernels file, model set '
                    'folder or slices folder).')
flags.DEFINE_string('stage1', '', 'A kernels file with conv layers 1-7 for methods that read '
                    'them (python -m experiments.slices --stage1 --out=FILE).')
flags.DEFINE_list('methods', ['gram', 'lps', 'chain_kernel'], 'Index methods to calibrate.')
flags.DEFINE_integer('folds', 5, 'Leave-tasks-out folds.')
flags.DEFINE_list('split_seeds', ['0', '1', '2'], 'Seeds of the task splits.')
flags.DEFINE_string('out', 'results/open_set', 'Where results.json / results.md go.')
flagdefs.input_path('modelset')
flagdefs.input_path('stage1', 'file')
flagdefs.names('methods', index.method_names(), 'index method')
flagdefs.check('folds', Range(2, integer=True))
flagdefs.check('split_seeds', Range(0, integer=True), item=int)
flagdefs.output_path('out', 'dir')
FLAGS = flags.FLAGS

COLUMNS = ('seen_top1', 'false_accept', 'false_reject', 'auc', 'false_accept_at_10_reject',
           'false_reject_at_10_accept')


def evaluate_method(name: str) -> dict:
  m = methods.get(name)
  cfg = m.config(SecondOrderConfig())
  path = FLAGS.stage1 if (FLAGS.stage1 and not m.reads_networks and m.num_layers(cfg) > 1) \
      else FLAGS.modelset
  z = zoo_lib.from_modelset(path, name, cfg)
  runs = []
  for seed in FLAGS.split_seeds:
    t0 = time.perf_counter()
    cal = open_set.calibrate(lambda k: m.estimator(cfg, k), z.inputs, z.label_of, FLAGS.folds,
                             int(seed))
    chosen = cal.rates[cal.score]
    runs.append(dict(score=cal.score, seen_top1=cal.seen_top1, seconds=time.perf_counter() - t0,
                     **{k: chosen[k] for k in COLUMNS[1:]}))
    print(f'{name} seed {seed}: {runs[-1]}', file=sys.stderr)
  return {'models': int(z.label_of.size), 'labels': len(z.labels), 'source': path, 'runs': runs,
          'mean': {k: float(np.mean([r[k] for r in runs])) for k in COLUMNS + ('seconds',)},
          'std': {k: float(np.std([r[k] for r in runs])) for k in COLUMNS}}


def markdown(results: dict, command: str) -> str:
  lines = ['## Can an index say "unknown"? (leave-tasks-out calibration)', '',
           f'Command: `{command}`', '',
           '| method | models / tasks | score | seen top-1 (%) | false accepts (%) | '
           'false rejects (%) | AUC | false accepts at ≤ 10 % rejects (%) | '
           'false rejects at ≤ 10 % accepts (%) | s per calibration |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for name, r in results.items():
    mean, std = r['mean'], r['std']
    cell = lambda k, scale=100: f'{scale * mean[k]:.1f} ± {scale * std[k]:.1f}'
    scores = '/'.join(sorted({run['score'] for run in r['runs']}))
    lines.append(f'| `{name}` | {r["models"]} / {r["labels"]} | {scores} | {cell("seen_top1")} | '
                 f'{cell("false_accept")} | {cell("false_reject")} | '
                 f'{mean["auc"]:.3f} ± {std["auc"]:.3f} | '
                 f'{cell("false_accept_at_10_reject")} | {cell("false_reject_at_10_accept")} | '
                 f'{mean["seconds"]:.0f} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  command = 'python -m experiments.open_set_eval ' + ' '.join(sys.argv[1:])
  try:
    results = {name: evaluate_method(name) for name in FLAGS.methods}
  except UserError as e:
    sys.exit(f'error: {e}')
  os.makedirs(FLAGS.out, exist_ok=True)
  files.write_json(os.path.join(FLAGS.out, 'results.json'),
                   {'command': command, 'folds': FLAGS.folds, 'results': results})
  text = markdown(results, command)
  files.write_bytes(os.path.join(FLAGS.out, 'results.md'), text.encode())
  print(text)


if __name__ == '__main__':
  flagdefs.run(main)
