"""Which known task is a checkpoint closest to? Builds a retrieval index over a model set, then
answers queries about checkpoints from anywhere.

  # once: train the second-order network on all models of a set, embed them (~1 min on 2 cores)
  python -m experiments.lps_query --build --modelset=results/modelset_cpu/first_layer_kernels.npz
  # or a probe of layer 1 that reads models of any width (a ResNet-20 at 2x width, say)
  python -m experiments.lps_query --build --method=gram --index=runs/lps_index_gram
  # then: any number of checkpoints (.npz, .safetensors, .msgpack, .pt/.pth, orbax folders)
  python -m experiments.lps_query model_a.pt model_b.safetensors [--format=json]

Conv layers are found automatically (3x3 kernels in network order; PyTorch / safetensors files
are OIHW, the others HWIO: --layout overrides) or named with --layers.
"""
import json
import sys

from absl import flags

from lps_jax.common.errors import UserError
from experiments import flagdefs
from lps_jax.align import fit as second_order_fit
from lps_jax.common import locks
from lps_jax.common.checks import Range
from lps_jax.methods import registry as methods
from lps_jax.query import index
from lps_jax.training import modelset
from lps_jax.zoo import foreign_checkpoints as checkpoints

flags.DEFINE_bool('build', False, 'Build (or rebuild) the index from --modelset first.')
flags.DEFINE_string('modelset', 'results/modelset_cpu/first_layer_kernels.npz',
                    'Model set to index: a kernels .npz or a model set folder.')
flags.DEFINE_string('index', 'runs/lps_index', 'The index folder.')
flags.DEFINE_enum('method', 'lps', index.method_names(),
                  'Method of the index (lps_jax/methods/registry.py): a second-order network, or a kernel '
                  'probe; gram and weight_stats read models of any width.')
flagdefs.define(second_order_fit.SecondOrderConfig, skip=('method', 'split_seed'))
flags.DEFINE_list('layers', None, 'Names of the conv kernels in the checkpoints, in network '
                  'order (default: found automatically).')
flags.DEFINE_enum('layout', 'auto', list(checkpoints.LAYOUTS),
                  'Kernel layout in the checkpoints; auto: OIHW for .pt/.pth/.bin/.safetensors, '
                  'HWIO otherwise.')
flags.DEFINE_integer('top', 5, 'Tasks and models to list per query.')
flags.DEFINE_enum('format', 'table', ['table', 'json'], 'Output format.')
flagdefs.input_path('modelset', when=lambda f: f.build)
flagdefs.input_path('index', 'dir', when=lambda f: not f.build,
                    hint='Build one with --build --modelset=... (and this --index).')
flagdefs.output_path('index', 'dir', when=lambda f: f.build)
flagdefs.check('top', Range(1, integer=True))
FLAGS = flags.FLAGS


def build_index():
  from tqdm import tqdm
  config = flagdefs.build(second_order_fit.SecondOrderConfig, FLAGS, skip=('method', 'split_seed'))
  m = methods.get(FLAGS.method)
  kernels, task_id, _, run = modelset.load_kernels(FLAGS.modelset, m.num_layers(config))
  with locks.exclusive(FLAGS.index, 'index', '--index'):   # one build per index folder
    bar = tqdm(total=m.fit_count(config), file=sys.stderr, desc=f'index: {FLAGS.method} fit')
    idx = index.build(kernels, task_id, run, FLAGS.method, config, source=FLAGS.modelset,
                      progress=lambda e, loss: bar.update(1))
    bar.close()
    index.save(FLAGS.index, idx)
  print(f'index of {len(task_id)} models, {idx.tasks.size} tasks ({FLAGS.method}) written to '
        f'{FLAGS.index}', file=sys.stderr)
  return idx


def answer(idx, path):
  layout = checkpoints.default_layout(path) if FLAGS.layout == 'auto' else FLAGS.layout
  arrays = checkpoints.read_arrays(path)
  kernels, names = checkpoints.conv_kernels(arrays, idx.num_layers, layout, FLAGS.layers,
                                            origin=path)
  index.check_kernels(idx, kernels, path)
  return dict(index.query(idx, kernels, FLAGS.top), checkpoint=path, layers=names)


def table(res) -> str:
  lines = [f'## {res["checkpoint"]} (layers: {", ".join(res["layers"])})', '',
           '| rank | task (fine labels) | probability | model (task/run) | cosine |',
           '|---|---|---|---|---|']
  for i, (t, m) in enumerate(zip(res['tasks'], res['models']), 1):
    lines.append(f'| {i} | {t["task"]} ({t["fine_labels"][0]}, {t["fine_labels"][1]}) | '
                 f'{t["probability"]:.3f} | {m["task"]}/{m["run"]} | {m["cosine"]:.3f} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  paths = argv[1:]
  try:
    idx = build_index() if FLAGS.build else index.load(FLAGS.index)
  except UserError as e:
    sys.exit(f'error: {e}')
  if not paths:
    if not FLAGS.build:
      sys.exit('error: name checkpoints to query, e.g. python -m experiments.lps_query '
               'model.pt (or --build to build the index).')
    return
  out, errors = [], []
  for p in paths:   # A bad checkpoint does not cost the answers for the others.
    try:
      out.append(answer(idx, p))
    except UserError as e:
      errors.append(str(e))
  if out and FLAGS.format == 'json':
    print(json.dumps(out if len(paths) > 1 else out[0], indent=1))
  elif out:
    print('\n'.join(table(r) for r in out))
  if errors:
    sys.exit('\n'.join(f'error: {e}' for e in errors))


if __name__ == '__main__':
  flagdefs.run(main)
