"""ModelSet500 slices: check the manifest and merge, export a finished workdir, replay a model.

  python -m experiments.slices                       # check results/modelset500, merge, manifest
  python -m experiments.slices --action=export --workdir=runs/modelset500/tasks_00-00
  python -m experiments.slices --action=replay --slice=results/modelset500/tasks_00-00 \
      --model=0:3                                    # retrain task 0 run 3, compare bit for bit
  python -m experiments.slices --action=stage --task_ids=10-49   # images for a lent GPU

check / merge: every slice under --root readable and matching its digest, one recipe for all,
no task twice, no gaps (unless --allow_gaps); writes --out (the tasks present, in the format of
`results/modelset_cpu/first_layer_kernels.npz`) and <root>/manifest.{json,md}.
export: records a finished train_population workdir as a slice (what --export_slice does at the
end of a run). replay: retrains one model of a slice from its record on this machine for
--replay_epochs (default: the recorded early epochs if the slice has them, else all) and
compares its first layer with the slice's; bitwise on CPU with the slice's conv impl.
stage: the tasks' images in parts of <= --part_mib for a device call (lps_jax.zoo.stage).
"""
import json
import os
import sys

from absl import flags

from experiments import flagdefs
from lps_jax.common.checks import Range
from lps_jax.common.errors import UserError
from lps_jax.training import data as data_lib
from lps_jax.zoo import manifest as manifest_lib
from lps_jax.zoo import slice_folder as slices

flags.DEFINE_enum('action', 'merge', ['check', 'merge', 'export', 'replay', 'stage'],
                  'What to do.')
flags.DEFINE_string('root', 'results/modelset500', 'The folder of the slices (tasks_* folders).')
flags.DEFINE_string('out', 'results/modelset500/first_layer_kernels.npz',
                    'merge: the kernels file of the tasks present.')
flags.DEFINE_bool('stage1', False, 'merge: also layers 2-7 (float16), for Fig. 3b branches 1-7.')
flags.DEFINE_bool('allow_gaps', False, 'check / merge: accept missing tasks below the highest.')
flags.DEFINE_string('workdir', None, 'export: a finished train_population work directory.')
flags.DEFINE_string('slice', None, 'replay: the slice folder.')
flags.DEFINE_string('model', None, 'replay: TASK:RUN of the model to retrain (default: the '
                    "slice's first).")
flags.DEFINE_integer('replay_epochs', None, 'replay: epochs to retrain (default: see above).')
flags.DEFINE_string('data_dir', data_lib.default_data_dir(),
                    f'replay / stage / export (the probe logits): offline data folder; default '
                    f'${data_lib.DATA_DIR_ENV}.')
flags.DEFINE_integer('num_cpu_devices', 2, 'replay: simulated CPU devices (as the slice ran).')
flags.DEFINE_list('task_ids', None, 'stage: the tasks (ranges A-B) whose images to stage.')
flags.DEFINE_string('stage_dir', '.stage', 'stage: where the parts go (git-ignored; a device '
                    'call carries one part: experiments/scripts/gpu_slices.sh).')
flags.DEFINE_float('part_mib', 56, 'stage: the most MiB of images in one part.')


def model_id(value: str) -> tuple[int, int]:
  """'TASK:RUN' -> (task, run)."""
  parts = value.split(':')
  if len(parts) != 2 or not all(p.isdigit() for p in parts):
    raise UserError('use TASK:RUN, e.g. 0:3.')
  return int(parts[0]), int(parts[1])


flagdefs.input_path('root', 'dir', when=lambda f: f.action in ('check', 'merge'))
flagdefs.output_path('root', 'dir', when=lambda f: f.action == 'export')
flagdefs.output_path('out', 'file', when=lambda f: f.action == 'merge')
flagdefs.input_path('workdir', 'dir', when=lambda f: f.action == 'export')
flagdefs.input_path('slice', 'dir', when=lambda f: f.action == 'replay')
flagdefs.parsed('model', model_id)
flagdefs.check('replay_epochs', Range(1, integer=True))
flagdefs.check('num_cpu_devices', Range(1, integer=True))
flagdefs.input_path('data_dir', 'dir', when=lambda f: f.action in ('replay', 'stage', 'export'))
flagdefs.parsed('task_ids', data_lib.parse_task_ids)
flagdefs.output_path('stage_dir', 'dir', when=lambda f: f.action == 'stage')
flagdefs.check('part_mib', Range(0, open=True))
FLAGS = flags.FLAGS


def _merge(check_only: bool) -> None:
  if check_only:
    manifest = manifest_lib.check(FLAGS.root, allow_gaps=FLAGS.allow_gaps)
  else:
    manifest = manifest_lib.merge(FLAGS.root, FLAGS.out, stage1=FLAGS.stage1,
                                  allow_gaps=FLAGS.allow_gaps)
  text = manifest_lib.manifest_markdown(manifest)
  with open(os.path.join(FLAGS.root, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  with open(os.path.join(FLAGS.root, 'manifest.md'), 'w') as f:
    f.write(text)
  print(text)
  if not check_only:
    print(f'{manifest["num_models"]} models of tasks {manifest["tasks"]} written to {FLAGS.out}')


def _export() -> None:
  from lps_jax.training import modelset
  from lps_jax.zoo import whole_models as slice_models
  from lps_jax.training import workdir
  if not FLAGS.workdir:
    raise slices.SliceError('--action=export needs --workdir (a finished train_population run).')
  result = modelset.load(FLAGS.workdir)
  timing = workdir.read_timing(FLAGS.workdir)
  if not timing:
    raise slices.SliceError(f'{FLAGS.workdir} has no timing.json: it is not a finished run.')
  execution = slices.execution_of(timing[-1])
  chunks = len(os.listdir(os.path.join(FLAGS.workdir, 'chunks')))
  test = data_lib.test_split(result.config['dataset'], FLAGS.data_dir)
  folder = slices.export(FLAGS.root, result, execution,
                         sum(t['wall_seconds'] for t in timing),
                         'python -m experiments.train_population ' + ' '.join(timing[-1]['argv']),
                         early=workdir.early_kernels(FLAGS.workdir, chunks, slices.RECORD_EPOCHS),
                         logits=slice_models.probe_logits(result, test.images, test.labels),
                         trajectory=workdir.trajectory(FLAGS.workdir, chunks,
                                                       slices.TRAJECTORY_EPOCHS))
  print(f'slice written to {folder}')


def _stage() -> None:
  from lps_jax.zoo import stage
  if not FLAGS.task_ids:
    raise slices.SliceError('--action=stage needs --task_ids (e.g. 10-49).')
  out = stage.stage(FLAGS.data_dir, data_lib.parse_task_ids(FLAGS.task_ids), FLAGS.stage_dir,
                    FLAGS.part_mib)
  for p in out['parts']:
    print(f'{FLAGS.stage_dir}/{p["folder"]}: tasks {p["tasks"][0]}-{p["tasks"][-1]}, '
          f'{p["bytes"] / 2**20:.1f} MiB')


def _replay() -> None:
  import jax
  jax.config.update('jax_num_cpu_devices', FLAGS.num_cpu_devices)
  if not FLAGS.slice:
    raise slices.SliceError('--action=replay needs --slice (a slice folder).')
  model = model_id(FLAGS.model) if FLAGS.model else None
  r = slices.replay_check(FLAGS.slice, FLAGS.data_dir, model, FLAGS.replay_epochs)
  print(json.dumps(r, indent=1))
  if not r['equal'] and r['bitwise_expected']:
    sys.exit(f'error: the replay differs from the slice (max |diff| {r["max_abs_diff"]:.3g}).')


def main(argv):
  del argv
  try:
    if FLAGS.action in ('check', 'merge'):
      _merge(FLAGS.action == 'check')
    elif FLAGS.action == 'export':
      _export()
    elif FLAGS.action == 'stage':
      _stage()
    else:
      _replay()
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flagdefs.run(main)
