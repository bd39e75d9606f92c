"""The training work directory: what it holds, and the guards that keep runs from mixing.

  config.json               the PopulationConfig (a rerun with another config is refused)
  chunks/chunk_NNNNN/       finished chunks, each a model set (lps_jax.modelset)
  ckpt/chunk_NNNNN/         the chunk in progress: chunk.json (its plan) + orbax checkpoints
  modelset/                 the final model set, once every chunk is done

Every write is atomic (temporary name + rename), so a process killed at any moment leaves the
last complete checkpoint and every finished chunk readable.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lps_jax import distributed
from lps_jax.train_config import PopulationConfig


class TrainingStopped(Exception):
  """Raised after `train(stop_after_epochs=N)` saved its checkpoint: rerun to resume."""


class TrainingError(RuntimeError):
  """Training cannot go on (NaN loss, bad checkpoint, ...); the message says what to do."""


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
                             'modelset.old-*', '*.json.tmp*', 'ckpt/*/chunk.json.tmp*')
           for p in glob.glob(os.path.join(path, pattern))]
  for p in stale:
    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  return stale


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def check_config(workdir: str, config: PopulationConfig) -> None:
  """Writes config.json on first use; refuses a workdir made by a different config."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    write_json_atomic(path, config.to_json())
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
    write_json_atomic(plan_path, plan)
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
