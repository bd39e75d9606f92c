"""A zoo to index: a folder of checkpoints and a table of what each was trained on (bring your
own), or one of our model sets. Either gives the method's inputs and, per model, its label, run,
recipe and path (`Zoo`).

The table is a CSV with a header: `path` (relative to the zoo folder, or absolute) and `label`
are required, `run` and `recipe` optional. Checkpoints are read by `checkpoint_inputs.read`
(npz, safetensors, flax msgpack, orbax, PyTorch).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from lps_jax.common.errors import UserError
from lps_jax.query import checkpoint_inputs as inputs_lib
from lps_jax.query.checkpoint_inputs import Needs
from lps_jax.training import modelset
from lps_jax.training.modelset import NetworkStack
from lps_jax.zoo import foreign_checkpoints, manifest


class ZooError(UserError):
  """A zoo table or folder that cannot be indexed."""


@dataclasses.dataclass
class Zoo:
  inputs: object                 # kernels (list of (M, ...) stacks) or a NetworkStack
  labels: list                   # class names
  label_of: np.ndarray           # (M,)
  run: list
  recipe: list
  path: list


def read_table(table: str, folder: str) -> list[dict]:
  """The rows of a zoo's CSV (path resolved against `folder`), checked: the columns, every path
  present, every label with >= 2 models."""
  if not os.path.isfile(table):
    raise ZooError(f'labels table not found: {table!r} (a CSV with columns path,label[,run,'
                   'recipe]).')
  with open(table, newline='') as f:
    rows = list(csv.DictReader(f))
  if not rows or not {'path', 'label'} <= set(rows[0]):
    raise ZooError(f'{table}: needs a header with columns path and label (optional: run, '
                   f'recipe); got {sorted(rows[0]) if rows else "no rows"}.')
  for i, r in enumerate(rows, 2):
    if not r['path'] or not r['label']:
      raise ZooError(f'{table} line {i}: empty path or label.')
    r['file'] = r['path'] if os.path.isabs(r['path']) else os.path.join(folder, r['path'])
  missing = [r['path'] for r in rows if not os.path.exists(r['file'])]
  if missing:
    raise ZooError(f'{table}: {len(missing)} paths not found under {folder!r}: {missing[:3]}; '
                   'paths are relative to --zoo.')
  counts = {}
  for r in rows:
    counts[r['label']] = counts.get(r['label'], 0) + 1
  single = sorted(l for l, c in counts.items() if c < 2)
  if single:
    raise ZooError(f'{table}: labels {single[:5]} have one model each; every label needs >= 2 '
                   '(add models, or drop those rows).')
  return rows


def from_table(table: str, folder: str, method: str, config, layout: str = 'auto',
               layers: Optional[Sequence[str]] = None,
               progress: Optional[Callable] = None) -> Zoo:
  """Reads every checkpoint a zoo table lists (`read_table`) as `method` reads it."""
  rows = read_table(table, folder)
  needs = Needs.of(method, config)
  items = []
  for r in rows:
    got, _ = inputs_lib.read(r['file'], needs, method, config, layout, layers)
    items.append(got)
    if progress is not None:
      progress()
  labels = sorted({r['label'] for r in rows})
  return Zoo(inputs_lib.stack(items, needs, [r['path'] for r in rows]), labels,
             np.asarray([labels.index(r['label']) for r in rows]),
             [r.get('run') or '' for r in rows], [r.get('recipe') or '' for r in rows],
             [r['path'] for r in rows])


def recipe_of(config: dict) -> str:
  """A model set's training recipe in a few words."""
  t = config.get('train', {})
  return (f'lps_jax, {t.get("epochs")} epochs, batch {t.get("batch_size")}, '
          f'lr {t.get("learning_rate")}')


def task_label(task: int) -> str:
  return f'task {task} (fine {2 * task}, {2 * task + 1})'


def from_modelset(path: str, method: str, config) -> Zoo:
  """One of our model sets: a kernels .npz, a model set folder, or a slices folder (its whole
  models for a whole-network method, its kernels otherwise)."""
  needs = Needs.of(method, config)
  if needs.whole:
    if path.endswith('.npz'):
      raise ZooError(f'{method} reads {needs.describe()}: pass a model set folder or a slices '
                     f'folder (results/modelset500), not {path}.')
    ms = (manifest.load_whole(path).models if manifest.is_slices_root(path)
          else modelset.load(path))
    inputs, task_id, run, cfg = modelset.network_stack(ms), ms.task_id, ms.run, ms.config
  else:
    kernels, task_id, _, run = modelset.load_kernels(_kernels_file(path), needs.num_layers)
    if any(k is None for k in kernels[:needs.num_layers]):
      held = [i + 1 for i, k in enumerate(kernels) if k is not None]
      hint = ('merge the slices\' stage-1 kernels with python -m experiments.slices --stage1 '
              '--out=FILE and pass FILE' if manifest.is_slices_root(path)
              else 'pass the model set folder')
      raise ZooError(f'{path} holds conv layers {held}; {method} reads {needs.describe()}: '
                     f'{hint}.')
    inputs, cfg = kernels, _config_of(_kernels_file(path))
  tasks = sorted({int(t) for t in task_id})
  return Zoo(inputs, [task_label(t) for t in tasks], np.searchsorted(tasks, task_id),
             [str(r) for r in run], [recipe_of(cfg)] * len(task_id),
             [f'{path}#task{int(t)}/run{int(r)}' for t, r in zip(task_id, run)])


def from_modelsets(paths: Sequence[str], method: str, config) -> Zoo:
  """Several of our model sets as one zoo (a mix of training recipes): `from_modelset` of
  each, the labels merged by name."""
  zoos = [from_modelset(p, method, config) for p in paths]
  if len(zoos) == 1:
    return zoos[0]
  labels = sorted({l for z in zoos for l in z.labels}, key=foreign_checkpoints.natural_key)
  label_of = np.asarray([labels.index(z.labels[i]) for z in zoos for i in z.label_of])
  if isinstance(zoos[0].inputs, NetworkStack):
    if len({z.inputs.paths for z in zoos}) > 1:
      raise ZooError('the model sets hold different variables; a whole-network index reads one '
                     'architecture.')
    inputs = dataclasses.replace(zoos[0].inputs, arrays=[
        np.concatenate(a) for a in zip(*[z.inputs.arrays for z in zoos])])
  else:
    shapes = {tuple(k.shape[1:] for k in z.inputs if k is not None) for z in zoos}
    if len(shapes) > 1:
      raise ZooError(f'the model sets hold kernels of different shapes ({sorted(shapes)}); an '
                     'index reads one architecture.')
    inputs = [None if zoos[0].inputs[l] is None else np.concatenate([z.inputs[l] for z in zoos])
              for l in range(len(zoos[0].inputs))]
  return Zoo(inputs, labels, label_of, sum((z.run for z in zoos), []),
             sum((z.recipe for z in zoos), []), sum((z.path for z in zoos), []))


def _kernels_file(path: str) -> str:
  if manifest.is_slices_root(path):     # the merged kernels of a slices folder
    return os.path.join(path, 'first_layer_kernels.npz')
  return path


def _config_of(path: str) -> dict:
  """The training config a kernels file or a model set folder records."""
  if path.endswith('.npz'):
    with np.load(path) as f:
      return json.loads(str(f['config']))
  folder = (path if os.path.isfile(os.path.join(path, 'meta.json'))
            else os.path.join(path, 'modelset'))
  with open(os.path.join(folder, 'meta.json')) as f:
    return json.load(f)['config']
