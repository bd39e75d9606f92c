"""How lps_main's results render: Tables 1-2 (and the cross-architecture table) as markdown
with the paper's numbers beside, Figs. 3a-c as markdown and PNGs (`lps_jax.evaluation.plots`). Each
function takes a finished run's results.json, so --replot needs nothing else."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from lps_jax.evaluation import plots
from lps_jax.methods import registry as methods

PAPER_FIGURES = {
    'transfer': 'Fig. 3a shows similarity roughly proportional to ARI, with outliers (no numbers).',
    'branches': 'Fig. 3b: branch 1 79.8 % top-1; branches 2-13 weak but above chance (2 %); '
                '13-19 near chance.',
    'alignment': 'Fig. 3c: both alignments matter; filt. + chan. best on branches 2-19.',
}


def _mean_std(values) -> str:
  v = 100 * np.asarray(values, float)
  return f'{v.mean():.1f} ± {v.std():.1f}'


def _header(title: str, command: str, cols: list[str]) -> list[str]:
  return [f'## {title}', '', f'Command: `{command}`', '', '| ' + ' | '.join(cols) + ' |',
          '|' + '---|' * len(cols)]


def render_table(res: dict, results_dir: Optional[str]) -> str:
  """Tables 1-2: mean ± std over split seeds per method, the paper's numbers beside."""
  mode = res['mode']
  keys = (['rank-1', 'rank-5', 'rank-10', 'mAP'] if mode == 'retrieval'
          else ['top-1', 'top-5', 'top-10'])
  title = {'classification': 'Table 1: task classification',
           'retrieval': 'Table 2: task retrieval',
           'cross': (f'Different networks: the tasks of `{res.get("other_modelset")}` named by '
                     f'methods fitted on every model of `{res["modelset"]}`')}[mode]
  title += res.get('title_suffix', '')
  n = res.get('num_tasks')
  if mode == 'classification' and n and n != 50:
    title += (f' ({n}-way, chance {100 / n:.1f} %; the paper\'s numbers are 50-way, chance '
              '2 %)')
  timed = all('fit_seconds' in r for runs in res['results'].values() for r in runs)
  lines = _header(title, res['command'], ['method'] + [f'{k} (%)' for k in keys]
                  + ['paper ' + '/'.join(keys[:3])] + (['fit (s)'] if timed else []))
  cites = []
  for name, runs in res['results'].items():
    m = methods.REGISTRY.get(name)
    paper = m.paper.get(mode) if m else None
    lines.append(f'| {m.label if m else name} | '
                 + ' | '.join(_mean_std([r[k] for r in runs]) for k in keys) + ' | '
                 + ('/'.join(f'{p:.1f}' for p in paper) if paper else '-') + ' |'
                 + (f' {np.mean([r["fit_seconds"] for r in runs]):.1f} |' if timed else ''))
    if m and m.cite != 'LPS paper, Sec. 5.1':
      cites.append(f'`{name}`: {m.cite}')
  text = '\n'.join(lines) + '\n'
  if timed:
    text += ('\nfit (s): mean seconds per split to fit a method on the training models, its '
             'features included (a cached fit counts as its reading).\n')
  text += _chosen_lines(res['results'])
  return text + ('\nMethods beyond the paper: ' + '; '.join(cites) + '.\n' if cites else '')


def _chosen_lines(results: dict) -> str:
  """What each method that chooses its settings on the training models chose, per split."""
  def say(c: dict) -> str:
    def one(k, v):
      if k == 'depths' and list(v) == list(range(1, max(v) + 1)):
        return f'depths 1..{max(v)}' if max(v) > 1 else 'depth 1'
      return f'{k} {v}'
    return ', '.join(one(k, v) for k, v in c.items())
  lines = [f'`{name}`: ' + '; '.join(f'split {r.get("split_seed", i)}: {say(r["chosen"])}'
                                      for i, r in enumerate(runs))
           for name, runs in results.items() if all('chosen' in r for r in runs)]
  return ('\nChosen on the training models of each split: ' + ' — '.join(lines) + '.\n'
          if lines else '')


BRANCH_METHODS = {'lps': "LPS (Eq. 5-8, the paper's)",
                  'wn_branch': 'whole-network aligned, Frobenius + FC by index',
                  'chain_depth': 'chained-Gram kernel of that depth + kernel LR'}


def render_branches(res: dict, results_dir: Optional[str]) -> str:
  summary = res['results']
  by_method = summary if set(summary) <= set(BRANCH_METHODS) else {'lps': summary}
  first = next(iter(by_method.values()))
  cols = [f'{name} top-{k} (%)' for name in by_method for k in (1, 5)]
  lines = _header('Fig. 3b: one branch at a time (task classification)', res['command'],
                  ['branch'] + cols)
  for branch in first:
    lines.append(f'| {branch} | ' + ' | '.join(
        _mean_std([r[f'top-{k}'] for r in per[branch]]) for per in by_method.values()
        for k in (1, 5)) + ' |')
  if results_dir:
    top1 = {BRANCH_METHODS[n]: [np.mean([r['top-1'] for r in per[b]]) for b in first]
            for n, per in by_method.items()}
    path = os.path.join(results_dir, 'fig3b_branches.png')
    if len(top1) == 1:
      plots.branch_bars([int(b) for b in first], next(iter(top1.values())), res['chance'], path)
    else:
      plots.alignment_bars([int(b) for b in first], top1, res['chance'], path,
                           title='Fig. 3b: one branch at a time, with and without '
                                 'whole-network alignment')
  readers = '; '.join(f'`{n}`: {BRANCH_METHODS[n]}' for n in by_method)
  return ('\n'.join(lines) + f'\n\nReaders: {readers}.\n\n' + PAPER_FIGURES['branches'] + '\n')


def render_alignment(res: dict, results_dir: Optional[str]) -> str:
  summary = res['results']
  variants = list(summary)
  branches = list(summary[variants[0]])
  lines = _header('Fig. 3c: alignment ablation (top-1 %, task classification)', res['command'],
                  ['branch'] + variants)
  for b in branches:
    lines.append(f'| {b} | ' + ' | '.join(_mean_std([r['top-1'] for r in summary[v][b]])
                                          for v in variants) + ' |')
  lines.append('| mean | ' + ' | '.join(
      _mean_std([np.mean([r['top-1'] for r in summary[v][b]]) for b in branches])
      for v in variants) + ' |')
  if results_dir:
    plots.alignment_bars([int(b) for b in branches],
                         {v: [np.mean([r['top-1'] for r in per[b]]) for b in branches]
                          for v, per in summary.items()},
                         res['chance'], os.path.join(results_dir, 'fig3c_alignment.png'))
  return '\n'.join(lines) + '\n\n' + PAPER_FIGURES['alignment'] + '\n'


def render_transfer(res: dict, results_dir: Optional[str]) -> str:
  summary = res['results']
  lines = _header('Fig. 3a: task transferability vs parameter similarity', res['command'],
                  ['split seed', 'pairs', 'Spearman r (p)', 'Pearson r (p)'])
  for r in summary:
    c = r['correlation']
    lines.append(f'| {r["split_seed"]} | {c["n"]} | {c["spearman"]:.3f} ({c["spearman_p"]:.3g}) '
                 f'| {c["pearson"]:.3f} ({c["pearson_p"]:.3g}) |')
  first = summary[0]
  sim, ari = np.asarray(first['similarity']), np.asarray(first['ari'])
  off = ~np.eye(sim.shape[0], dtype=bool)
  if results_dir:
    plots.transfer_scatter(sim[off], ari[off], first['correlation'],
                           os.path.join(results_dir, 'fig3a_transfer.png'),
                           title=f'Fig. 3a: {off.sum()} task pairs (split seed '
                                 f'{first["split_seed"]})')
  return '\n'.join(lines) + '\n\n' + PAPER_FIGURES['transfer'] + '\n'
