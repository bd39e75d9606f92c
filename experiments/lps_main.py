"""Second-order network experiments (Sec. 5): one mode per table / figure (experiments.lps_modes).

  python -m experiments.lps_main --flagfile=experiments/flags/table1.flags     # Table 1
  python -m experiments.lps_main --flagfile=experiments/flags/table2.flags     # Table 2
  python -m experiments.lps_main --flagfile=experiments/flags/fig3a.flags      # transferability
  python -m experiments.lps_main --flagfile=experiments/flags/fig3b.flags      # per branch
  python -m experiments.lps_main --flagfile=experiments/flags/fig3c.flags      # alignment ablation

Each run writes results.json, results.md (and a PNG for the figures) into --results_dir, which
is tied to the run's configuration (a different configuration is refused, never overwritten).
Trained second-order networks and transfer features go to a content-addressed --cache_dir, so a
rerun, or another experiment needing the same network, reuses them. --replot redraws the
table / figure of a finished run from its results.json. The second-order recipe flags come from
`lps_jax.align.fit.SecondOrderConfig` (defaults = the paper's).
"""
import dataclasses
import os
import sys
import time

from absl import flags

from experiments import flagdefs, lps_modes, lps_render
from lps_jax.align import fit as second_order_fit
from lps_jax.common.checks import Range
from lps_jax.common.errors import UserError
from lps_jax.methods import registry as methods
from lps_jax.training import data as data_lib

flags.DEFINE_enum('mode', 'classification', list(lps_modes.MODES),
                  ' '.join(f'{m.name}: {m.help}' for m in lps_modes.MODES.values()))
flags.DEFINE_string('modelset', 'results/modelset_cpu/first_layer_kernels.npz',
                    'A model set folder (train_population workdir/modelset), a folder of '
                    'ModelSet500 slices (results/modelset500: the models its slices keep whole, '
                    'tasks 12 on) or a kernels .npz (first layer only: enough for Tables 1-2, '
                    'not for the figures).')
flags.DEFINE_list('methods', list(methods.PAPER_METHODS),
                  'Methods of the classification / retrieval modes: '
                  + ', '.join(methods.REGISTRY) + '.')
flags.DEFINE_list('split_seeds', ['0', '1', '2'], 'Model / task splits to average over.')
flags.DEFINE_list('branches', None, '1-based branches (conv layers) for the branches / alignment '
                  'modes; default all (1..19), or 2..19 for alignment.')
flags.DEFINE_list('branch_methods', ['lps'], 'Branches mode: what reads each branch: lps (the '
                  "paper's Eq. 5-8) and/or wn_branch (Frobenius + FC by index on whole-network "
                  'aligned kernels, no sort; needs the model set folder).')
flagdefs.define(second_order_fit.SecondOrderConfig, skip=('method', 'split_seed'))
flags.DEFINE_integer('test_tasks', 10, 'Held-out tasks (retrieval and transfer modes).')
flags.DEFINE_enum('dataset', 'npz', ['npz', 'tfds'],
                  'Images clustered in transfer mode (the target tasks\' test-split images): '
                  'test.npz of the offline folder (--data_dir), or tfds.')
flags.DEFINE_string('data_dir', None, 'Offline data folder (train_*.npz + test.npz); default '
                    '$LPS_DATA_DIR.')
flags.DEFINE_string('tfds_data_dir', None, 'tensorflow-datasets data_dir.')
flags.DEFINE_integer('num_permutations', 10000, 'Permutation-test draws (transfer mode).')
flags.DEFINE_string('compare_modelset', None, 'Tables 1-2: also run the same methods and splits '
                    'on this model set, restricted to the tasks of --modelset, and print it '
                    'beside (e.g. the CPU yardstick beside a partial ModelSet500).')
flags.DEFINE_list('task_ids', None, 'Tables 1-2: only the models of these tasks (ids or ranges '
                  'A-B), e.g. the tasks a --compare_modelset holds; default every task.')
flags.DEFINE_string('other_modelset', None, 'Cross mode: model set of another architecture '
                    '(e.g. runs/modelset_wide_cpu/modelset) whose tasks the methods name.')
flags.DEFINE_string('results_dir', None, 'Where to write results.json, results.md and plots.')
flags.DEFINE_string('cache_dir', 'runs/lps_cache', 'Content-addressed store of finished work '
                    '(trained second-order nets, transfer ARIs); empty = no cache.')
flags.DEFINE_bool('replot', False, 'Only redraw results.md / the PNG from --results_dir.')
flagdefs.input_path('modelset', hint='A model set folder comes from train_population (e.g. '
                    '--flagfile=experiments/flags/modelset_cpu.flags, ~1 h on 2 cores); the '
                    'tables also take a kernels .npz from results/.')
flagdefs.input_path('compare_modelset', hint='A model set folder comes from train_population; a '
                    'flagfile that compares with one says in its header how to train it.')
flagdefs.input_path('other_modelset', when=lambda f: f.mode == 'cross')
flagdefs.names('methods', list(methods.REGISTRY), 'method')
flagdefs.names('branch_methods', list(lps_render.BRANCH_METHODS), 'branch method')
flagdefs.check('split_seeds', Range(0, integer=True, nonempty=True), item=int)
flagdefs.parsed('task_ids', data_lib.parse_task_ids)
flagdefs.check('branches', Range(1, integer=True), item=int)
for _name in ('test_tasks', 'num_permutations'):
  flagdefs.check(_name, Range(1, integer=True))
flagdefs.input_path('data_dir', 'dir', when=lambda f: f.dataset == 'npz')
flagdefs.input_path('tfds_data_dir', 'dir', must_exist=False)
flagdefs.output_path('results_dir', 'dir', when=lambda f: not f.replot)
flagdefs.input_path('results_dir', 'dir', when=lambda f: f.replot)
flagdefs.output_path('cache_dir', 'dir')
FLAGS = flags.FLAGS

# Flags that determine the results besides the SecondOrderConfig (a results folder holds one
# configuration).
RUN_FLAGS = ('mode', 'modelset', 'methods', 'branch_methods', 'split_seeds', 'branches',
             'test_tasks', 'dataset',
             'num_permutations', 'compare_modelset', 'other_modelset')


def _bar(total, desc):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 30.0)


def _progress(bar):
  state = {'last': 0}

  def progress(epoch, loss):  # Epochs 1..E of each fit, or (E, None) for a cached one.
    if epoch <= state['last']:
      state['last'] = 0
    bar.update(epoch - state['last'])
    state['last'] = epoch
    if loss is not None:
      bar.set_postfix({'loss': f'{loss:.3f}'}, refresh=False)
  return progress


def replot():
  from lps_jax.evaluation import results
  if not FLAGS.results_dir:
    sys.exit('error: --replot needs --results_dir.')
  try:
    res = results.read_results(FLAGS.results_dir, FLAGS.mode)
  except results.ResultsError as e:
    sys.exit(f'error: {e}')
  text = lps_modes.render(res, FLAGS.results_dir)
  with open(os.path.join(FLAGS.results_dir, 'results.md'), 'w') as f:
    f.write(text)
  print(text)


def _only_tasks(mode, kernels, task_id):
  """--task_ids: the models of those tasks, or one line naming what is missing."""
  import numpy as np
  if not mode.takes_methods:
    raise UserError(f'--task_ids is for the tables; {mode.name} mode reads the whole set.')
  return lps_modes.restrict(kernels, task_id, data_lib.parse_task_ids(FLAGS.task_ids),
                            FLAGS.modelset, why=f'which --task_ids names; it holds tasks '
                            f'{np.unique(task_id).tolist()}')


def main(argv):
  del argv
  import numpy as np
  from lps_jax.common import cache as cache_lib
  from lps_jax.evaluation import results

  if FLAGS.replot:
    return replot()
  command = 'python -m experiments.lps_main ' + ' '.join(sys.argv[1:])
  mode = lps_modes.MODES[FLAGS.mode]
  try:
    config = flagdefs.build(second_order_fit.SecondOrderConfig, FLAGS,
                            skip=('method', 'split_seed'))
    branches = [int(b) for b in FLAGS.branches] if FLAGS.branches else None
    images = lps_modes.test_split_loader(FLAGS.dataset, FLAGS.data_dir, FLAGS.tfds_data_dir)
    cache = cache_lib.Cache(FLAGS.cache_dir) if FLAGS.cache_dir else None
    readers = FLAGS.methods if mode.takes_methods else FLAGS.branch_methods
    kernels, task_id, ms, branches = lps_modes.load(mode, FLAGS.modelset, config, readers,
                                                    branches, images, cache)
    if FLAGS.task_ids:
      kernels, task_id = _only_tasks(mode, kernels, task_id)
    other = None
    if mode.name == 'cross':
      if not FLAGS.other_modelset:
        raise UserError('cross mode needs --other_modelset (the other architecture\'s models).')
      other = lps_modes.load(mode, FLAGS.other_modelset, config, readers, None, images, cache)[:2]
    compare = None
    if FLAGS.compare_modelset:
      if not mode.takes_methods:
        raise UserError(f'--compare_modelset is for the tables; {mode.name} mode takes one '
                         'model set.')
      other = lps_modes.load(mode, FLAGS.compare_modelset, config, FLAGS.methods, None, images,
                             cache)
      compare = lps_modes.restrict(other[0], other[1], np.unique(task_id),
                                   FLAGS.compare_modelset)
    out_dir = None
    if FLAGS.results_dir:
      run_config = {k: FLAGS[k].value for k in RUN_FLAGS}
      if FLAGS.task_ids:      # only when given: folders written before keep their config
        run_config['task_ids'] = list(data_lib.parse_task_ids(FLAGS.task_ids))
      out_dir = results.ResultsDir(FLAGS.results_dir, dict(run_config,
                                                           **dataclasses.asdict(config)))
  except UserError as e:
    sys.exit(f'error: {e}')

  ctx = lps_modes.Context(
      kernels, task_id, config, [int(s) for s in FLAGS.split_seeds], readers, branches,
      ms, FLAGS.test_tasks, FLAGS.num_permutations,
      images=images, cache=cache, other=other)
  bar = _bar(mode.fits(ctx) * (2 if compare else 1), f'{mode.name}: second-order epochs')
  ctx.progress = _progress(bar)
  if mode.name == 'transfer':
    feat_bar = _bar(len(ctx.seeds) * ctx.test_tasks, 'transfer: source tasks')
    ctx.feature_progress = lambda i, n: feat_bar.update(1)
  t0 = time.time()
  try:
    summary = mode.run(ctx)
    if compare:
      other_summary = mode.run(dataclasses.replace(ctx, kernels=compare[0], task_id=compare[1]))
  except UserError as e:
    sys.exit(f'error: {e}')
  bar.close()
  num_tasks = int(np.unique(task_id).size)
  res = {'mode': mode.name, 'command': command, 'modelset': FLAGS.modelset,
         'config': dataclasses.asdict(config), 'split_seeds': ctx.seeds,
         'num_models': int(len(task_id)), 'num_tasks': num_tasks, 'chance': 1.0 / num_tasks,
         'wall_seconds': time.time() - t0, 'results': summary}
  if other:
    res['other_modelset'] = FLAGS.other_modelset
    res['other_models'] = int(len(other[1]))
  if compare:
    res['compare'] = {'modelset': FLAGS.compare_modelset, 'num_models': int(len(compare[1])),
                      'tasks': np.unique(compare[1]).tolist(), 'results': other_summary}
  text = lps_modes.render(res, out_dir.path if out_dir else None)
  if out_dir is not None:
    out_dir.write_json('results.json', res)
    out_dir.write_text('results.md', text)
  print(text)


if __name__ == '__main__':
  flagdefs.run(main)
