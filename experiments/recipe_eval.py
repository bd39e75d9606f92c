"""Which index should a user build? First-layer methods fitted on models of one training recipe
(or a mix) and asked about another's, and asked about models part-way through training
(lps_jax.evaluation.recipes; RESULTS.md, "Training length as a variable").

  python -m experiments.recipe_eval --flagfile=experiments/flags/recipe_eval.flags
"""
import os
import sys
import time

import numpy as np
from absl import flags

from experiments import flagdefs
from lps_jax.align import fit as second_order_fit
from lps_jax.common import files
from lps_jax.common.checks import Range
from lps_jax.common.errors import UserError
from lps_jax.evaluation import recipes
from lps_jax.methods import registry as methods
from lps_jax.training import modelset
from lps_jax.zoo import manifest

flags.DEFINE_list('sets', ['paper:results/modelset500/first_layer_kernels.npz',
                           'yardstick:results/modelset_cpu/first_layer_kernels.npz'],
                  'name:kernels-file of each model set (one recipe each).')
flags.DEFINE_string('trajectory', 'results/modelset500', 'A slices folder whose whole slices '
                    'record first-layer trajectories ("" to skip).')
flags.DEFINE_list('methods', ['gram', 'lps'], 'First-layer methods.')
flags.DEFINE_list('split_seeds', ['0', '1', '2'], 'Split seeds.')
flags.DEFINE_string('out', 'results/recipes', 'Where results.json / results.md go.')


def _check_sets(value) -> None:
  for item in value or ():
    name, sep, path = item.partition(':')
    if not sep or not name or not path:
      raise ValueError(f'item {item!r}: write name:path.')
    if not os.path.isfile(path):
      raise ValueError(f'{path}: no such kernels file.')


flagdefs.parsed('sets', _check_sets)
flagdefs.names('methods', [n for n, m in methods.REGISTRY.items() if not m.reads_networks],
               'first-layer method')
flagdefs.check('split_seeds', Range(0, integer=True), item=int)
flagdefs.input_path('trajectory', 'dir')
flagdefs.output_path('out', 'dir')
FLAGS = flags.FLAGS


def _sets() -> dict:
  out = {}
  for item in FLAGS.sets:
    name, _, path = item.partition(':')
    kernels, task_id, _, _ = modelset.load_kernels(path, 1)
    out[name] = recipes.Set(kernels[0], task_id)
  return out


def _mean_std(values) -> str:
  return f'{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}'


def markdown(result: dict, command: str) -> str:
  lines = ['## Training length as a variable', '', f'Command: `{command}`', '']
  names = result['sets']
  lines += [f'Fit on one set\'s training models (8 per task) or on all of them (`mix`); top-1 '
            f'(%) on each set\'s test models (2 per task), {result["num_tasks"]} shared tasks, '
            f'{result["num_tasks"]}-way, split seeds {result["split_seeds"]}.', '',
            '| method | fit on | ' + ' | '.join(f'test: {n}' for n in names) + ' |',
            '|---|---|' + '---|' * len(names)]
  for m, table in result['cross_recipe'].items():
    for fit_name, row in table.items():
      lines.append(f'| `{m}` | {fit_name} | ' + ' | '.join(_mean_std(row[n]) for n in names) + ' |')
  if result.get('across_epochs'):
    epochs = result['epochs']
    lines += ['', f'The {result["trajectory_tasks"]} tasks kept whole, models part-way through '
              'training (top-1 %, test models at each epoch):', '',
              '| method | fit on | ' + ' | '.join(f'epoch {e}' for e in epochs) + ' |',
              '|---|---|' + '---|' * len(epochs)]
    for m, table in result['across_epochs'].items():
      for fit_name, row in table.items():
        lines.append(f'| `{m}` | {fit_name} | ' + ' | '.join(_mean_std(row[str(e)])
                                                             for e in epochs) + ' |')
  lines.append(f'\n{result["wall_seconds"]:.0f} s wall time.')
  return '\n'.join(lines) + '\n'


def evaluate() -> dict:
  t0 = time.perf_counter()
  config = second_order_fit.SecondOrderConfig()
  seeds = [int(s) for s in FLAGS.split_seeds]
  sets = _sets()
  result = {'sets': list(sets), 'split_seeds': seeds, 'cross_recipe': {}, 'across_epochs': {}}
  for m in FLAGS.methods:
    runs = [recipes.cross_recipe(sets, m, config, s) for s in seeds]
    result['cross_recipe'][m] = {f: {t: [r[f][t] for r in runs] for t in sets} for f in runs[0]}
    print(f'{m}: cross-recipe done ({time.perf_counter() - t0:.0f} s)', file=sys.stderr)
  shared = set.intersection(*[set(s.task_id.tolist()) for s in sets.values()])
  result['num_tasks'] = len(shared)
  if FLAGS.trajectory:
    whole = manifest.load_whole(FLAGS.trajectory)
    final = modelset.layer_kernels(whole.models, 1)[0][0]
    result['epochs'] = sorted(whole.trajectory)
    result['trajectory_tasks'] = int(np.unique(whole.models.task_id).size)
    for m in FLAGS.methods:
      runs = [recipes.across_epochs(final, whole.trajectory, whole.models.task_id, m, config, s)
              for s in seeds]
      result['across_epochs'][m] = {f: {str(e): [r[f][e] for r in runs]
                                        for e in result['epochs']} for f in runs[0]}
      print(f'{m}: across epochs done ({time.perf_counter() - t0:.0f} s)', file=sys.stderr)
  result['wall_seconds'] = time.perf_counter() - t0
  return result


def main(argv):
  del argv
  command = 'python -m experiments.recipe_eval ' + ' '.join(sys.argv[1:])
  try:
    result = evaluate()
  except UserError as e:
    sys.exit(f'error: {e}')
  result['command'] = command
  os.makedirs(FLAGS.out, exist_ok=True)
  files.write_json(os.path.join(FLAGS.out, 'results.json'), result)
  text = markdown(result, command)
  files.write_bytes(os.path.join(FLAGS.out, 'results.md'), text.encode())
  print(text)


if __name__ == '__main__':
  flagdefs.run(main)
