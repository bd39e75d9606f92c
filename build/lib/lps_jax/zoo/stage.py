"""A slice's images, staged for a machine that cannot read the data folder (a lent GPU).

`stage(data_dir, task_ids, out_dir, part_mib)` writes the tasks' classes only, in parts of whole
tasks of at most `part_mib` MiB each (a remote call carries at most 64 MiB): part_K/ is a data
folder in the offline format (train_0.npz + test.npz, `lps_jax.training.data.load_npz_dir`) and
parts.json lists each part's tasks. Within a class the images keep the order of the full
folder, so a task's rows (`data.make_tasks`, seeded per class) are those of the full data.
Each test.npz also carries the probe batch of the slices' whole models (the first 2 test images
of every class, `lps_jax.zoo.whole_models`); training reads only its tasks' classes, so the extra
images change nothing else.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from lps_jax.common.errors import UserError
from lps_jax.training import data
from lps_jax.zoo import whole_models as slice_models

BYTES_PER_TASK = 1200 * 32 * 32 * 3   # 1,000 train + 200 test images, uncompressed
PROBE_BYTES = data.NUM_CLASSES * slice_models.PROBE_PER_CLASS * 32 * 32 * 3   # per part, at most


def plan_parts(task_ids: Sequence[int], part_mib: float) -> list[list[int]]:
  """Whole tasks, in order, grouped into parts of at most `part_mib` MiB of images."""
  per_part = int((part_mib * 2**20 - PROBE_BYTES) // BYTES_PER_TASK)
  if per_part < 1:
    raise UserError(f'part_mib={part_mib} holds no whole task ({BYTES_PER_TASK / 2**20:.1f} '
                     f'MiB each, plus {PROBE_BYTES / 2**20:.1f} MiB of probe images); raise it.')
  ids = list(task_ids)
  return [ids[i:i + per_part] for i in range(0, len(ids), per_part)]


def stage(data_dir: str, task_ids: Sequence[int], out_dir: str, part_mib: float = 56) -> dict:
  """Writes the parts; returns {'parts': [{'folder', 'tasks', 'bytes'}, ...]}."""
  train, _ = data.load_npz_dir(data_dir, data.task_classes(task_ids))
  test = data.load_npz_dir(data_dir, train=False)[1]
  slice_models.check_probe(test.labels)
  probe = np.zeros(test.labels.shape, bool)
  for c in range(data.NUM_CLASSES):
    probe[np.flatnonzero(test.labels == c)[:slice_models.PROBE_PER_CLASS]] = True
  parts = []
  for k, tasks in enumerate(plan_parts(task_ids, part_mib)):
    folder = os.path.join(out_dir, f'part_{k}')
    os.makedirs(folder, exist_ok=True)
    classes = data.task_classes(tasks)
    size = 0
    for split, name, extra in ((train, 'train_0.npz', False), (test, 'test.npz', probe)):
      keep = np.isin(split.labels, classes) | extra
      path = os.path.join(folder, name)
      np.savez(path, image=split.images[keep], label=split.labels[keep].astype(np.uint8))
      size += os.path.getsize(path)
    parts.append({'folder': os.path.basename(folder), 'tasks': list(tasks), 'bytes': size})
  manifest = {'data_dir': os.path.abspath(data_dir), 'parts': parts}
  with open(os.path.join(out_dir, 'parts.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest
