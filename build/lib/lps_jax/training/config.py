"""Configurations of first-order population training (Sec. 5), defined once.

Each field's default is the paper's (or the measured-fastest way to run) and its `help`
metadata is the command-line help: `experiments/flagdefs.py` derives the apps' flags from these
dataclasses, so a default is never written twice.

  TrainConfig       the first-order recipe of one model (SGD, schedule, batch);
  PopulationConfig  which models make the population (tasks, runs, seeds, data, architecture);
  ExecutionConfig   how to run it (strategy, step formulation, chunks, devices, checkpoints);
                    it does not change what is computed beyond float rounding.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Optional

import jax

from lps_jax.common import checks as config_checks
from lps_jax.common.checks import Range, valid
from lps_jax.common.errors import UserError
from lps_jax.training import batch_norm, data, resnet

# Per-model execution strategies (lps_jax.training.popmap): loop = one program per model, models spread
# over the devices; vmap / unroll = one program for a device's models, inside shard_map.
STRATEGIES = ('loop', 'vmap', 'unroll')
# fused = forward, backward and update in one program; split (loop strategy) = forward + VJP
# residuals in one program, backward + update in a second (XLA:CPU otherwise re-computes
# activations inside slow transposes for the weight gradients: see BENCHMARKS.md).
STEP_FORMULATIONS = ('fused', 'split')
# Fastest correct (strategy, conv_impl, step, norm_impl) per backend, measured with
# `python -m experiments.benchmark --suites=train` (BENCHMARKS.md).
# On CPU the oneDNN convs and batch norm are the default where the optional extra is installed
# (BENCHMARKS.md); without it, lax and flax, and the log says why (`auto_onednn`).
DEFAULT_EXECUTION = {'cpu': ('loop', 'onednn', 'split', 'onednn'),
                     'gpu': ('vmap', 'lax', 'fused', 'flax'),
                     'tpu': ('vmap', 'lax', 'fused', 'flax')}


@functools.cache
def auto_onednn(preferred: str, fallback: str) -> str:
  """`preferred` if it can run here; a oneDNN impl without its extra gives `fallback`, said once
  in the log (an explicit --conv_impl=onednn or --norm_impl=onednn fails instead)."""
  if not preferred.startswith('onednn'):
    return preferred
  from lps_jax.training.onednn import build, library
  try:
    library.load()
    return preferred
  except build.OneDNNUnavailable as e:
    logging.warning('auto: %s, not %s (%s)', fallback, preferred, e)
    return fallback


def _help(text: str, **extra) -> dict:
  return {'help': text, **extra}


INT0, INT1 = Range(0, integer=True), Range(1, integer=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """First-order recipe of one model; defaults are the paper's (Sec. 5)."""
  epochs: int = dataclasses.field(default=160, metadata=valid(INT1, 'Training epochs.'))
  batch_size: int = dataclasses.field(default=128, metadata=valid(INT1,
                                                                  'Images per model per step.'))
  learning_rate: float = dataclasses.field(default=0.1, metadata=valid(
      Range(0, open=True), 'Initial learning rate.'))
  lr_boundaries: tuple[int, ...] = dataclasses.field(
      default=(80, 120), metadata=valid(INT1, 'Epochs after which the learning rate is '
                                              'multiplied by lr_decay.'))
  lr_decay: float = dataclasses.field(default=0.1, metadata=valid(
      Range(0, 1), 'Learning-rate step factor.'))
  momentum: float = dataclasses.field(default=0.9, metadata=valid(Range(0, 1), 'SGD momentum.'))
  weight_decay: float = dataclasses.field(
      default=1e-4, metadata=valid(Range(0), 'Weight decay, coupled as in torch.optim.SGD.'))
  drop_remainder: bool = dataclasses.field(
      default=False, metadata=_help(
          'Drop the last partial batch of each epoch. The paper trains with PyTorch, whose '
          'DataLoader keeps it (drop_last=False): 1,000 images at batch 128 = 7 full batches + '
          'one of 104 = 8 updates per epoch.'))

  def __post_init__(self):
    config_checks.check(self)
    late = [b for b in self.lr_boundaries if b >= self.epochs]
    if late:
      raise UserError(f'--lr_boundaries={",".join(map(str, self.lr_boundaries))}: epoch {late[0]} '
                       f'is not inside the {self.epochs} epochs (--epochs); lower it.')

  def steps_per_epoch(self, n_train: int) -> int:
    """Updates per epoch for `n_train` images per model (the partial batch counts unless
    `drop_remainder`)."""
    if n_train < self.batch_size:
      raise UserError(f'batch_size {self.batch_size} exceeds the {n_train} training images '
                       'per task; lower --batch_size.')
    full, rest = divmod(n_train, self.batch_size)
    return full + (1 if rest and not self.drop_remainder else 0)

  def batch_sizes(self, n_train: int) -> list[int]:
    """The batch size of each step of an epoch."""
    full, rest = divmod(n_train, self.batch_size)
    return [self.batch_size] * full + ([rest] if rest and not self.drop_remainder else [])


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
  """Everything that determines a trained population (saved with checkpoints and model set)."""
  task_ids: tuple[int, ...] = dataclasses.field(
      default=tuple(range(data.NUM_TASKS)),
      metadata=_help('Tasks r (fine labels 2r, 2r+1) to train.'))
  runs_per_task: int = dataclasses.field(
      default=10, metadata=valid(INT1, 'Independent runs (models) per task.'))
  seed: int = dataclasses.field(default=0, metadata=valid(INT0, 'Base seed of every model key.'))
  split_seed: int = dataclasses.field(
      default=0, metadata=valid(INT0, 'Seed of the per-task choice and order of images.'))
  holdout_fraction: float = dataclasses.field(
      default=0.2, metadata=valid(Range(0, 1, open=True),
                                  'Held-out fraction per class (npz_test_only only).'))
  dataset: str = dataclasses.field(
      default='tfds', metadata=_help(
          'tfds: CIFAR-100 through tensorflow-datasets. npz: a folder in the offline format '
          '(train_*.npz + test.npz, --data_dir). Both train on the train split (1,000 images '
          'per task) and hold out the test split (200). npz_test_only: only test.npz of the '
          'folder, 80/20 per class (160 / 40 images per task; the older model sets).',
          choices=('tfds', 'npz', 'npz_test_only')))
  model: resnet.ResNetConfig = resnet.ResNetConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    config_checks.check(self)
    outside = [t for t in self.task_ids if not (isinstance(t, int) and 0 <= t < data.NUM_TASKS)]
    if not self.task_ids or outside:
      raise UserError(f'--task_ids: {outside[0] if outside else "none given"}; tasks are '
                       '0-49 (task r = fine labels 2r, 2r+1 of CIFAR-100).')

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @staticmethod
  def from_json(d: dict) -> 'PopulationConfig':
    d = dict(d)
    d['model'] = resnet.ResNetConfig.from_dict(d['model'])
    d['train'] = TrainConfig(**resnet.tuples_from_json(d['train']))
    d['task_ids'] = tuple(d['task_ids'])
    return PopulationConfig(**d)

  def models(self) -> list[tuple[int, int]]:
    """(task_id, run) of every model, task-major: model m = (task_ids[m // runs], m % runs)."""
    return [(t, r) for t in self.task_ids for r in range(self.runs_per_task)]


# Simulated host devices of the apps on CPU (jax_num_cpu_devices): one per core of the 2-core
# machines measured in BENCHMARKS.md; the trainer and the benchmark's `default` share it.
CPU_DEVICES = 2


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """How to run (does not change what is computed beyond float rounding)."""
  strategy: str = dataclasses.field(
      default='auto', metadata=_help(
          'How the population runs: loop (one program per model, models spread over the '
          'devices), vmap or unroll (one program per device, inside shard_map); auto = the '
          'fastest measured on this backend.', choices=('auto',) + STRATEGIES))
  conv_impl: str = dataclasses.field(
      default='auto', metadata=_help(
          'Conv formulation: lax, im2col (patches @ kernel), lax_bf16 (bfloat16 inputs, float32 '
          'accumulation), onednn / onednn_bf16 (oneDNN custom calls, CPU only, the optional '
          'extra: pip install -e .[onednn]); auto = the fastest measured on this backend.',
          choices=('auto',) + resnet.CONV_IMPLS))
  step: str = dataclasses.field(
      default='auto', metadata=_help(
          'fused: one program per step; split (loop strategy): forward + VJP, then backward + '
          'update (faster on XLA:CPU); auto = the fastest measured on this backend.',
          choices=('auto',) + STEP_FORMULATIONS))
  models_per_chunk: int = dataclasses.field(
      default=10, metadata=valid(INT1, 'Models trained together (bounds memory); a finished '
                                       'chunk is saved and never retrained.'))
  num_devices: int = dataclasses.field(
      default=0, metadata=valid(INT0, 'Devices to spread the population over (0 = all).'))
  checkpoint_every: int = dataclasses.field(
      default=10, metadata=valid(INT1, 'Checkpoint the chunk in progress every N epochs.'))
  eval_every: int = dataclasses.field(
      default=10, metadata=valid(INT1, 'Held-out evaluation for the progress bar every N '
                                       'epochs.'))
  conv_threads: int = dataclasses.field(
      default=0, metadata=valid(INT0, 'OpenMP threads of each oneDNN call (--conv_impl=onednn*, '
                                      '--norm_impl=onednn); 0 = the cores divided by the '
                                      'devices running at once.'))
  norm_impl: str = dataclasses.field(
      default='auto', metadata=_help(
          'Batch norm in training: flax (nn.BatchNorm, then the ReLU / residual add in XLA) or '
          'onednn (one oneDNN call each way with the ReLU fused; CPU only, the optional extra); '
          'auto = the fastest measured on this backend. Evaluation is the same formula in both.',
          choices=('auto',) + batch_norm.NORM_IMPLS))

  def __post_init__(self):
    config_checks.check(self)

  def resolve(self, backend: Optional[str] = None) -> 'ExecutionConfig':
    """Fills in 'auto' for the backend and checks the combination."""
    backend = backend or jax.default_backend()
    strategy, conv_impl, step, norm_impl = DEFAULT_EXECUTION.get(
        backend, ('loop', 'lax', 'fused', 'flax'))
    explicit_strategy = self.strategy != 'auto'
    strategy = self.strategy if explicit_strategy else strategy
    conv_impl = auto_onednn(conv_impl, 'lax') if self.conv_impl == 'auto' else self.conv_impl
    norm_impl = auto_onednn(norm_impl, 'flax') if self.norm_impl == 'auto' else self.norm_impl
    if self.step != 'auto':
      step = self.step
    elif explicit_strategy and strategy != 'loop':
      step = 'fused'
    if strategy not in STRATEGIES:
      raise UserError(f'unknown strategy {strategy!r}; choose from {STRATEGIES} or auto.')
    if conv_impl not in resnet.CONV_IMPLS:
      raise UserError(f'unknown conv_impl {conv_impl!r}; choose from {resnet.CONV_IMPLS}.')
    if step not in STEP_FORMULATIONS:
      raise UserError(f'unknown step {step!r}; choose from {STEP_FORMULATIONS} or auto.')
    if step == 'split' and strategy != 'loop':
      raise UserError(f'--step=split runs with --strategy=loop (one model after another); '
                       f'{strategy} runs a device\'s models in one program: use --step=fused.')
    n_all = jax.device_count()
    n_dev = self.num_devices or n_all
    if jax.process_count() > 1:
      if strategy == 'loop':
        raise UserError('the per-model loop runs in one process; with several processes use '
                         "--strategy=vmap or unroll.")
      if n_dev != n_all:
        raise UserError(f'num_devices={n_dev}, but a run over {jax.process_count()} processes '
                         f'shards over all {n_all} devices: pass --num_devices=0.')
    if n_dev > n_all:
      raise UserError(f'num_devices={n_dev} but only {n_all} devices exist; on CPU raise '
                       '--num_cpu_devices or lower --num_devices.')
    if norm_impl not in batch_norm.NORM_IMPLS:
      raise UserError(f'unknown norm_impl {norm_impl!r}; choose from {batch_norm.NORM_IMPLS}.')
    threads = self.conv_threads
    onednn = [f'--{flag}={impl}' for flag, impl in (('conv_impl', conv_impl),
                                                     ('norm_impl', norm_impl))
              if impl.startswith('onednn')]
    if onednn:
      if backend != 'cpu':
        raise UserError(f'{" and ".join(onednn)} run on the CPU; on {backend} use '
                        '--conv_impl=lax --norm_impl=flax.')
      from lps_jax.training.onednn import library
      library.load()   # OneDNNUnavailable (one line: what is missing) before any compile
      threads = threads or max(1, len(os.sched_getaffinity(0)) // n_dev)
    return dataclasses.replace(self, strategy=strategy, conv_impl=conv_impl, step=step,
                               num_devices=n_dev, conv_threads=threads, norm_impl=norm_impl)
