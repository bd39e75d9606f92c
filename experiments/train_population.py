"""Trains a population of first-order ResNets (default: ModelSet500, Sec. 5) with resume.

  python -m experiments.train_population --flagfile=experiments/flags/modelset_test.flags
  python -m experiments.train_population --flagfile=experiments/flags/modelset500.flags

Re-running the same command resumes from the latest complete checkpoint in --workdir. The
finished model set is written to <workdir>/modelset (load it with lps_jax.modelset.load).
"""
import json
import logging as py_logging
import os
import sys
import time

from absl import app, flags, logging

flags.DEFINE_enum('dataset', 'tfds', ['tfds', 'npz'],
                  'tfds: CIFAR-100 via tensorflow-datasets (train split for training, test '
                  'split held out). npz: a local file (--npz_path), split 80/20 per class.')
flags.DEFINE_string('npz_path', None, 'Local .npz with image/label (default: vendored test split).')
flags.DEFINE_string('tfds_data_dir', None, 'tensorflow-datasets data_dir.')
flags.DEFINE_integer('num_tasks', 50, 'Tasks 0..num_tasks-1 (task r = fine labels 2r, 2r+1).')
flags.DEFINE_list('task_ids', None, 'Explicit task ids (overrides --num_tasks).')
flags.DEFINE_integer('runs_per_task', 10, 'Independent runs (models) per task.')
flags.DEFINE_integer('seed', 0, 'Base seed of every model key.')
flags.DEFINE_integer('split_seed', 0, 'Seed of the per-task train / held-out split.')
flags.DEFINE_float('holdout_fraction', 0.2, 'Held-out fraction per class (npz dataset).')
flags.DEFINE_integer('epochs', 160, 'Training epochs.')
flags.DEFINE_integer('batch_size', 128, 'Images per model per step.')
flags.DEFINE_float('learning_rate', 0.1, 'Initial learning rate.')
flags.DEFINE_list('lr_boundaries', ['80', '120'], 'Epochs after which lr is divided by 10.')
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.')
flags.DEFINE_float('weight_decay', 1e-4, 'Weight decay.')
flags.DEFINE_list('blocks_per_stage', ['3', '3', '3'], 'Basic blocks per stage (ResNet-20).')
flags.DEFINE_list('widths', ['16', '32', '64'], 'Channels per stage.')
flags.DEFINE_enum('strategy', 'auto', ['auto', 'loop', 'vmap', 'unroll'],
                  'How the population runs (auto = fastest measured for the backend).')
flags.DEFINE_enum('conv_impl', 'auto', ['auto', 'lax', 'im2col', 'lax_bf16'],
                  'Conv formulation (lax_bf16: bfloat16 inputs, float32 accumulation).')
flags.DEFINE_integer('models_per_chunk', 10, 'Models trained together; bounds memory.')
flags.DEFINE_integer('num_devices', 0, 'Devices to shard the population over (0 = all).')
flags.DEFINE_integer('num_cpu_devices', 2, 'Simulated host devices when running on CPU.')
flags.DEFINE_integer('checkpoint_every', 10, 'Checkpoint the chunk in progress every N epochs.')
flags.DEFINE_integer('eval_every', 10, 'Held-out evaluation for the progress bar every N epochs.')
flags.DEFINE_string('workdir', 'runs/modelset500', 'Checkpoints and the final model set.')
flags.DEFINE_string('export_kernels', None,
                    'If set, also write the first-layer kernels + metadata to this .npz.')
flags.DEFINE_string('summary', None, 'If set, write a markdown summary (per-task accuracy).')
flags.DEFINE_bool('progress', True, 'Show a progress bar.')
flags.DEFINE_integer('stop_after_epochs', None, 'Train at most this many epochs in this '
                     'invocation, checkpoint and exit 0 (job time limits); rerun to resume.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for a multi-process '
                    '(multi-host) run; see lps_jax/distributed.py for how to launch.')
flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (0 = coordinator).')
flags.DEFINE_enum('distributed', 'off', ['off', 'auto'], "'auto': jax.distributed.initialize() "
                  "with the cluster's auto-detection (SLURM, Open MPI, TPU pods).")
flags.DEFINE_integer('distributed_timeout', 120, 'Seconds to wait for the other processes.')
FLAGS = flags.FLAGS


def build_config():
  from lps_jax import population, resnet
  task_ids = (tuple(int(t) for t in FLAGS.task_ids) if FLAGS.task_ids
              else tuple(range(FLAGS.num_tasks)))
  return population.PopulationConfig(
      task_ids=task_ids, runs_per_task=FLAGS.runs_per_task, seed=FLAGS.seed,
      split_seed=FLAGS.split_seed, holdout_fraction=FLAGS.holdout_fraction,
      dataset=FLAGS.dataset,
      model=resnet.ResNetConfig(tuple(map(int, FLAGS.blocks_per_stage)),
                                tuple(map(int, FLAGS.widths))),
      train=population.TrainConfig(
          epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
          lr_boundaries=tuple(int(b) for b in FLAGS.lr_boundaries), momentum=FLAGS.momentum,
          weight_decay=FLAGS.weight_decay))


def load_data():
  from lps_jax import data
  if FLAGS.dataset == 'npz':
    return data.load_npz(FLAGS.npz_path or data.DEFAULT_NPZ), None
  return (data.load_tfds('train', FLAGS.tfds_data_dir),
          data.load_tfds('test', FLAGS.tfds_data_dir))


class _DropOrbaxInfo(py_logging.Filter):
  """Keeps orbax's per-save INFO lines out of the training log."""

  def filter(self, record):
    return 'orbax' not in record.pathname or record.levelno >= 30


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_DropOrbaxInfo())
  import jax
  jax.config.update('jax_num_cpu_devices', FLAGS.num_cpu_devices)
  from lps_jax import data, distributed, modelset, population
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
    train_split, eval_split = load_data()
    execution = population.ExecutionConfig(FLAGS.strategy, FLAGS.conv_impl,
                                           FLAGS.models_per_chunk, FLAGS.num_devices)
    trainer = population.PopulationTrainer(config, execution, train_split, eval_split,
                                           FLAGS.checkpoint_every, FLAGS.eval_every)
  except (data.DataError, ValueError) as e:
    sys.exit(f'error: {e}')
  ex = trainer.execution
  logging.info('%d models (%d tasks x %d runs), backend=%s strategy=%s conv=%s devices=%d '
               'chunk=%d, %d steps/epoch', len(config.models()), len(config.task_ids),
               config.runs_per_task, jax.default_backend(), ex.strategy, ex.conv_impl,
               ex.num_devices, trainer.chunk_size, trainer.steps_per_epoch)
  t0 = time.time()
  try:
    result = trainer.train(FLAGS.workdir, progress=FLAGS.progress and distributed.is_primary(),
                           stop_after_epochs=FLAGS.stop_after_epochs)
  except population.TrainingStopped as e:
    logging.info('%s', e)
    return
  except (population.TrainingError, modelset.ModelSetError) as e:
    sys.exit(f'error: {e}')
  if not distributed.is_primary():
    return
  wall = time.time() - t0
  logging.info('done in %.0f s (this invocation): %d models, mean held-out accuracy %.3f; '
               'model set in %s', wall, len(result), float(result.heldout_accuracy.mean()),
               os.path.join(FLAGS.workdir, 'modelset'))
  timing_path = os.path.join(FLAGS.workdir, 'timing.json')
  with open(timing_path, 'a') as f:
    f.write(json.dumps({'wall_seconds': wall, 'backend': jax.default_backend(),
                        'strategy': ex.strategy, 'conv_impl': ex.conv_impl,
                        'devices': ex.num_devices, 'argv': sys.argv[1:]}) + '\n')
  if FLAGS.export_kernels:
    modelset.export_kernels(FLAGS.export_kernels, result)
    logging.info('first-layer kernels written to %s', FLAGS.export_kernels)
  if FLAGS.summary:
    with open(FLAGS.summary, 'w') as f:
      f.write(modelset.markdown_summary(result, wall_seconds=wall,
                                        machine=f'{jax.default_backend()} '
                                                f'({jax.devices()[0].device_kind}, '
                                                f'{os.cpu_count()} CPU cores)',
                                        command='python -m experiments.train_population '
                                                + ' '.join(sys.argv[1:])))
    logging.info('summary written to %s', FLAGS.summary)


if __name__ == '__main__':
  app.run(main)
