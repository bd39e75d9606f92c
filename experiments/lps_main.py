"""Second-order network experiments (Sec. 5): one mode per table / figure.

  python -m experiments.lps_main --flagfile=experiments/flags/table1.flags     # Table 1
  python -m experiments.lps_main --flagfile=experiments/flags/table2.flags     # Table 2
  python -m experiments.lps_main --flagfile=experiments/flags/fig3a.flags      # transferability
  python -m experiments.lps_main --flagfile=experiments/flags/fig3b.flags      # per branch
  python -m experiments.lps_main --flagfile=experiments/flags/fig3c.flags      # alignment ablation

Each run writes results.json, results.md (and a PNG for the figures) into --results_dir, which
is tied to the run's configuration (a different configuration is refused, never overwritten).
Trained second-order networks and transfer features go to a content-addressed --cache_dir, so a
rerun, or another experiment needing the same network, reuses them. --replot redraws the
table / figure of a finished run from its results.json.
"""
import dataclasses
import os
import sys
import time

from absl import app, flags

MODES = ['classification', 'retrieval', 'transfer', 'branches', 'alignment']
flags.DEFINE_enum('mode', 'classification', MODES,
                  'classification: Table 1 (8 train / 2 test models per task). retrieval: '
                  'Table 2 (train on 40 tasks, 2 query + 8 gallery per held-out task). transfer: '
                  'Fig. 3a. branches: Fig. 3b (one branch at a time). alignment: Fig. 3c.')
flags.DEFINE_string('modelset', 'results/modelset_test/first_layer_kernels.npz',
                    'A model set folder (train_population workdir/modelset) or a kernels .npz '
                    '(first layer only: enough for Tables 1-2, not for the figures).')
flags.DEFINE_list('methods', ['random', 'fc_only', 'no_align', 'lps'],
                  'Methods (classification / retrieval modes).')
flags.DEFINE_list('split_seeds', ['0', '1', '2'], 'Model / task splits to average over.')
flags.DEFINE_list('layer_weights', ['1'], 'w_l per conv layer (Eq. 9); missing = 0.')
flags.DEFINE_list('branches', None, '1-based branches (conv layers) for the branches / alignment '
                  'modes; default all (1..19), or 2..19 for alignment.')
flags.DEFINE_integer('num_filters', 100, 'Second-order filters G per branch.')
flags.DEFINE_integer('epochs', 100, 'Second-order training epochs.')
flags.DEFINE_integer('batch_size', 1, 'Models per step.')
flags.DEFINE_float('learning_rate', 1e-3, 'Initial learning rate.')
flags.DEFINE_list('lr_boundaries', ['40', '80'], 'Epochs after which lr is divided by 10.')
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.')
flags.DEFINE_integer('seed', 0, 'Initialisation / shuffling seed of the second-order network.')
flags.DEFINE_bool('feature_norm', False, 'Not in the paper: standardise each branch\'s aligned '
                  'features per model before its FC (helps deep branches; see RESULTS.md).')
flags.DEFINE_integer('test_tasks', 10, 'Held-out tasks (retrieval and transfer modes).')
flags.DEFINE_enum('dataset', 'npz', ['npz', 'tfds'],
                  'Images clustered in transfer mode (the target tasks\' test-split images): '
                  'test.npz of the offline folder (--data_dir), or tfds.')
flags.DEFINE_string('data_dir', None, 'Offline data folder (train_*.npz + test.npz); default '
                    '$LPS_DATA_DIR.')
flags.DEFINE_string('tfds_data_dir', None, 'tensorflow-datasets data_dir.')
flags.DEFINE_integer('num_permutations', 10000, 'Permutation-test draws (transfer mode).')
flags.DEFINE_string('results_dir', None, 'Where to write results.json, results.md and plots.')
flags.DEFINE_string('cache_dir', 'runs/lps_cache', 'Content-addressed store of finished work '
                    '(trained second-order nets, transfer ARIs); empty = no cache.')
flags.DEFINE_bool('replot', False, 'Only redraw results.md / the PNG from --results_dir.')
FLAGS = flags.FLAGS

# Flags that determine the results (a results folder holds one configuration of them).
CONFIG_FLAGS = ('mode', 'modelset', 'methods', 'split_seeds', 'layer_weights', 'branches',
                'num_filters', 'epochs', 'batch_size', 'learning_rate', 'lr_boundaries',
                'momentum', 'seed', 'test_tasks', 'dataset', 'num_permutations',
                'feature_norm')

PAPER = {
    'classification': {'random': (2.0, 9.6, 18.3), 'fc_only': (5.3, 17.5, 29.3),
                       'no_align': (5.5, 18.3, 29.0), 'lps': (79.8, 94.8, 98.0)},
    'retrieval': {'random': (10.0, 41.0, 65.1), 'fc_only': (15.0, 55.8, 83.3),
                  'no_align': (13.3, 58.3, 80.0), 'lps': (80.7, 95.0, 95.8)},
}
LABELS = {'random': 'random prediction', 'fc_only': 'only one FC layer',
          'no_align': 'Frobenius+FC, w/o alignment', 'lps': 'Frobenius+FC, w/ alignment (LPS)'}
PAPER_FIGURES = {
    'transfer': 'Fig. 3a shows similarity roughly proportional to ARI, with outliers (no numbers).',
    'branches': 'Fig. 3b: branch 1 79.8 % top-1; branches 2-13 weak but above chance (2 %); '
                '13-19 near chance.',
    'alignment': 'Fig. 3c: both alignments matter; filt. + chan. best on branches 2-19.',
}


def _mean_std(values):
  import numpy as np
  v = 100 * np.asarray(values, float)
  return f'{v.mean():.1f} ± {v.std():.1f}'


def table_markdown(mode, summary, command):
  """Tables 1-2: mean ± std over split seeds per method, the paper's numbers beside."""
  keys = (['top-1', 'top-5', 'top-10'] if mode == 'classification'
          else ['rank-1', 'rank-5', 'rank-10', 'mAP'])
  title = 'Table 1: task classification' if mode == 'classification' else 'Table 2: task retrieval'
  lines = [f'## {title}', '', f'Command: `{command}`', '',
           '| method | ' + ' | '.join(f'{k} (%)' for k in keys) + ' | paper '
           + '/'.join(keys[:3]) + ' |', '|---|' + '---|' * (len(keys) + 1)]
  for method, runs in summary.items():
    paper = PAPER[mode].get(method)
    lines.append(f'| {LABELS.get(method, method)} | '
                 + ' | '.join(_mean_std([r[k] for r in runs]) for k in keys) + ' | '
                 + ('/'.join(f'{p:.1f}' for p in paper) if paper else '-') + ' |')
  return '\n'.join(lines) + '\n'


def branches_markdown(summary, command):
  lines = ['## Fig. 3b: one branch at a time (task classification, LPS)', '',
           f'Command: `{command}`', '', '| branch | top-1 (%) | top-5 (%) | top-10 (%) |',
           '|---|---|---|---|']
  for branch, runs in summary.items():
    lines.append(f'| {branch} | ' + ' | '.join(_mean_std([r[k] for r in runs])
                                              for k in ('top-1', 'top-5', 'top-10')) + ' |')
  return '\n'.join(lines) + '\n\n' + PAPER_FIGURES['branches'] + '\n'


def alignment_markdown(summary, command):
  variants = list(summary)
  branches = list(summary[variants[0]])
  lines = ['## Fig. 3c: alignment ablation (top-1 %, task classification)', '',
           f'Command: `{command}`', '', '| branch | ' + ' | '.join(variants) + ' |',
           '|---|' + '---|' * len(variants)]
  for b in branches:
    lines.append(f'| {b} | ' + ' | '.join(_mean_std([r['top-1'] for r in summary[v][b]])
                                          for v in variants) + ' |')
  lines.append('| mean | ' + ' | '.join(
      _mean_std([sum(r['top-1'] for r in summary[v][b]) / len(summary[v][b])
                 for b in branches]) for v in variants) + ' |')
  return '\n'.join(lines) + '\n\n' + PAPER_FIGURES['alignment'] + '\n'


def transfer_markdown(res, command):
  lines = ['## Fig. 3a: task transferability vs parameter similarity', '',
           f'Command: `{command}`', '', '| split seed | pairs | Spearman r (p) | Pearson r (p) |',
           '|---|---|---|---|']
  for r in res:
    c = r['correlation']
    lines.append(f'| {r["split_seed"]} | {c["n"]} | {c["spearman"]:.3f} ({c["spearman_p"]:.3g}) '
                 f'| {c["pearson"]:.3f} ({c["pearson_p"]:.3g}) |')
  return '\n'.join(lines) + '\n\n' + PAPER_FIGURES['transfer'] + '\n'


def render(res, results_dir):
  """results.md text of a finished run, and its PNG into `results_dir` (if given); also what
  --replot does."""
  import numpy as np
  from lps_jax import plots
  mode, summary, command = res['mode'], res['results'], res['command']
  if mode in ('classification', 'retrieval'):
    text = table_markdown(mode, summary, command)
  elif mode == 'branches':
    text = branches_markdown(summary, command)
    top1 = [np.mean([r['top-1'] for r in runs]) for runs in summary.values()]
    if results_dir:
      plots.branch_bars([int(b) for b in summary], top1, res['chance'],
                        os.path.join(results_dir, 'fig3b_branches.png'))
  elif mode == 'alignment':
    text = alignment_markdown(summary, command)
    branches = list(next(iter(summary.values())))
    if results_dir:
      plots.alignment_bars([int(b) for b in branches],
                           {v: [np.mean([r['top-1'] for r in per[b]]) for b in branches]
                            for v, per in summary.items()},
                           res['chance'], os.path.join(results_dir, 'fig3c_alignment.png'))
  else:
    text = transfer_markdown(summary, command)
    first = summary[0]
    sim, ari = np.asarray(first['similarity']), np.asarray(first['ari'])
    off = ~np.eye(sim.shape[0], dtype=bool)
    if results_dir:
      plots.transfer_scatter(sim[off], ari[off], first['correlation'],
                             os.path.join(results_dir, 'fig3a_transfer.png'),
                             title=f'Fig. 3a: {off.sum()} task pairs (split seed '
                                   f'{first["split_seed"]})')
  text += (f'\n{res["num_models"]} models, {res["num_tasks"]} tasks from `{res["modelset"]}`; '
           f'mean ± std over split seeds {res["split_seeds"]}; {res["wall_seconds"]:.0f} s wall '
           'time (cached work counts as 0).\n')
  return text


def _branch_list(num_layers):
  if FLAGS.branches:
    return [int(b) for b in FLAGS.branches]
  return list(range(2 if FLAGS.mode == 'alignment' else 1, num_layers + 1))


def _load():
  """(kernels, task_id, model_set or None, branches or None) for the mode."""
  from lps_jax import modelset, resnet
  if FLAGS.mode in ('transfer', 'branches', 'alignment'):
    if FLAGS.modelset.endswith('.npz'):
      what = ('runs the first-order models on images' if FLAGS.mode == 'transfer'
              else 'trains branches of deeper conv layers')
      raise modelset.ModelSetError(
          f'{FLAGS.mode} mode {what}, so it needs the full model set folder (train_population '
          f'workdir/modelset), not the kernels file {FLAGS.modelset}.')
    ms = modelset.load(FLAGS.modelset)
    if FLAGS.mode == 'transfer':
      kernels, _ = modelset.layer_kernels(ms, len(FLAGS.layer_weights))
      return kernels, ms.task_id, ms, None
    names = resnet.conv_layer_names(resnet.ResNetConfig.from_dict(ms.config['model']))
    branches = _branch_list(len(names))
    lo = 2 if FLAGS.mode == 'alignment' else 1
    bad = [b for b in branches if not lo <= b <= len(names)]
    if bad or not branches:
      raise ValueError(f'--branches {bad} out of range: {FLAGS.mode} mode takes branches '
                       f'{lo}..{len(names)} of this model set (1-based, one per conv layer).')
    kernels, _ = modelset.layer_kernels(ms, max(branches))
    return kernels, ms.task_id, ms, branches
  num_layers = len(FLAGS.layer_weights)
  kernels, task_id, names = modelset.load_kernels(FLAGS.modelset, num_layers)
  weights = [float(w) for w in FLAGS.layer_weights]
  missing = [names[i] for i, w in enumerate(weights) if w > 0 and kernels[i] is None]
  if missing:
    raise modelset.ModelSetError(f'{FLAGS.modelset} has no kernels for {missing}; pass the '
                                 'full model set folder instead of the exported .npz.')
  return kernels, task_id, None, None


def main(argv):
  del argv
  import numpy as np
  from tqdm import tqdm
  from lps_jax import data, modelset, protocols, resnet, results, second_order

  command = 'python -m experiments.lps_main ' + ' '.join(sys.argv[1:])
  if FLAGS.replot:
    if not FLAGS.results_dir:
      sys.exit('error: --replot needs --results_dir.')
    try:
      res = results.read_results(FLAGS.results_dir, FLAGS.mode)
    except results.ResultsError as e:
      sys.exit(f'error: {e}')
    text = render(res, FLAGS.results_dir)
    with open(os.path.join(FLAGS.results_dir, 'results.md'), 'w') as f:
      f.write(text)
    print(text)
    return

  try:
    kernels, task_id, ms, branches = _load()
    out_dir = None
    if FLAGS.results_dir:
      out_dir = results.ResultsDir(FLAGS.results_dir,
                                   {k: FLAGS[k].value for k in CONFIG_FLAGS})
  except (modelset.ModelSetError, results.ResultsError, ValueError) as e:
    sys.exit(f'error: {e}')

  weights = tuple(float(w) for w in FLAGS.layer_weights)
  config = second_order.SecondOrderConfig(
      layer_weights=weights, num_filters=FLAGS.num_filters, epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
      lr_boundaries=tuple(int(b) for b in FLAGS.lr_boundaries), momentum=FLAGS.momentum,
      seed=FLAGS.seed, feature_norm=FLAGS.feature_norm)
  cache = results.Cache(FLAGS.cache_dir) if FLAGS.cache_dir else None
  seeds = [int(s) for s in FLAGS.split_seeds]
  fits = {'classification': len([m for m in FLAGS.methods if m != 'random']),
          'retrieval': len([m for m in FLAGS.methods if m != 'random']), 'transfer': 1,
          'branches': len(branches or []),
          'alignment': 4 * len(branches or [])}[FLAGS.mode]
  bar = tqdm(total=fits * len(seeds) * config.epochs, desc=f'{FLAGS.mode}: second-order epochs',
             file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30.0)
  state = {'last': 0}

  def progress(epoch, loss):  # Epochs 1..E of each fit, or (E, None) for a cached one.
    if epoch <= state['last']:
      state['last'] = 0
    bar.update(epoch - state['last'])
    state['last'] = epoch
    if loss is not None:
      bar.set_postfix({'loss': f'{loss:.3f}'}, refresh=False)

  t0 = time.time()
  summary = {}
  try:
    if FLAGS.mode in ('classification', 'retrieval'):
      for method in FLAGS.methods:
        for seed in seeds:
          if FLAGS.mode == 'classification':
            r = protocols.run_classification(kernels, task_id, method, config, seed,
                                             progress=progress, cache=cache)
          else:
            r = protocols.run_retrieval(kernels, task_id, method, config, seed,
                                        test_tasks=FLAGS.test_tasks, progress=progress,
                                        cache=cache)
          summary.setdefault(method, []).append(dict(r, split_seed=seed))
    elif FLAGS.mode == 'branches':
      for seed in seeds:
        r = protocols.run_branches(kernels, task_id, config, [b - 1 for b in branches],
                                   seed, progress=progress, cache=cache)
        for layer, acc in r.items():
          summary.setdefault(str(layer + 1), []).append(dict(acc, split_seed=seed))
    elif FLAGS.mode == 'alignment':
      for seed in seeds:
        r = protocols.run_alignment_ablation(kernels, task_id, config,
                                             [b - 1 for b in branches], seed,
                                             progress=progress, cache=cache)
        for variant, per in r.items():
          for layer, acc in per.items():
            summary.setdefault(variant, {}).setdefault(str(layer + 1), []).append(
                dict(acc, split_seed=seed))
    else:
      split = (data.load_npz_dir(FLAGS.data_dir or data.default_data_dir(), train=False)[1]
               if FLAGS.dataset == 'npz' else data.load_tfds('test', FLAGS.tfds_data_dir))
      model_config = resnet.ResNetConfig.from_dict(ms.config['model'])
      feat_bar = tqdm(total=len(seeds) * FLAGS.test_tasks, desc='transfer: source tasks',
                      file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30.0)
      summary = []
      for seed in seeds:
        r = protocols.run_transfer(kernels, task_id, ms.params, ms.batch_stats, split.images,
                                   split.labels, model_config, config, seed,
                                   test_tasks=FLAGS.test_tasks,
                                   num_permutations=FLAGS.num_permutations, progress=progress,
                                   feature_progress=lambda i, n: feat_bar.update(1),
                                   cache=cache)
        summary.append(dict(r, split_seed=seed))
      feat_bar.close()
  except (ValueError, FloatingPointError, data.DataError) as e:
    sys.exit(f'error: {e}')
  bar.close()
  num_tasks = int(np.unique(task_id).size)
  res = {'mode': FLAGS.mode, 'command': command, 'modelset': FLAGS.modelset,
         'config': dataclasses.asdict(config), 'split_seeds': seeds,
         'num_models': int(len(task_id)), 'num_tasks': num_tasks,
         'chance': 1.0 / num_tasks, 'wall_seconds': time.time() - t0, 'results': summary,
         'paper': PAPER.get(FLAGS.mode, PAPER_FIGURES.get(FLAGS.mode))}
  if out_dir is not None:
    out_dir.write_json('results.json', res)
    text = render(res, out_dir.path)
    out_dir.write_text('results.md', text)
  else:
    text = render(res, None)
  print(text)


if __name__ == '__main__':
  app.run(main)
