"""The whole models of a ModelSet500 slice, in one file any framework reads (from task 12 on).

`<slice>/models.safetensors` holds every model of the slice whole, model axis first:

  params/<module>/.../<name>, batch_stats/<module>/.../<name>
        every Flax variable (paths as `permutations.flatten` writes them; convs HWIO, the FC
        (in, out)), float16, except 'params/conv1/kernel', float32 and exact as kernels.npz;
  probe/logits
        float32 (M, N, classes): each model's logits, computed in float32 before the cast, on
        the functional reference's fixed probe batch (`zoo.probe.probe_images` of the
        CIFAR-100 test split: the first 2 images of each of the 100 classes, class order);
  trajectory/conv1/epoch_EEEE
        float32 (M, 3, 3, 3, 16): the first layer after epoch EEEE, for each epoch the trainer
        recorded (`slices.TRAJECTORY_EPOCHS`).

Metadata (strings): format, task_id / run / seed (JSON lists, one per model), recipe (the
PopulationConfig JSON), layout, probe, trajectory_epochs. `read` returns a `modelset.ModelSet`
(float32) plus the logits and trajectory; `manifest.load_whole` assembles the slices of a folder that
have the file into one model set, the form every whole-network method reads.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional

import numpy as np

from lps_jax.common import files
from lps_jax.common.errors import UserError
from lps_jax.symmetry import permutations
from lps_jax.training import modelset

MODELS = 'models.safetensors'
FORMAT = 'lps-jax/modelset-whole/1'
EXACT = ('params/conv1/kernel',)     # kept float32: the first layer every LPS method reads
LOGITS = 'probe/logits'
PROBE_PER_CLASS = 2                  # as the functional reference (zoo.probe)
TRAJECTORY = 'trajectory/conv1/epoch_'
LAYOUT = ('model axis first; Flax variable paths; conv kernels HWIO (h, w, c_in, c_out), '
          'FC kernel (in, out); float16 except params/conv1/kernel (float32)')
PROBE = ('logits (float32) on the first 2 images of each of the 100 CIFAR-100 test-split '
         'classes, in class order (uint8 images, normalised as in training, eval mode)')


class WholeModels(NamedTuple):
  models: modelset.ModelSet        # float32 arrays (stored float16, except EXACT)
  logits: Optional[np.ndarray]     # (M, N, classes) float32
  trajectory: dict                 # {epoch: (M, h, w, c, g) float32}


def write(path: str, result: modelset.ModelSet, logits: Optional[np.ndarray],
          trajectory: dict) -> int:
  """Writes `result` whole to `path` (atomic); returns the file's size in bytes."""
  from safetensors.numpy import save_file
  flat = permutations.flatten({'params': result.params, 'batch_stats': result.batch_stats})
  n = len(result)
  tensors = {p: np.ascontiguousarray(a, np.float32 if p in EXACT else np.float16)
             for p, a in flat.items()}
  if logits is not None:
    tensors[LOGITS] = np.ascontiguousarray(logits, np.float32)
  for epoch, k in sorted(trajectory.items()):
    tensors[f'{TRAJECTORY}{int(epoch):04d}'] = np.ascontiguousarray(k, np.float32)
  bad = [p for p, a in tensors.items() if a.shape[:1] != (n,)]
  if bad:
    raise UserError(f'{bad[:3]} do not hold the {n} models of the slice.')
  for p, a in tensors.items():
    if not np.all(np.isfinite(a)):
      raise UserError(f'{p} holds NaN/Inf (or overflows float16): not written.')
  meta = {'format': FORMAT, 'task_id': json.dumps(result.task_id.tolist()),
          'run': json.dumps(result.run.tolist()), 'seed': json.dumps(result.seed.tolist()),
          'heldout_accuracy': json.dumps([float(a) for a in result.heldout_accuracy]),
          'recipe': json.dumps(result.config), 'layout': LAYOUT, 'probe': PROBE,
          'trajectory_epochs': json.dumps(sorted(int(e) for e in trajectory))}
  with files.atomic_path(path) as tmp:
    save_file(tensors, tmp, metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)      # safetensors creates it private
  return os.path.getsize(path)


def read(path: str) -> WholeModels:
  """The models of one `write` file as float32, or ModelSetError saying what to do."""
  from safetensors import safe_open
  if not os.path.isfile(path):
    raise modelset.ModelSetError(f'{path} is missing: re-export the slice from its workdir '
                                 '(python -m experiments.slices --action=export).')
  try:
    with safe_open(path, framework='np') as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get('format') != FORMAT:
      raise UserError(f'format {meta.get("format")!r}, expected {FORMAT!r}')
    task_id, run, seed, acc = (json.loads(meta[k]) for k in
                               ('task_id', 'run', 'seed', 'heldout_accuracy'))
    config = json.loads(meta['recipe'])
  except Exception as e:  # safetensors raises its own types for damaged headers.
    raise modelset.ModelSetError(f'{path} is not a readable whole-model file '
                                 f'({type(e).__name__}: {e}); re-export the slice.') from e
  variables = {p: np.asarray(a, np.float32) for p, a in tensors.items()
               if p.startswith(('params/', 'batch_stats/'))}
  tree = permutations.unflatten(variables)
  ms = modelset.ModelSet(tree['params'], tree.get('batch_stats', {}),
                         np.asarray(task_id, np.int32), np.asarray(run, np.int32),
                         np.asarray(seed, np.int64), np.asarray(acc, np.float32), config)
  trajectory = {int(k[len(TRAJECTORY):]): np.asarray(a) for k, a in tensors.items()
                if k.startswith(TRAJECTORY)}
  logits = tensors.get(LOGITS)
  return WholeModels(ms, None if logits is None else np.asarray(logits), trajectory)


def check_probe(test_labels: np.ndarray) -> None:
  """DataError unless the test split holds every class the probe batch draws from (a staged
  folder must carry the probe images: `lps_jax.zoo.stage`)."""
  from lps_jax.training import data
  counts = np.bincount(np.asarray(test_labels), minlength=data.NUM_CLASSES)
  short = np.flatnonzero(counts < PROBE_PER_CLASS).tolist()
  if short:
    raise data.DataError(
        f'the whole-model probe batch needs {PROBE_PER_CLASS} test-split images of each of the '
        f'{data.NUM_CLASSES} classes; classes {short[:5]} have fewer: point --data_dir at the '
        'full CIFAR-100 folder, or stage the slice with python -m experiments.slices '
        '--action=stage (its parts carry the probe images).')


def probe_logits(result: modelset.ModelSet, test_images: np.ndarray,
                 test_labels: np.ndarray) -> np.ndarray:
  """(M, N, classes) float32: each model's logits on the probe batch of the test split."""
  from lps_jax.zoo import probe as probe_lib
  check_probe(test_labels)
  probe = probe_lib.probe_images(test_images, test_labels, PROBE_PER_CLASS)
  flat = probe_lib.probe_logits(modelset.network_stack(result), probe)
  return flat.reshape(len(result), len(probe), -1).astype(np.float32)
