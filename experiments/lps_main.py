"""Second-order network experiments: Table 1 (task classification), Table 2 (task retrieval).

  python -m experiments.lps_main --flagfile=experiments/flags/table1.flags
  python -m experiments.lps_main --flagfile=experiments/flags/table2.flags

Trains LPS and every baseline on the same split(s), prints a markdown table with the paper's
numbers beside ours (mean ± std over --split_seeds) and writes results.json + results.md.
"""
import json
import os
import sys
import time

from absl import app, flags

flags.DEFINE_enum('mode', 'classification', ['classification', 'retrieval'],
                  'classification: Table 1 (8 train / 2 test models per task). retrieval: '
                  'Table 2 (train on 40 tasks, 2 query + 8 gallery per held-out task).')
flags.DEFINE_string('modelset', 'results/modelset_test/first_layer_kernels.npz',
                    'A model set folder (train_population workdir/modelset) or a kernels .npz.')
flags.DEFINE_list('methods', ['random', 'fc_only', 'no_align', 'lps'], 'Methods to run.')
flags.DEFINE_list('split_seeds', ['0', '1', '2'], 'Model / task splits to average over.')
flags.DEFINE_list('layer_weights', ['1'], 'w_l per conv layer (Eq. 9); missing = 0.')
flags.DEFINE_integer('num_filters', 100, 'Second-order filters G per branch.')
flags.DEFINE_integer('epochs', 100, 'Second-order training epochs.')
flags.DEFINE_integer('batch_size', 1, 'Models per step.')
flags.DEFINE_float('learning_rate', 1e-3, 'Initial learning rate.')
flags.DEFINE_list('lr_boundaries', ['40', '80'], 'Epochs after which lr is divided by 10.')
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.')
flags.DEFINE_integer('seed', 0, 'Initialisation / shuffling seed of the second-order network.')
flags.DEFINE_integer('test_tasks', 10, 'Held-out tasks in retrieval mode.')
flags.DEFINE_string('results_dir', None, 'Where to write results.json and results.md.')
FLAGS = flags.FLAGS

PAPER = {
    'classification': {'random': (2.0, 9.6, 18.3), 'fc_only': (5.3, 17.5, 29.3),
                       'no_align': (5.5, 18.3, 29.0), 'lps': (79.8, 94.8, 98.0)},
    'retrieval': {'random': (10.0, 41.0, 65.1), 'fc_only': (15.0, 55.8, 83.3),
                  'no_align': (13.3, 58.3, 80.0), 'lps': (80.7, 95.0, 95.8)},
}
LABELS = {'random': 'random prediction', 'fc_only': 'only one FC layer',
          'no_align': 'Frobenius+FC, w/o alignment', 'lps': 'Frobenius+FC, w/ alignment (LPS)'}


def markdown_table(mode, summary, command):
  import numpy as np
  keys = (['top-1', 'top-5', 'top-10'] if mode == 'classification'
          else ['rank-1', 'rank-5', 'rank-10', 'mAP'])
  paper_keys = keys[:3]
  title = 'Table 1: task classification' if mode == 'classification' else 'Table 2: task retrieval'
  lines = [f'## {title}', '', f'Command: `{command}`', '',
           '| method | ' + ' | '.join(f'{k} (%)' for k in keys) + ' | paper '
           + '/'.join(paper_keys) + ' |', '|---|' + '---|' * (len(keys) + 1)]
  for method, runs in summary.items():
    cells = []
    for k in keys:
      vals = 100 * np.asarray([r[k] for r in runs])
      cells.append(f'{vals.mean():.1f} ± {vals.std():.1f}')
    paper = PAPER[mode].get(method)
    lines.append(f'| {LABELS.get(method, method)} | ' + ' | '.join(cells) + ' | '
                 + ('/'.join(f'{p:.1f}' for p in paper) if paper else '-') + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  import numpy as np
  from tqdm import tqdm
  from lps_jax import modelset, protocols, second_order
  weights = tuple(float(w) for w in FLAGS.layer_weights)
  try:
    kernels, task_id, names = modelset.load_kernels(FLAGS.modelset, len(weights))
    missing = [names[i] for i, w in enumerate(weights) if w > 0 and kernels[i] is None]
    if missing:
      raise modelset.ModelSetError(f'{FLAGS.modelset} has no kernels for {missing}; pass the '
                                   'full model set folder instead of the exported .npz.')
  except modelset.ModelSetError as e:
    sys.exit(f'error: {e}')
  config = second_order.SecondOrderConfig(
      layer_weights=weights, num_filters=FLAGS.num_filters, epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
      lr_boundaries=tuple(int(b) for b in FLAGS.lr_boundaries), momentum=FLAGS.momentum,
      seed=FLAGS.seed)
  seeds = [int(s) for s in FLAGS.split_seeds]
  jobs = [(m, s) for m in FLAGS.methods for s in seeds]
  trained = [m for m in FLAGS.methods if m != 'random']
  bar = tqdm(total=len([j for j in jobs if j[0] != 'random']) * config.epochs,
             desc=f'{FLAGS.mode}: second-order epochs', file=sys.stderr,
             mininterval=0.5 if sys.stderr.isatty() else 30.0)
  summary, t0 = {}, time.time()
  for method, seed in jobs:
    def progress(epoch, loss, method=method, seed=seed):
      bar.set_postfix({'method': method, 'split': seed, 'loss': f'{loss:.3f}'}, refresh=False)
      bar.update(1)
    try:
      if FLAGS.mode == 'classification':
        r = protocols.run_classification(kernels, task_id, method, config, seed, progress=progress)
      else:
        r = protocols.run_retrieval(kernels, task_id, method, config, seed,
                                    test_tasks=FLAGS.test_tasks, progress=progress)
    except (ValueError, FloatingPointError) as e:
      sys.exit(f'error: {e}')
    summary.setdefault(method, []).append(dict(r, split_seed=seed))
  bar.close()
  wall = time.time() - t0
  command = 'python -m experiments.lps_main ' + ' '.join(sys.argv[1:])
  table = markdown_table(FLAGS.mode, summary, command)
  table += (f'\n{len(task_id)} models, {np.unique(task_id).size} tasks from `{FLAGS.modelset}`; '
            f'mean ± std over split seeds {seeds}; {wall:.0f} s wall time. Trained: {trained}.\n')
  print(table)
  if FLAGS.results_dir:
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with open(os.path.join(FLAGS.results_dir, 'results.json'), 'w') as f:
      json.dump({'mode': FLAGS.mode, 'command': command, 'modelset': FLAGS.modelset,
                 'config': config.__dict__, 'wall_seconds': wall, 'results': summary,
                 'paper': PAPER[FLAGS.mode]}, f, indent=1)
    with open(os.path.join(FLAGS.results_dir, 'results.md'), 'w') as f:
      f.write(table)


if __name__ == '__main__':
  app.run(main)
