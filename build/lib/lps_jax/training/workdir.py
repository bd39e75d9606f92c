"""The training work directory: what it holds, and the guards that keep runs from mixing.

  config.json               the PopulationConfig (a rerun with another config is refused)
  lock                      held (flock) by the run that trains here: a second run is refused
  chunks/chunk_NNNNN/       finished chunks, each a model set (lps_jax.training.modelset)
  ckpt/chunk_NNNNN/         the chunk in progress: chunk.json (its plan) + orbax checkpoints
  modelset/                 the final model set, once every chunk is done
  early/chunk_NNNNN_eEEEE.npy  each model's first-layer kernel after epoch EEEE (`record_epochs`)

Every write is atomic (temporary name + rename), so a process killed at any moment leaves the
last complete checkpoint and every finished chunk readable.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lps_jax.common import files
from lps_jax.common import locks
from lps_jax.common.errors import UserError
from lps_jax.training import distributed
from lps_jax.training.config import PopulationConfig


class TrainingStopped(Exception):
  """Raised after `train(stop_after_epochs=N)` saved its checkpoint: rerun to resume."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (NaN loss, bad checkpoint, ...); the message says what to do."""


@contextlib.contextmanager
def exclusive(workdir: str):
  """Holds the work directory's lock for a run (`lps_jax.common.locks`); a busy one is a
  TrainingError naming the holder."""
  try:
    lock = locks.hold(workdir, 'workdir', '--workdir')
  except locks.FolderBusy as e:
    raise TrainingError(str(e)) from None
  try:
    yield
  finally:
    lock.close()


def chunk_dir(workdir: str, index: int) -> str:
  return os.path.join(workdir, 'chunks', f'chunk_{index:05d}')


def ckpt_dir(workdir: str, index: int) -> str:
  return os.path.join(workdir, 'ckpt', f'chunk_{index:05d}')


def modelset_dir(workdir: str) -> str:
  return os.path.join(workdir, 'modelset')


def remove_partial_writes(path: str) -> list[str]:
  """Deletes what a killed process left half-written in work directory `path` (temporary
  model-set folders and JSON files; orbax cleans its own); finished work is untouched."""
  import glob
  import shutil
  stale = [p for pattern in ('chunks/*.tmp-*', 'chunks/*.old-*', 'modelset.tmp-*',
                             'modelset.old-*', '*.json.tmp*', 'ckpt/*/chunk.json.tmp*',
                             'early/.chunk_*.tmp*')   # names before `common.files`
           for p in glob.glob(os.path.join(path, pattern))]
  for p in stale:
    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  folders = [path] + glob.glob(os.path.join(path, '*/')) + glob.glob(os.path.join(path, 'ckpt/*/'))
  for folder in folders:
    stale += files.remove_stale_temporaries(folder)
  return stale


def _early_path(workdir: str, index: int, epoch: int) -> str:
  return os.path.join(workdir, 'early', f'chunk_{index:05d}_e{epoch:04d}.npy')


def save_early_kernels(workdir: str, index: int, kernels, epoch: int) -> None:
  """Keeps a chunk's first-layer kernels after `epoch` epochs (atomic)."""
  import numpy as np
  folder = os.path.join(workdir, 'early')
  os.makedirs(folder, exist_ok=True)
  with files.atomic_path(_early_path(workdir, index, epoch), '.npy') as tmp:
    np.save(tmp, kernels)


def early_kernels(workdir: str, num_chunks: int, epoch: int):
  """The first-layer kernels of all chunks after `epoch` epochs, in model order, or None if a
  chunk has none (trained before the trainer recorded them, or resumed past that epoch)."""
  import numpy as np
  paths = [_early_path(workdir, i, epoch) for i in range(num_chunks)]
  if not all(os.path.isfile(p) for p in paths):
    return None
  return np.concatenate([np.load(p) for p in paths])


def trajectory(workdir: str, num_chunks: int, epochs) -> dict:
  """{epoch: kernels of all models} for each of `epochs` that every chunk recorded."""
  found = {e: early_kernels(workdir, num_chunks, e) for e in epochs}
  return {e: k for e, k in found.items() if k is not None}


def log_timing(workdir: str, wall_seconds: float, execution, argv) -> float:
  """Appends this invocation to timing.json (one JSON line each, with how it ran); returns
  the wall time of all invocations so far (a resumed run's total)."""
  import dataclasses
  path = os.path.join(workdir, 'timing.json')
  with open(path, 'a') as f:
    f.write(json.dumps({'wall_seconds': wall_seconds, 'backend': jax.default_backend(),
                        'strategy': execution.strategy, 'conv_impl': execution.conv_impl,
                        'step': execution.step, 'devices': execution.num_devices,
                        'execution': dataclasses.asdict(execution), 'argv': list(argv)}) + '\n')
  return sum(entry['wall_seconds'] for entry in read_timing(workdir))


def read_timing(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'timing.json')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def check_config(workdir: str, config: PopulationConfig) -> None:
  """Writes config.json on first use; refuses a workdir made by a different config."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    files.write_json(path, config.to_json())
    return
  try:
    with open(path) as f:
      old = json.load(f)
    PopulationConfig.from_json(old)
  except Exception as e:
    raise TrainingError(f'{path} is unreadable ({e}); this is not a train_population workdir '
                        '(or it is damaged): use a new --workdir.') from e
  new = config.to_json()
  if old != new:
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise TrainingError(f'workdir {workdir!r} holds a run with a different config (differs '
                        f'in: {", ".join(diff)}); use a new --workdir or the same flags.')


def check_chunk_plan(path: str, index: int, chunk_size: int, rows: list[int]) -> None:
  """Refuses to resume a checkpoint written for another chunk plan (population size).

  Process 0 records the plan (ckpt/chunk_N/chunk.json) on first use; after a barrier every
  process compares.
  """
  plan_path = os.path.join(path, 'chunk.json')
  plan = {'chunk_size': int(chunk_size), 'rows': [int(r) for r in rows]}
  if distributed.is_primary() and not os.path.exists(plan_path):
    os.makedirs(path, exist_ok=True)
    files.write_json(plan_path, plan)
  distributed.barrier(f'chunk_{index}_plan')
  with open(plan_path) as f:
    old = json.load(f)
  if old != plan:
    raise TrainingError(
        f'checkpoint {path} was written for a chunk of {old.get("chunk_size")} models '
        f'(model rows {old.get("rows", [])[:4]}...), this run plans {chunk_size} '
        f'({plan["rows"][:4]}...). Rerun with --models_per_chunk={old.get("chunk_size")} '
        '(and a device count dividing it), or use a new --workdir.')


def checkpoint_manager(path: str) -> ocp.CheckpointManager:
  """Synchronous orbax manager keeping the last two epochs' checkpoints of a chunk."""
  return ocp.CheckpointManager(
      os.path.abspath(path),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False))


def restore(mngr: ocp.CheckpointManager, step: int, like: Any, path: str):
  """The checkpoint of epoch `step` as host arrays shaped like `like` (a clear error if the
  folder is damaged or holds another population)."""
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  try:
    out = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax raises many types for damaged or foreign folders.
    raise TrainingError(
        f'checkpoint {os.path.join(path, str(step))} is unreadable or does not match this '
        f'population ({type(e).__name__}: {str(e)[:200]}); delete that folder to resume from '
        'an earlier checkpoint, or use a new --workdir.') from e
  return distributed.to_host(out)
