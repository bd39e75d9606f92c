"""Trains a population of first-order ResNets (default: ModelSet500, Sec. 5) with resume.

  python -m experiments.train_population --flagfile=experiments/flags/modelset_cpu.flags
  python -m experiments.train_population --flagfile=experiments/flags/modelset500.flags

Re-running the same command resumes from the latest complete checkpoint in --workdir (finished
chunks are never retrained). The model set is written to <workdir>/modelset
(`lps_jax.training.modelset.load`). The recipe / population / execution flags come from the config
dataclasses in `lps_jax.training.config` (defaults = the paper's).
"""
import logging as py_logging
import os
import sys
import time

from absl import flags, logging

from lps_jax.common.errors import UserError
from experiments import flagdefs
from lps_jax.common.checks import Range
from lps_jax.training import config as train_config
from lps_jax.training import data as data_lib
from lps_jax.training import resnet
from lps_jax.zoo import slice_folder as slices

flagdefs.define(train_config.TrainConfig)
flagdefs.define(train_config.PopulationConfig, skip=('task_ids',))
flagdefs.define(resnet.ResNetConfig, skip=('num_classes',))
flagdefs.define(train_config.ExecutionConfig)
flags.DEFINE_integer('num_tasks', 50, 'Tasks 0..num_tasks-1 (task r = fine labels 2r, 2r+1).')
flags.DEFINE_list('task_ids', None, 'Explicit task ids or ranges (overrides --num_tasks), e.g. '
                  '0-9 for a slice of ModelSet500 on one machine of several: models are '
                  'independent.')
flags.DEFINE_string('data_dir', data_lib.default_data_dir(),
                    f'Offline data folder (train_*.npz + test.npz) for --dataset=npz; default '
                    f'${data_lib.DATA_DIR_ENV}.')
flags.DEFINE_string('tfds_data_dir', None, 'tensorflow-datasets data_dir (--dataset=tfds).')
flags.DEFINE_integer('num_cpu_devices', train_config.CPU_DEVICES,
                     'Simulated host devices when running on CPU.')
flags.DEFINE_string('workdir', 'runs/modelset500/{slice}', 'Checkpoints and the final model '
                    'set; {slice} becomes the tasks\' name, e.g. tasks_00-09.')
flags.DEFINE_string('export_kernels', None,
                    'If set, also write the first-layer kernels + metadata to this .npz '
                    '({slice} as in --workdir).')
flags.DEFINE_string('summary', None, 'If set, write a markdown summary (per-task accuracy; '
                    '{slice} as in --workdir).')
flags.DEFINE_string('export_slice', None, 'If set, record the finished run as a slice under '
                    'this folder (<folder>/tasks_AA-BB: kernels + record, lps_jax.zoo.slice_folder).')
flags.DEFINE_bool('progress', True, 'Show a progress bar.')
flags.DEFINE_integer('stop_after_epochs', None, 'Train at most this many epochs in this '
                     'invocation, checkpoint and exit 0 (job time limits); rerun to resume.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for a multi-process '
                    '(multi-host) run; see lps_jax/training/distributed.py for how to launch.')
flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (0 = coordinator).')
flags.DEFINE_enum('distributed', 'off', ['off', 'auto'], "'auto': jax.distributed.initialize() "
                  "with the cluster's auto-detection (SLURM, Open MPI, TPU pods).")
flags.DEFINE_integer('distributed_timeout', 120, 'Seconds to wait for the other processes.')
flagdefs.check('num_tasks', Range(1, data_lib.NUM_TASKS, integer=True))
for _name in ('stop_after_epochs', 'num_processes', 'distributed_timeout', 'num_cpu_devices'):
  flagdefs.check(_name, Range(1, integer=True))
flagdefs.check('process_id', Range(0, integer=True))
flagdefs.parsed('task_ids', data_lib.parse_task_ids)
flagdefs.input_path('data_dir', 'dir', when=lambda f: f.dataset != 'tfds')
flagdefs.input_path('tfds_data_dir', 'dir', must_exist=False)
for _name in ('workdir', 'export_slice'):
  flagdefs.output_path(_name, 'dir')
for _name in ('export_kernels', 'summary'):
  flagdefs.output_path(_name, 'file')
flagdefs.parsed('coordinator_address', flagdefs.host_port)
FLAGS = flags.FLAGS


def build_config() -> train_config.PopulationConfig:
  task_ids = (data_lib.parse_task_ids(FLAGS.task_ids) if FLAGS.task_ids
              else tuple(range(FLAGS.num_tasks)))
  return flagdefs.build(
      train_config.PopulationConfig, FLAGS, skip=('task_ids',), task_ids=task_ids,
      model=flagdefs.build(resnet.ResNetConfig, FLAGS, skip=('num_classes',)),
      train=flagdefs.build(train_config.TrainConfig, FLAGS))


class _DropOrbaxInfo(py_logging.Filter):
  """Keeps orbax's per-save INFO lines out of the training log."""

  def filter(self, record):
    return 'orbax' not in record.pathname or record.levelno >= 30


def _paths(config) -> dict:
  """--workdir / --export_kernels / --summary with {slice} filled in."""
  name = slices.slice_name(config.task_ids)
  return {k: FLAGS[k].value.replace('{slice}', name) if FLAGS[k].value else None
          for k in ('workdir', 'export_kernels', 'summary')}


def _write_outputs(result, wall, ex, paths, num_chunks, test):
  import jax
  from lps_jax.training import modelset, workdir
  command = 'python -m experiments.train_population ' + ' '.join(sys.argv[1:])
  wall = workdir.log_timing(paths['workdir'], wall, ex, sys.argv[1:])
  if paths['export_kernels']:
    modelset.export_kernels(paths['export_kernels'], result)
    logging.info('first-layer kernels written to %s', paths['export_kernels'])
  if FLAGS.export_slice:
    from lps_jax.zoo import whole_models as slice_models
    folder = slices.export(
        FLAGS.export_slice, result, ex, wall, command,
        early=workdir.early_kernels(paths['workdir'], num_chunks, slices.RECORD_EPOCHS),
        logits=slice_models.probe_logits(result, test.images, test.labels),
        trajectory=workdir.trajectory(paths['workdir'], num_chunks, slices.TRAJECTORY_EPOCHS))
    logging.info('slice recorded in %s (check and merge: python -m experiments.slices)', folder)
  if paths['summary']:
    with open(paths['summary'], 'w') as f:
      f.write(modelset.markdown_summary(
          result, wall_seconds=wall,
          machine=f'{jax.default_backend()} ({jax.devices()[0].device_kind}, '
                  f'{os.cpu_count()} CPU cores)',
          command=command))
    logging.info('summary written to %s', paths['summary'])


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_DropOrbaxInfo())
  import jax
  jax.config.update('jax_num_cpu_devices', FLAGS.num_cpu_devices)
  from lps_jax.training import distributed, trainer, workdir
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           auto=FLAGS.distributed == 'auto', timeout_s=FLAGS.distributed_timeout)
  except distributed.DistributedError as e:
    sys.exit(f'error: {e}')
  if jax.process_count() > 1:
    logging.info('process %d of %d: %d local / %d global devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    config = build_config()
    paths = _paths(config)
    train_split, eval_split = data_lib.load(config.dataset, FLAGS.data_dir, FLAGS.tfds_data_dir,
                                            classes=data_lib.task_classes(config.task_ids))
    test = None
    if FLAGS.export_slice:   # the whole models' probe batch: checked before any training
      from lps_jax.zoo import whole_models as slice_models
      test = data_lib.test_split(config.dataset, FLAGS.data_dir, FLAGS.tfds_data_dir)
      slice_models.check_probe(test.labels)
    execution = flagdefs.build(train_config.ExecutionConfig, FLAGS)
    pop_trainer = trainer.PopulationTrainer(config, execution, train_split, eval_split)
  except UserError as e:
    sys.exit(f'error: {e}')
  ex = pop_trainer.execution
  logging.info('%d models (%d tasks x %d runs), backend=%s strategy=%s conv=%s norm=%s '
               'step=%s devices=%d chunk=%d, %d images per task, %d updates per epoch '
               '(batches %s), %d updates per model', len(config.models()), len(config.task_ids),
               config.runs_per_task, jax.default_backend(), ex.strategy, ex.conv_impl,
               ex.norm_impl, ex.step, ex.num_devices, pop_trainer.chunk_size, pop_trainer.tasks.train_idx.shape[1],
               pop_trainer.steps_per_epoch, pop_trainer.batch_sizes[-2:],
               pop_trainer.steps_per_epoch * config.train.epochs)
  t0 = time.time()
  try:
    result = pop_trainer.train(paths['workdir'],
                               progress=FLAGS.progress and distributed.is_primary(),
                               stop_after_epochs=FLAGS.stop_after_epochs,
                               hooks=[slices.TrajectoryRecorder(slices.TRAJECTORY_EPOCHS)])
  except workdir.TrainingStopped as e:
    logging.info('%s', e)
    return
  except UserError as e:
    sys.exit(f'error: {e}')
  if not distributed.is_primary():
    return
  wall = time.time() - t0
  logging.info('done in %.0f s (this invocation): %d models, mean held-out accuracy %.3f; '
               'model set in %s', wall, len(result), float(result.heldout_accuracy.mean()),
               workdir.modelset_dir(paths['workdir']))
  _write_outputs(result, wall, ex, paths, len(pop_trainer.chunks()), test)


if __name__ == '__main__':
  flagdefs.run(main)
