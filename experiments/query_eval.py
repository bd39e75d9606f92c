"""How well do lps_query's indexes name the task of checkpoints they have not seen: held-out
models of the indexed set vs models trained elsewhere, per method (RESULTS.md, "Retrieval of
checkpoints trained elsewhere").

  python -m experiments.query_eval --modelset=results/modelset500 \
      --foreign=runs/torch_paper,runs/torch_short --out=results/query_eval_whole

For each method of --methods, an index (`lps_jax.query.index`, as lps_query builds it) is fitted
on runs 0..index_runs-1 of every task the methods share (a whole-network method reads the tasks
kept whole), then asked about the other runs of the set (trained here) and about every
checkpoint of each --foreign folder (checkpoints + models.json naming each one's task and
recipe, as experiments/torch_models.py writes), read from its file like any user's. The
functional reference (the models' logits on the probe images; not an index method) runs the
foreign PyTorch checkpoints mapped onto the Flax ResNet with PyTorch's symmetric padding, so it
reads the functions they compute; it needs the test split (--data_dir).
"""
import collections
import json
import os
import sys
import time

import numpy as np
from absl import flags

from experiments import flagdefs
from experiments import lps_modes
from lps_jax.align import fit as second_order_fit
from lps_jax.common.checks import Range
from lps_jax.common.errors import UserError
from lps_jax.evaluation import metrics, protocols
from lps_jax.methods import interface
from lps_jax.methods import registry as methods
from lps_jax.query import index
from lps_jax.query import zoo as zoo_lib
from lps_jax.training import modelset
from lps_jax.zoo import foreign_checkpoints as checkpoints
from lps_jax.zoo import manifest, network_arrays

FUNCTIONAL = 'functional'
flags.DEFINE_string('modelset', 'results/modelset_cpu/first_layer_kernels.npz', 'Indexed set: '
                    'a kernels file, a model set folder, or a slices folder (results/modelset500).')
flags.DEFINE_list('methods', ['lps'], f'Index methods (and {FUNCTIONAL!r}, the models\' outputs).')
flags.DEFINE_integer('index_runs', 8, 'Runs per task in the index; the rest are queries.')
flagdefs.define(second_order_fit.SecondOrderConfig, skip=('method', 'split_seed'))
flags.DEFINE_list('foreign', ['runs/torch_models'], 'Folders of foreign checkpoints, each with '
                  'a models.json (experiments/torch_models.py).')
flags.DEFINE_string('data_dir', None, f'Test split for {FUNCTIONAL!r}\'s probe images (default '
                    '$LPS_DATA_DIR).')
flags.DEFINE_string('out', 'results/query_eval', 'Where to write results.json / results.md.')
flagdefs.input_path('modelset')
flagdefs.input_path('data_dir', kind='dir')
flagdefs.check('index_runs', Range(1, integer=True))
flagdefs.names('methods', index.method_names() + [FUNCTIONAL], 'method')


def _has_models_json(folders) -> None:
  for folder in folders:
    if not os.path.isfile(os.path.join(folder, 'models.json')):
      raise UserError(f'no models.json in {folder} (experiments/torch_models.py writes one).')


flagdefs.input_path('foreign', kind='dir')
flagdefs.parsed('foreign', _has_models_json)
flagdefs.output_path('out', 'dir')
FLAGS = flags.FLAGS


def _scores(probs, y) -> dict:
  return {f'top-{k}': float(v) for k, v in metrics.topk_accuracy(probs, y, (1, 5)).items()}


def _own(method: str, config):
  """(inputs, task id, run) of every model of --modelset as `method` reads it."""
  if method != FUNCTIONAL:
    z = zoo_lib.from_modelset(FLAGS.modelset, method, config)
    tasks = np.asarray([int(label.split()[1]) for label in z.labels])   # zoo.task_label
    return z.inputs, tasks[z.label_of], np.asarray(z.run, int)
  if manifest.is_slices_root(FLAGS.modelset):
    whole = manifest.load_whole(FLAGS.modelset)
    ms, logits = whole.models, whole.logits
  else:
    ms, logits = modelset.load(FLAGS.modelset), None
  stack = modelset.network_stack(ms)
  if logits is None:
    logits = lps_modes.functional_outputs(stack, _test_split)
  return (stack.with_array(methods.PROBE_OUTPUTS, logits.reshape(len(ms), -1)), ms.task_id,
          np.asarray(ms.run))


def _test_split():
  return lps_modes.test_split_loader('npz', FLAGS.data_dir, None)()


def _foreign() -> dict:
  """{(folder, recipe): [(path, task)]} of every foreign checkpoint."""
  groups = collections.defaultdict(list)
  for folder in FLAGS.foreign:
    with open(os.path.join(folder, 'models.json')) as f:
      meta = json.load(f)
    for name, m in sorted(meta.items()):
      groups[(folder, m.get('recipe', 'yardstick'))].append(
          (os.path.join(folder, name), int(m['task']), float(m['heldout_accuracy'])))
  if not groups:
    raise UserError(f'no checkpoints listed in {FLAGS.foreign}.')
  return groups


def _functional_foreign(paths):
  """The foreign checkpoints' probe logits, run as PyTorch runs them (symmetric padding)."""
  flats, configs = zip(*[network_arrays.to_flax(checkpoints.read_arrays(p), p) for p in paths])
  if len(set(configs)) > 1:
    raise UserError('the foreign checkpoints hold different ResNets; evaluate one at a time.')
  stack = network_arrays.stack(list(flats), configs[0], list(paths))
  return stack.with_array(methods.PROBE_OUTPUTS, lps_modes.functional_outputs(
      stack, _test_split, padding='symmetric'))


def evaluate_method(name, config, own, tasks, foreign) -> dict:
  """An index of `name` on the first runs of `tasks` (`own`: `_own`), and its top-1 / top-5 on
  the other runs and on each group of foreign checkpoints."""
  t0 = time.perf_counter()
  inputs, task_id, run = own
  keep = np.isin(task_id, tasks)
  train, held = np.flatnonzero(keep & (run < FLAGS.index_runs)), np.flatnonzero(
      keep & (run >= FLAGS.index_runs))
  if held.size == 0:
    raise UserError(f'{FLAGS.modelset} has no runs >= --index_runs={FLAGS.index_runs} to query.')
  y = lambda t: np.searchsorted(tasks, t)
  labels = [zoo_lib.task_label(int(t)) for t in tasks]
  if name == FUNCTIONAL:
    est = protocols.fit(name, config, tasks.size, interface.take(inputs, train),
                        y(task_id[train]))
    predict = est.predict
  else:
    idx = index.build(interface.take(inputs, train), labels, y(task_id[train]),
                      run[train].astype(str), [''] * train.size, [''] * train.size, name,
                      config, calibration_folds=0, source=FLAGS.modelset)
    predict = idx.estimator.predict
  rows = {'own held-out models (trained here)': _scores(
      predict(interface.take(inputs, held)), y(task_id[held])) | {'models': int(held.size)}}
  for (folder, recipe), models in foreign.items():
    paths = [p for p, _, _ in models]
    truth = y(np.asarray([t for _, t, _ in models]))
    if name == FUNCTIONAL:
      probs = predict(_functional_foreign(paths))
    else:   # through the query path a user's file takes
      answers = idx.query_many(paths, top=len(labels))
      bad = [a for a in answers if isinstance(a, UserError)]
      if bad:
        raise bad[0]
      probs = np.asarray([[{l['label']: l['probability'] for l in a['labels']}[lab]
                           for lab in labels] for a in answers])
    rows[f'PyTorch, {recipe} recipe ({folder})'] = _scores(probs, truth) | {
        'models': len(models)}
  return {'rows': rows, 'seconds': time.perf_counter() - t0}


def main(argv):
  del argv
  try:
    evaluate()
  except UserError as e:
    sys.exit(f'error: {e}')


def evaluate():
  t0 = time.time()
  config = flagdefs.build(second_order_fit.SecondOrderConfig, FLAGS, skip=('method', 'split_seed'))
  foreign = _foreign()
  own = {name: _own(name, config) for name in FLAGS.methods}
  shared = set.intersection(*[set(task_id.tolist()) for _, task_id, _ in own.values()])
  tasks = np.asarray(sorted(shared))
  outside = sorted({t for models in foreign.values() for _, t, _ in models} - shared)
  if outside:
    raise UserError(f'foreign checkpoints of tasks {outside} that the index does not hold '
                    f'(it reads tasks {tasks.tolist()}): train them on those tasks.')
  results = {name: evaluate_method(name, config, own[name], tasks, foreign)
             for name in FLAGS.methods}
  command = 'python -m experiments.query_eval ' + ' '.join(sys.argv[1:])
  what = list(next(iter(results.values()))['rows'])
  counts = [next(iter(results.values()))['rows'][w]['models'] for w in what]
  lines = ['## Naming the task of unseen checkpoints (lps_query\'s indexes)', '',
           f'Command: `{command}`', '',
           f'Each index is fitted on runs 0-{FLAGS.index_runs - 1} of the {tasks.size} tasks '
           f'{tasks.tolist()} of `{FLAGS.modelset}`; chance top-1 {100 / tasks.size:.1f} %, '
           f'top-5 {min(100, 500 / tasks.size):.0f} %. Top-1 (top-5), %.', '',
           '| method | ' + ' | '.join(f'{w}, {n} models' for w, n in zip(what, counts))
           + ' | fit + queries (s) |', '|' + '---|' * (len(what) + 2)]
  for name, r in results.items():
    cells = [f'{100 * r["rows"][w]["top-1"]:.1f} ({100 * r["rows"][w]["top-5"]:.1f})'
             for w in what]
    lines.append(f'| {methods.get(name).label} (`{name}`) | ' + ' | '.join(cells)
                 + f' | {r["seconds"]:.0f} |')
  acc = {f'{folder} ({recipe})': float(np.mean([a for _, _, a in models]))
         for (folder, recipe), models in foreign.items()}
  lines.append('\nForeign models\' mean held-out accuracy on their tasks: '
               + ', '.join(f'{k}: {v:.3f}' for k, v in acc.items())
               + f'. {time.time() - t0:.0f} s wall time.')
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'results.json'), 'w') as f:
    json.dump({'methods': results, 'tasks': tasks.tolist(), 'foreign_heldout_accuracy': acc,
               'command': command}, f, indent=1)
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(FLAGS.out, 'results.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  flagdefs.run(main)
