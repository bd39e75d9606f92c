"""The training recipe as a variable: a method fitted on models of one recipe (or a mix of
recipes, or every epoch of the training runs) and asked about models of another.

`cross_recipe`: model sets of the same tasks trained with different recipes; per set the
Table-1 split (per task, `test_per_task` random models are test); the method is fitted on one
set's training models, or on every set's together ('mix'), and tested on each set's test models.
`across_epochs`: the first layers a slice records during training (`zoo.slice_folder`'s
trajectory); fitted on the final models' training split, or on that split at every recorded
epoch, and tested on the test split's models at each epoch.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from lps_jax.align.fit import SecondOrderConfig
from lps_jax.common.errors import UserError
from lps_jax.evaluation import metrics, protocols

MIX = 'mix'


@dataclasses.dataclass(frozen=True)
class Set:
  """One model set's first-layer kernels (M, h, w, c, g) and task of each model."""
  kernels: np.ndarray
  task_id: np.ndarray


def _top1(model, kernels: np.ndarray, labels: np.ndarray) -> float:
  return metrics.topk_accuracy(model.predict([kernels]), labels, (1,))[1]


def cross_recipe(sets: Mapping[str, Set], method: str, config: SecondOrderConfig,
                 split_seed: int = 0, test_per_task: int = 2) -> dict:
  """{fit set or MIX: {test set: top-1}} on the tasks every set has."""
  tasks = sorted(set.intersection(*[set(np.unique(s.task_id).tolist()) for s in sets.values()]))
  if len(tasks) < 2:
    raise UserError(f'the sets share {len(tasks)} tasks; cross-recipe needs >= 2.')
  tasks = np.asarray(tasks)
  cfg = dataclasses.replace(config, split_seed=split_seed)
  train, test = {}, {}
  for name, s in sets.items():
    rows = np.flatnonzero(np.isin(s.task_id, tasks))
    split = protocols.classification_split(s.task_id[rows], test_per_task, split_seed)
    labels = np.searchsorted(tasks, s.task_id[rows])
    train[name] = (s.kernels[rows[split.train]], labels[split.train])
    test[name] = (s.kernels[rows[split.test]], labels[split.test])
  train[MIX] = (np.concatenate([k for k, _ in train.values()]),
                np.concatenate([y for _, y in train.values()]))
  out = {}
  for fit_name, (k, y) in train.items():
    model = protocols.fit(method, cfg, tasks.size, [k], y)
    out[fit_name] = {name: _top1(model, *test[name]) for name in sets}
  return out


def across_epochs(final: np.ndarray, trajectory: Mapping[int, np.ndarray], task_id: np.ndarray,
                  method: str, config: SecondOrderConfig, split_seed: int = 0,
                  test_per_task: int = 2) -> dict:
  """{'final': {epoch: top-1}, 'all epochs': {epoch: top-1}}: fitted on the final models'
  training split, or on it at every recorded epoch; tested at each epoch."""
  tasks = np.unique(task_id)
  labels = np.searchsorted(tasks, task_id)
  split = protocols.classification_split(task_id, test_per_task, split_seed)
  cfg = dataclasses.replace(config, split_seed=split_seed)
  epochs = sorted(trajectory)
  fits = {'final': ([final[split.train]], labels[split.train]),
          'all epochs': ([np.concatenate([trajectory[e][split.train] for e in epochs])],
                         np.tile(labels[split.train], len(epochs)))}
  out = {}
  for name, (k, y) in fits.items():
    model = protocols.fit(method, cfg, tasks.size, k, y)
    out[name] = {int(e): _top1(model, trajectory[e][split.test], labels[split.test])
                 for e in epochs}
  return out
