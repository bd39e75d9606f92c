"""Which known task is a checkpoint closest to? Builds a retrieval index over a zoo, then answers
queries about checkpoints from anywhere (docs/query.md).

  # once: fit a method on every model of one of our sets, or of your own zoo
  python -m experiments.lps_query --build --modelset=results/modelset500
  python -m experiments.lps_query --build --zoo=my_zoo --labels=my_zoo/labels.csv --method=gram
  # then: any number of checkpoints (.npz, .safetensors, .msgpack, .pt/.pth, orbax folders)
  python -m experiments.lps_query model_a.pt model_b.safetensors [--format=json]

Conv layers are found automatically (3x3 kernels in network order; PyTorch / safetensors files
are OIHW, the others HWIO: --layout overrides) or named with --layers; whole-network indexes
(chain_kernel, chain_kernel_bn) map a checkpoint onto lps_jax's ResNet (lps_jax.zoo.network_arrays).
"""
import json
import os
import sys
import time

from absl import flags

from experiments import flagdefs
from lps_jax.align import fit as second_order_fit
from lps_jax.common import locks
from lps_jax.common.checks import Range
from lps_jax.common.errors import UserError
from lps_jax.query import index, shelf
from lps_jax.query import zoo as zoo_lib
from lps_jax.zoo import foreign_checkpoints as checkpoints

flags.DEFINE_bool('build', False, 'Build (or rebuild) the index from --modelset or --zoo first.')
flags.DEFINE_list('modelset', ['results/modelset500'],
                  'Our model sets to index (several: one index of a mix of training recipes): a '
                  'slices folder, a model set folder or a kernels .npz (ignored with --zoo).')
flags.DEFINE_string('zoo', None, 'A folder of checkpoints to index (with --labels).')
flags.DEFINE_string('labels', None, 'CSV naming what each zoo checkpoint was trained on: '
                    'columns path,label[,run,recipe]; paths relative to --zoo.')
flags.DEFINE_string('index', 'runs/lps_index', 'The index folder.')
flags.DEFINE_enum('method', 'auto', ['auto'] + index.method_names(),
                  'Method of the index (lps_jax/methods/registry.py): a second-order network, a '
                  'kernel probe, or the chained-Gram kernel (chain_kernel reads whole networks); '
                  'auto: one index per method of lps_jax.query.shelf.AUTO the zoo feeds, and each '
                  'query answered by the best one its checkpoint feeds.')
flagdefs.define(second_order_fit.SecondOrderConfig, skip=('method', 'split_seed'))
flags.DEFINE_integer('calibration_folds', 5, 'Leave-tasks-out folds that calibrate the '
                     '"unknown" answer at build (0: no calibration, always a task).')
flags.DEFINE_list('layers', None, 'Names of the conv kernels in the checkpoints, in network '
                  'order (default: found automatically).')
flags.DEFINE_enum('layout', 'auto', list(checkpoints.LAYOUTS),
                  'Kernel layout in the checkpoints; auto: OIHW for .pt/.pth/.bin/.safetensors, '
                  'HWIO otherwise.')
flags.DEFINE_integer('top', 5, 'Labels and models to list per query.')
flags.DEFINE_enum('format', 'table', ['table', 'json'], 'Output format.')
flagdefs.input_path('modelset', when=lambda f: f.build and not f.zoo)
flagdefs.input_path('zoo', 'dir', when=lambda f: f.build and f.zoo)
flagdefs.input_path('labels', when=lambda f: f.build and f.zoo)
flagdefs.input_path('index', 'dir', when=lambda f: not f.build,
                    hint='Build one with --build --modelset=... (and this --index).')
flagdefs.output_path('index', 'dir', when=lambda f: f.build)
flagdefs.check('top', Range(1, integer=True))
flagdefs.check('calibration_folds', Range(0, integer=True))
FLAGS = flags.FLAGS


def _zoo_or_set(method, config):
  from tqdm import tqdm
  if FLAGS.zoo:
    if not FLAGS.labels:
      raise UserError('--zoo needs --labels (a CSV with columns path,label[,run,recipe]).')
    rows = len(zoo_lib.read_table(FLAGS.labels, FLAGS.zoo))
    with tqdm(total=rows, file=sys.stderr, desc='index: reading the zoo') as bar:
      return zoo_lib.from_table(FLAGS.labels, FLAGS.zoo, method, config, FLAGS.layout,
                                FLAGS.layers, progress=lambda: bar.update(1)), FLAGS.zoo
  return zoo_lib.from_modelsets(FLAGS.modelset, method, config), ','.join(FLAGS.modelset)


def build_one(method: str, path: str):
  from tqdm import tqdm
  from lps_jax.methods import registry as methods
  t0 = time.perf_counter()
  config = flagdefs.build(second_order_fit.SecondOrderConfig, FLAGS, skip=('method', 'split_seed'))
  m = methods.get(method)
  z, source = _zoo_or_set(method, m.config(config))
  read_s = time.perf_counter() - t0
  with locks.exclusive(path, 'index', '--index'):   # one build per index folder
    fits = m.fit_count(m.config(config)) * (1 + FLAGS.calibration_folds)
    with tqdm(total=fits, file=sys.stderr, desc=f'index: {method} fit + calibration') as bar:
      idx = index.build(z.inputs, z.labels, z.label_of, z.run, z.recipe, z.path, method,
                        config, FLAGS.calibration_folds, source,
                        progress=lambda *a: bar.update(1))
    idx.seconds = dict(read=round(read_s, 2), **idx.seconds,
                       total=round(time.perf_counter() - t0, 2))
    index.save(path, idx)
  d = idx.describe()
  cal = d['calibration']
  print(f'index of {d["models"]} models, {d["labels"]} labels ({method}, reads {d["reads"]}; '
        f'recipes {d["recipes"]}) written to {path} in {idx.seconds["total"]:.1f} s' + (
            f'; "unknown" below {cal["score"]} {cal["threshold"]:.3f} (held-out tasks: '
            f'{100 * cal["false_accept"]:.0f} % false accepts, {100 * cal["false_reject"]:.0f} % '
            f'false rejects; top-1 {100 * cal["seen_top1"]:.1f} % on held-out models of seen '
            'tasks)' if cal else '; no "unknown" answer (--calibration_folds=0)'),
        file=sys.stderr)
  return idx


def build_indexes() -> list:
  """The index of --method, or with --method=auto one per method of `shelf.AUTO` that the zoo
  feeds, in subfolders of --index."""
  if FLAGS.method != 'auto':
    if shelf.is_shelf(FLAGS.index) and os.listdir(FLAGS.index):
      raise UserError(f'{FLAGS.index} holds indexes built with --method=auto; name another '
                      '--index for a one-method index.')
    return [build_one(FLAGS.method, FLAGS.index)]
  if os.path.isfile(os.path.join(FLAGS.index, 'index.json')):
    raise UserError(f'{FLAGS.index} holds a one-method index; --method=auto builds a folder of '
                    'indexes: name another --index.')
  built = []
  for method in shelf.AUTO:
    try:
      built.append(build_one(method, os.path.join(FLAGS.index, method)))
    except UserError as e:
      print(f'{method}: not built ({e})', file=sys.stderr)
  if not built:
    raise UserError(f'none of {", ".join(shelf.AUTO)} could be built from this zoo.')
  return built


def answer_all(indexes: list, paths: list) -> list:
  """One answer (or UserError) per path, each from its index (`shelf.choose` among several)."""
  if len(indexes) == 1:
    return [dict(r, method=indexes[0].method) if isinstance(r, dict) else r
            for r in indexes[0].query_many(paths, FLAGS.top, FLAGS.layout, FLAGS.layers)]
  out, groups = [None] * len(paths), {}
  for i, p in enumerate(paths):
    try:
      chosen = shelf.choose(indexes, p, FLAGS.layout)
      groups.setdefault(chosen.method, (chosen, []))[1].append(i)
    except UserError as e:
      out[i] = e
  for idx, rows in groups.values():
    for i, r in zip(rows, idx.query_many([paths[i] for i in rows], FLAGS.top, FLAGS.layout,
                                         FLAGS.layers)):
      out[i] = dict(r, method=idx.method) if isinstance(r, dict) else r
  return out


def table(res) -> str:
  head = f'## {res["checkpoint"]} ({res["method"]} index; read: {", ".join(res["read"])})'
  if 'score' in res:
    verdict = ('no indexed task is close' if not res['known'] else res['answer'])
    head += (f'\n\nanswer: **{verdict}** ({res["score_kind"]} {res["score"]:.3f}, threshold '
             f'{res["threshold"]:.3f}); distance to the nearest indexed model '
             f'{res["distance"]:.3f}, farther than {res["distance_percentile"]:.0f} % of the '
             "index's held-out models")
  lines = [head, '', '| rank | label | probability | model (label / run) | cosine |',
           '|---|---|---|---|---|']
  for i, (t, m) in enumerate(zip(res['labels'], res['models']), 1):
    lines.append(f'| {i} | {t["label"]} | {t["probability"]:.3f} | {m["label"]} / {m["run"]} | '
                 f'{m["cosine"]:.3f} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  paths = argv[1:]
  t0 = time.perf_counter()
  try:
    if FLAGS.build:
      indexes = build_indexes()
    else:
      indexes = (shelf.load(FLAGS.index) if shelf.is_shelf(FLAGS.index)
                 else [index.load(FLAGS.index)])
  except UserError as e:
    sys.exit(f'error: {e}')
  if not paths:
    if not FLAGS.build:
      sys.exit('error: name checkpoints to query, e.g. python -m experiments.lps_query '
               'model.pt (or --build to build the index).')
    return
  t1 = time.perf_counter()
  results = answer_all(indexes, paths)
  seconds = {'index': round(t1 - t0, 3), 'queries': round(time.perf_counter() - t1, 3)}
  out = [r for r in results if not isinstance(r, UserError)]
  errors = [str(r) for r in results if isinstance(r, UserError)]
  if FLAGS.format == 'json':
    print(json.dumps({'indexes': [i.describe() for i in indexes], 'answers': out,
                      'errors': errors, 'seconds': seconds}, indent=1))
  elif out:
    print('\n'.join(table(r) for r in out))
  print(f'{len(out)} of {len(paths)} checkpoints answered in {seconds["queries"]:.3f} s (index '
        f'ready after {seconds["index"]:.3f} s)', file=sys.stderr)
  if errors:
    sys.exit('\n'.join(f'error: {e}' for e in errors))


if __name__ == '__main__':
  flagdefs.run(main)
