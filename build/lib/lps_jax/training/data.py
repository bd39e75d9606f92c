"""CIFAR-100 two-class tasks (Sec. 5, "Dataset and Modelset") and on-device augmentation.

Task r is the binary problem {fine label 2r, fine label 2r+1} relabelled 0/1. Images stay on
the device as one uint8 array; a task is a set of row indices into it, so batches are gathered
by index inside jitted code with no host round trip.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lps_jax.common.errors import UserError

NUM_CLASSES = 100
NUM_TASKS = NUM_CLASSES // 2   # two-class tasks: task r = fine labels 2r, 2r+1
IMAGE_SHAPE = (32, 32, 3)
# Per-channel statistics of the CIFAR-100 train split on a [0, 1] scale.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
# The one setting that names the offline data folder (train_*.npz + test.npz): the apps' --data_dir
# default and the tests read it.
DATA_DIR_ENV = 'LPS_DATA_DIR'
# Host the tfds cifar100 builder downloads from; probed before tfds would retry for minutes.
_TFDS_CIFAR_HOST = ('www.cs.toronto.edu', 443)


class DataError(UserError):
  """Bad or unavailable input data; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
  """Images (N, 32, 32, 3) uint8 and fine labels (N,) int32 of one dataset split."""
  images: np.ndarray
  labels: np.ndarray


def validate_split(images, labels, origin: str) -> Split:
  """Checks shapes, dtypes and label range; returns a `Split`."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise DataError(f'{origin}: images must have shape (N, 32, 32, 3), got {images.shape}; '
                    'store RGB images in NHWC layout.')
  if images.dtype != np.uint8:
    raise DataError(f'{origin}: images must be uint8 in [0, 255], got {images.dtype}.')
  if labels.shape != (images.shape[0],):
    raise DataError(f'{origin}: labels must have shape ({images.shape[0]},) to match the '
                    f'images, got {labels.shape}.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{origin}: labels must be integers, got {labels.dtype}.')
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise DataError(f'{origin}: labels must be fine labels in [0, {NUM_CLASSES}), '
                    f'got range [{labels.min()}, {labels.max()}].')
  return Split(images=images, labels=labels.astype(np.int32))


def default_data_dir() -> Optional[str]:
  """The offline data folder named by $LPS_DATA_DIR, or None."""
  return os.environ.get(DATA_DIR_ENV) or None


def _keep(split: Split, classes: Optional[Sequence[int]]) -> Split:
  if classes is None:
    return split
  rows = np.flatnonzero(np.isin(split.labels, np.asarray(list(classes))))
  return Split(split.images[rows], split.labels[rows])


def load_npz(path: str, classes: Optional[Sequence[int]] = None) -> Split:
  """One `.npz` file with `image` (N,32,32,3) uint8 and `label` (N,) fine-label arrays.

  `classes`: keep only images of these fine labels (less memory when few tasks train).
  """
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found; expected an .npz with "image" (N,32,32,3) uint8 '
                    'and "label" (N,) fine labels.')
  try:
    with np.load(path) as f:
      missing = {'image', 'label'} - set(f.files)
      if missing:
        raise DataError(f'{path}: missing arrays {sorted(missing)}; the file must hold "image" '
                        '(N,32,32,3) uint8 and "label" (N,) fine labels.')
      return _keep(validate_split(f['image'], f['label'], path), classes)
  except DataError:
    raise
  except Exception as e:  # zipfile.BadZipFile, OSError, ValueError, EOFError: damaged files.
    raise DataError(f'{path}: not a readable .npz file ({type(e).__name__}: {e}); copy it '
                    'again.') from e


def _train_shards(data_dir: str) -> list[str]:
  names = [n for n in os.listdir(data_dir) if n.startswith('train_') and n.endswith('.npz')]
  index = lambda n: n[len('train_'):-len('.npz')]
  bad = [n for n in names if not index(n).isdigit()]
  if bad:
    raise DataError(f'{data_dir}: unexpected files {bad}; train shards are named '
                    'train_0.npz, train_1.npz, ...')
  return [os.path.join(data_dir, n) for n in sorted(names, key=lambda n: int(index(n)))]


def load_npz_dir(data_dir: Optional[str], classes: Optional[Sequence[int]] = None,
                 train: bool = True) -> tuple[Optional[Split], Split]:
  """(train split, test split) from a folder in the offline format.

  The folder holds `train_0.npz` ... (the train split, in shards) and `test.npz`, each with
  "image" (N,32,32,3) uint8 and "label" (N,) fine labels, as `../shared/data/cifar100`.
  `train=False` reads only test.npz (train split None). `classes` keeps only those fine labels.
  """
  if not data_dir:
    raise DataError(f'no offline data folder given: pass --data_dir or set ${DATA_DIR_ENV} to a '
                    'folder with train_*.npz and test.npz (here: ../shared/data/cifar100), or use '
                    '--dataset=tfds on a machine with a network.')
  if not os.path.isdir(data_dir):
    raise DataError(f'{data_dir}: data folder not found; expected a folder with train_*.npz and '
                    f'test.npz (--data_dir or ${DATA_DIR_ENV}).')
  test = load_npz(os.path.join(data_dir, 'test.npz'), classes)
  if not train:
    return None, test
  shards = _train_shards(data_dir)
  if not shards:
    raise DataError(f'{data_dir}: no train shards; expected train_0.npz, train_1.npz, ... '
                    '(the CIFAR-100 train split) beside test.npz.')
  parts = [load_npz(p, classes) for p in shards]
  return (Split(np.concatenate([p.images for p in parts]),
                np.concatenate([p.labels for p in parts])), test)


def load(dataset: str, data_dir: Optional[str] = None, tfds_data_dir: Optional[str] = None,
         classes: Optional[Sequence[int]] = None) -> tuple[Split, Optional[Split]]:
  """(train split, held-out split or None) of a `PopulationConfig.dataset`.

  tfds / npz: CIFAR-100 train split to train on, test split held out. npz_test_only: the test
  split alone (held-out None: tasks cut their own 80/20 split of it).
  """
  if dataset == 'npz':
    train, test = load_npz_dir(data_dir, classes)
    origins = (os.path.join(data_dir, 'train_*.npz'), os.path.join(data_dir, 'test.npz'))
  elif dataset == 'npz_test_only':
    train, test = load_npz_dir(data_dir, classes, train=False)[1], None
    origins = (os.path.join(data_dir, 'test.npz'), None)
  elif dataset == 'tfds':
    train = _keep(load_tfds('train', tfds_data_dir), classes)
    test = _keep(load_tfds('test', tfds_data_dir), classes)
    origins = ('tfds cifar100[train]', 'tfds cifar100[test]')
  else:
    raise DataError(f"unknown dataset {dataset!r}; choose 'tfds', 'npz' or 'npz_test_only'.")
  for split, origin in zip((train, test), origins):
    absent = sorted(set(classes or ()) - set(np.unique(split.labels).tolist())) if split else []
    if absent:
      raise DataError(f'{origin}: no images of fine labels {absent[:10]}, which the requested '
                      'tasks need (task r = fine labels 2r, 2r+1); use the full CIFAR-100 '
                      'split or fewer tasks.')
  return train, test


def test_split(dataset: str, data_dir: Optional[str] = None,
               tfds_data_dir: Optional[str] = None) -> Split:
  """The whole CIFAR-100 test split (all 100 classes) from where `dataset` reads its images."""
  if dataset in ('npz', 'npz_test_only'):
    return load_npz_dir(data_dir, train=False)[1]
  if dataset == 'tfds':
    return load_tfds('test', tfds_data_dir)
  raise DataError(f"unknown dataset {dataset!r}; choose 'tfds', 'npz' or 'npz_test_only'.")


def task_classes(task_ids: Sequence[int]) -> list[int]:
  """The fine labels tasks use: 2r and 2r + 1 for each task r."""
  task_ids = [int(r) for r in task_ids]
  if task_ids and (min(task_ids) < 0 or max(task_ids) >= NUM_TASKS):
    raise DataError(f'task ids must be in [0, {NUM_TASKS}) (task r = fine labels 2r, '
                    f'2r+1), got {min(task_ids)}..{max(task_ids)}; lower --num_tasks.')
  return sorted({c for r in task_ids for c in (2 * r, 2 * r + 1)})


def _network_reachable(host_port, timeout: float) -> bool:
  try:
    with socket.create_connection(host_port, timeout=timeout):
      return True
  except OSError:
    return False


def load_tfds(split: str, data_dir: Optional[str] = None, download: bool = True,
              probe_timeout: float = 3.0) -> Split:
  """Loads a CIFAR-100 split through tensorflow-datasets (array_record, no TensorFlow needed).

  Without prepared data and without network, tfds would retry the download for ~200 s; this
  probes the download host first and fails within `probe_timeout` seconds instead.
  """
  import tensorflow_datasets as tfds  # Imported lazily: the npz path does not need it.
  builder = tfds.builder('cifar100', data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    if not download:
      raise DataError(f'tfds cifar100 is not prepared in {builder.data_dir!r} and download is '
                      'off; use --dataset=npz with an offline folder (--data_dir) or allow the '
                      'download.')
    if not _network_reachable(_TFDS_CIFAR_HOST, probe_timeout):
      raise DataError(
          'tfds cifar100 is not prepared under '
          f'{os.path.dirname(os.path.dirname(builder.data_dir))!r} and there is no network to '
          'download it; run offline with --dataset=npz --data_dir=FOLDER (train_*.npz + '
          f'test.npz; or set ${DATA_DIR_ENV}), or prepare tfds data on a connected machine and '
          'pass --tfds_data_dir.')
    if importlib.util.find_spec('tensorflow') is None:
      raise DataError('preparing tfds cifar100 (one-time download + encode) needs TensorFlow: '
                      'pip install tensorflow-cpu, then rerun (reading a prepared copy does not '
                      'need it); or run offline with --dataset=npz.')
    builder.download_and_prepare()
  source = builder.as_data_source(split=split)
  records = source.__getitems__(list(range(len(source))))
  images = np.stack([r['image'] for r in records])
  labels = np.asarray([r['label'] for r in records])
  return validate_split(images, labels, f'tfds cifar100[{split}]')


@dataclasses.dataclass(frozen=True)
class Tasks:
  """Per-task train / held-out indices into one image array, with 0/1 labels.

  All arrays have a leading task axis of equal-size rows so tasks stack for a population:
  train_idx / train_labels (T, n_train), eval_idx / eval_labels (T, n_eval).
  """
  task_ids: np.ndarray
  train_idx: np.ndarray
  train_labels: np.ndarray
  eval_idx: np.ndarray
  eval_labels: np.ndarray


def _class_rows(labels: np.ndarray, cls: int, rng: np.random.Generator) -> np.ndarray:
  rows = np.flatnonzero(labels == cls)
  return rows[rng.permutation(rows.size)]


def _check_task_ids(task_ids: Sequence[int], labels_list: Sequence[np.ndarray]) -> np.ndarray:
  task_ids = np.asarray(task_ids, dtype=np.int32)
  if task_ids.ndim != 1 or task_ids.size == 0:
    raise DataError('need at least one task id.')
  max_tasks = NUM_TASKS
  if task_ids.min() < 0 or task_ids.max() >= max_tasks:
    raise DataError(f'task ids must be in [0, {max_tasks}) (task r = fine labels 2r, 2r+1), '
                    f'got {task_ids.min()}..{task_ids.max()}; lower --num_tasks.')
  for labels in labels_list:
    present = set(np.unique(labels).tolist())
    absent = sorted({c for r in task_ids.tolist() for c in (2 * r, 2 * r + 1)} - present)
    if absent:
      raise DataError(f'the data has no images of fine labels {absent[:10]}, needed by the '
                      'requested tasks; lower --num_tasks or use a dataset with every class.')
  return task_ids


def make_tasks(split: Split, task_ids: Sequence[int], holdout_fraction: float = 0.2,
               seed: int = 0, eval_split: Optional[Split] = None) -> Tasks:
  """Builds two-class tasks {2r, 2r+1} -> {0, 1}.

  With `eval_split` (e.g. tfds train + test), training rows come from `split` and held-out
  rows from `eval_split`. Without it, each class of `split` is shuffled with `seed` and cut
  into (1 - holdout_fraction) train / holdout_fraction held-out (each class's shuffle is seeded
  by (seed, class), independent of the other tasks). Every task gets the same
  number of rows per class (the smallest class count), so tasks stack.
  """
  task_ids = _check_task_ids(task_ids, [split.labels] + ([eval_split.labels] if eval_split else []))
  per_class = {}
  for r in task_ids.tolist():
    for c in (2 * r, 2 * r + 1):
      # One stream per (seed, class): a task's images and their order do not depend on which
      # other tasks are trained with it, so slices of tasks equal one whole run.
      rng = np.random.default_rng((seed, c))
      tr = _class_rows(split.labels, c, rng)
      ev = _class_rows(eval_split.labels, c, rng) if eval_split is not None else None
      per_class[c] = (tr, ev)
  counts = [len(tr) for tr, _ in per_class.values()]
  n_cls = min(counts)
  if eval_split is None:
    if not 0.0 < holdout_fraction < 1.0:
      raise DataError(f'holdout_fraction must be in (0, 1), got {holdout_fraction}.')
    n_eval = int(round(n_cls * holdout_fraction))
    n_train = n_cls - n_eval
  else:
    n_train = n_cls
    n_eval = min(len(ev) for _, ev in per_class.values())
  if n_train < 1 or n_eval < 1:
    raise DataError(f'too few images per class ({n_cls}) for a train / held-out split.')
  train_idx, train_lab, eval_idx, eval_lab = [], [], [], []
  for r in task_ids.tolist():
    tr_rows, ev_rows = [], []
    for new_label, c in enumerate((2 * r, 2 * r + 1)):
      tr, ev = per_class[c]
      if eval_split is None:
        tr_rows.append((tr[n_eval:n_eval + n_train], new_label))
        ev_rows.append((tr[:n_eval], new_label))
      else:
        tr_rows.append((tr[:n_train], new_label))
        ev_rows.append((ev[:n_eval], new_label))
    train_idx.append(np.concatenate([rows for rows, _ in tr_rows]))
    train_lab.append(np.concatenate([np.full(len(rows), l) for rows, l in tr_rows]))
    eval_idx.append(np.concatenate([rows for rows, _ in ev_rows]))
    eval_lab.append(np.concatenate([np.full(len(rows), l) for rows, l in ev_rows]))
  as32 = lambda xs: np.stack(xs).astype(np.int32)
  return Tasks(task_ids=task_ids, train_idx=as32(train_idx), train_labels=as32(train_lab),
               eval_idx=as32(eval_idx), eval_labels=as32(eval_lab))


def normalize(images_uint8: jax.Array) -> jax.Array:
  """uint8 NHWC -> float32, per-channel standardised with CIFAR-100 statistics."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(CIFAR100_MEAN)) / jnp.asarray(CIFAR100_STD)


def augment(key: jax.Array, images_uint8: jax.Array, pad: int = 4) -> jax.Array:
  """Paper augmentation: zero-pad 4, random 32x32 crop, random horizontal flip; normalised.

  Runs on device; `key` makes it reproducible per model and step.
  """
  n, h, w, _ = images_uint8.shape
  k_crop, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (n,))
  padded = jnp.pad(images_uint8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop_flip(img, off, flip):
    out = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    return jnp.where(flip, out[:, ::-1], out)

  return normalize(jax.vmap(crop_flip)(padded, offsets, flips))


def parse_task_ids(items: Sequence[str]) -> tuple[int, ...]:
  """'0-9' / '3' / '0-4,7' (absl list items) -> sorted task ids, each once."""
  out = []
  for item in items:
    item = str(item).strip()
    lo, sep, hi = item.partition('-')
    try:
      ids = range(int(lo), int(hi) + 1) if sep else [int(lo)]
    except ValueError:
      raise DataError(f'--task_ids item {item!r}: use task numbers or ranges A-B, e.g. 0-9.')
    if sep and int(hi) < int(lo):
      raise DataError(f'--task_ids range {item!r} is empty: write it low-high, e.g. 0-9.')
    out.extend(ids)
  if len(set(out)) != len(out):
    raise DataError(f'--task_ids {",".join(items)} names a task twice.')
  outside = [t for t in out if not 0 <= t < NUM_TASKS]
  if outside:
    raise DataError(f'--task_ids: task {outside[0]} is outside 0-{NUM_TASKS - 1} (task r = '
                     'fine labels 2r, 2r+1 of CIFAR-100).')
  return tuple(sorted(out))
