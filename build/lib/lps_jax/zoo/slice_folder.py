"""ModelSet500 built in slices of whole tasks, on whatever machine a session has (Sec. 5).

Models are independent and the CPU trainer is deterministic, so the paper's set can be trained a
few tasks at a time, across sessions and machines. A finished slice is a small folder
`<root>/tasks_AA-BB/` (never data, never the full weights):

  kernels.npz  'kernel/conv1' float32 (exact), the other stage-1 kernels ('kernel/<layer>',
               layers 2-7) float16, 'dense/kernel' + 'dense/bias', 'early/conv1' (the first
               layer after `RECORD_EPOCHS` epochs, float32, when the trainer recorded it),
               task_id, run, seed, heldout_accuracy, config (JSON);
  models.safetensors  (slices from task 12 on) every model whole, its logits on a fixed probe
               batch and its first-layer training trajectory (`lps_jax.zoo.whole_models`);
  slice.json   the record: tasks, the PopulationConfig, how it ran (strategy, conv impl, step,
               devices, threads), backend and hardware, jax / jaxlib (and oneDNN) versions, wall
               time, command, the sha256 of kernels.npz (and of models.safetensors).

`lps_jax.zoo.manifest` checks the slices of a folder against each other and merges them. GPU
slices share the recipe, not the rounding: a replay on a CPU reproduces CPU slices bit for bit
(`replay_check`), GPU slices only within tolerance.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import zipfile
from typing import Optional, Sequence

import numpy as np

from lps_jax.common import files
from lps_jax.common.errors import UserError
from lps_jax.training import hooks, workdir
from lps_jax.training import modelset, resnet

KERNELS, RECORD = 'kernels.npz', 'slice.json'
RECORD_EPOCHS = 2          # the replay check compares each model's first layer after this many epochs
# The first-layer training trajectory each slice keeps (from task 12 on), epochs after which.
TRAJECTORY_EPOCHS = (1, 2, 5, 10, 20, 40, 80, 120, 160)


class SliceError(UserError):
  """A missing, damaged or inconsistent slice; the message names it and says what to do."""


class TrajectoryRecorder:
  """A trainer hook (`training.hooks`): each model's first-layer kernel after each of `epochs`,
  kept in the work directory (`workdir.early_kernels` / `workdir.trajectory`): the slices'
  training trajectory and the replay check's reference."""

  def __init__(self, epochs=TRAJECTORY_EPOCHS):
    self.epochs = frozenset(int(e) for e in epochs)

  def __call__(self, epoch: hooks.EpochEnd) -> None:
    if epoch.done in self.epochs:   # gathering is collective: every process, one writes
      early = np.asarray(epoch.host_state()['params']['conv1']['kernel'])[:epoch.n_real]
      if hooks.is_writer():
        workdir.save_early_kernels(epoch.workdir, epoch.chunk_index, early, epoch.done)


def slice_name(task_ids: Sequence[int]) -> str:
  """tasks_AA-BB for a contiguous range; else the ranges joined by '_' (tasks_00-03_07-07)."""
  ids = sorted(task_ids)
  runs, start = [], ids[0]
  for prev, cur in zip(ids, ids[1:] + [None]):
    if cur != prev + 1:
      runs.append(f'{start:02d}-{prev:02d}')
      start = cur
  return 'tasks_' + '_'.join(runs)


def stage1_layers(config: resnet.ResNetConfig) -> list[str]:
  """The stem and the first stage's convs (layers 1-7 of ResNet-20)."""
  return resnet.conv_layer_names(config)[:1 + 2 * config.blocks_per_stage[0]]


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def hardware() -> dict:
  """Backend, device kind, CPU model and ISA flags that decide oneDNN's kernels, cores."""
  import jax
  cpu, flags = platform.processor(), []
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          cpu = value.strip()
        if key.strip() == 'flags':
          flags = [x for x in value.split() if x.startswith(('avx512', 'amx', 'avx2'))]
          break
  except OSError:
    pass
  return {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'cpu': cpu, 'cpu_isa': sorted(flags),
          'cores': len(os.sched_getaffinity(0)), 'host': platform.node()}


def versions(execution) -> dict:
  import jax
  import jaxlib
  out = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__}
  if 'onednn' in (execution.conv_impl[:6], execution.norm_impl):
    from lps_jax.training.onednn import library
    out['onednn'] = library.version()
  return out


def export(root: str, result: modelset.ModelSet, execution, wall_seconds: float,
           command: str, early: Optional[np.ndarray] = None,
           logits: Optional[np.ndarray] = None, trajectory: Optional[dict] = None) -> str:
  """Writes the slice of model set `result` (trained with ExecutionConfig `execution`) under
  `root`; returns its folder. `early`: each model's conv1 after RECORD_EPOCHS epochs. With
  `trajectory` ({epoch: conv1 kernels}) and `logits` (on the probe batch), the models are kept
  whole too (`lps_jax.zoo.whole_models`)."""
  from lps_jax.zoo import whole_models as slice_models
  from lps_jax.training.config import PopulationConfig
  config = PopulationConfig.from_json(result.config)
  tasks = sorted(set(result.task_id.tolist()))
  folder = os.path.join(root, slice_name(tasks))
  os.makedirs(folder, exist_ok=True)
  layers = stage1_layers(config.model)
  arrays = {f'kernel/{n}': np.asarray(resnet.get_kernel(result.params, n),
                                      np.float32 if n == layers[0] else np.float16)
            for n in layers}
  arrays['dense/kernel'] = np.asarray(result.params['dense']['kernel'], np.float32)
  arrays['dense/bias'] = np.asarray(result.params['dense']['bias'], np.float32)
  if early is not None:
    arrays['early/conv1'] = np.asarray(early, np.float32)
  with files.atomic_path(os.path.join(folder, KERNELS), '.npz') as tmp:
    np.savez_compressed(tmp, task_id=result.task_id, run=result.run, seed=result.seed,
                        heldout_accuracy=result.heldout_accuracy,
                        config=np.asarray(json.dumps(result.config)), **arrays)
  digests = {KERNELS: _sha256(os.path.join(folder, KERNELS))}
  whole = None
  if trajectory is not None:
    path = os.path.join(folder, slice_models.MODELS)
    size = slice_models.write(path, result, logits, trajectory)
    digests[slice_models.MODELS] = _sha256(path)
    whole = {'file': slice_models.MODELS, 'bytes': size, 'format': slice_models.FORMAT,
             'trajectory_epochs': sorted(int(e) for e in trajectory),
             'probe_logits': None if logits is None else list(np.shape(logits)[1:])}
  record = {
      'tasks': tasks, 'num_models': len(result), 'config': result.config,
      'execution': dataclasses.asdict(execution), 'hardware': hardware(),
      'versions': versions(execution), 'wall_seconds': round(float(wall_seconds), 1),
      'command': command, 'record_epochs': RECORD_EPOCHS if early is not None else None,
      'heldout_accuracy_mean': float(np.mean(result.heldout_accuracy)),
      'whole': whole, 'sha256': digests}
  files.write_json(os.path.join(folder, RECORD), record)
  return folder


@dataclasses.dataclass
class Slice:
  folder: str
  record: dict
  arrays: dict       # name -> np.ndarray, everything in kernels.npz

  @property
  def tasks(self) -> list[int]:
    return self.record['tasks']


def read(folder: str) -> Slice:
  """One slice, checked: record and kernels readable, digest matching, contents consistent."""
  rec_path, npz_path = os.path.join(folder, RECORD), os.path.join(folder, KERNELS)
  for p in (rec_path, npz_path):
    if not os.path.isfile(p):
      raise SliceError(f'slice {folder}: {os.path.basename(p)} is missing; re-export it from '
                       'its workdir (python -m experiments.slices export) or retrain the slice.')
  try:
    with open(rec_path) as f:
      record = json.load(f)
    tasks, _ = record['tasks'], record['sha256'][KERNELS]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SliceError(f'slice {folder}: {RECORD} is unreadable ({type(e).__name__}: {e}); '
                     're-export the slice.') from e
  for name, digest in record['sha256'].items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise SliceError(f'slice {folder}: {name} is missing; re-export it from its workdir '
                       '(python -m experiments.slices --action=export) or retrain the slice.')
    if _sha256(path) != digest:
      raise SliceError(f'slice {folder}: {name} does not match the digest in {RECORD} '
                       '(changed or truncated since export); re-export or retrain the slice.')
  try:
    with np.load(npz_path) as f:
      arrays = {k: np.asarray(f[k]) for k in f.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise SliceError(f'slice {folder}: {KERNELS} is unreadable ({e}); re-export it.') from e
  n = record.get('num_models')
  bad = [k for k, v in arrays.items() if v.ndim and v.shape[0] != n]
  if bad or sorted(set(arrays['task_id'].tolist())) != tasks:
    raise SliceError(f'slice {folder}: arrays {bad} do not hold its {n} models of tasks '
                     f'{tasks}; re-export it.')
  for k, v in arrays.items():
    if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
      raise SliceError(f'slice {folder}: {k} holds NaN/Inf weights; retrain the slice.')
  return Slice(folder, record, arrays)


def execution_of(entry: dict):
  """The ExecutionConfig of a slice record or a timing.json line (older lines name only the
  strategy, conv impl, step and devices)."""
  from lps_jax.training.config import ExecutionConfig
  if 'execution' in entry:   # records from before the oneDNN batch norm ran Flax's
    return ExecutionConfig(**{'norm_impl': 'flax', **entry['execution']})
  return ExecutionConfig(entry['strategy'], entry['conv_impl'], entry['step'],
                         num_devices=entry['devices'], norm_impl='flax')


def replay_check(folder: str, data_dir: Optional[str], model: Optional[tuple] = None,
                 epochs: Optional[int] = None) -> dict:
  """Retrains one model of a slice from its record, on this machine, and compares its first
  layer with the slice's: after the recorded early epochs (default, when the slice has them)
  or after all epochs. Bitwise equality is expected when the slice ran on a CPU with the same
  conv impl; the result says which."""
  import dataclasses as dc
  import jax
  from lps_jax.training import data as data_lib
  from lps_jax.training import trainer
  from lps_jax.training.config import PopulationConfig
  s = read(folder)
  config = PopulationConfig.from_json(s.record['config'])
  task, run = model or (int(s.arrays['task_id'][0]), int(s.arrays['run'][0]))
  rows = np.flatnonzero((s.arrays['task_id'] == task) & (s.arrays['run'] == run))
  if not rows.size:
    raise SliceError(f'slice {folder} holds no model of task {task} run {run}.')
  early = s.record.get('record_epochs') if 'early/conv1' in s.arrays else None
  recorded = {config.train.epochs: s.arrays['kernel/conv1']}
  if early:
    recorded[early] = s.arrays['early/conv1']
  if (s.record.get('whole') or {}).get('trajectory_epochs'):
    from lps_jax.zoo import whole_models as slice_models
    recorded.update(slice_models.read(os.path.join(folder, slice_models.MODELS)).trajectory)
  epochs = epochs or early or config.train.epochs
  if epochs not in recorded:
    raise SliceError(f'slice {folder} records the first layer after epochs {sorted(recorded)}; '
                     f'replay one of those, not {epochs}.')
  want = recorded[epochs][rows[0]]
  ex = execution_of(s.record)
  ex = dc.replace(ex, models_per_chunk=1, num_devices=min(ex.num_devices, jax.device_count()))
  one = dc.replace(config, task_ids=(task,))
  splits = data_lib.load(config.dataset, data_dir, classes=data_lib.task_classes((task,)))
  got = trainer.PopulationTrainer(one, ex, *splits).replay(task, run, epochs)
  got = np.asarray(got['params']['conv1']['kernel'], np.float32)
  here = hardware()
  same_rounding = (s.record['hardware']['backend'] == here['backend'] == 'cpu'
                   and s.record['hardware']['cpu_isa'] == here['cpu_isa'])
  return {'slice': folder, 'task': task, 'run': run, 'epochs': epochs,
          'conv_impl': ex.conv_impl, 'norm_impl': ex.norm_impl, 'equal': bool(np.array_equal(got, want)),
          'max_abs_diff': float(np.abs(got - want).max()),
          'bitwise_expected': same_rounding,
          'recorded_on': s.record['hardware']['cpu'] or s.record['hardware']['device_kind'],
          'replayed_on': here['cpu']}
