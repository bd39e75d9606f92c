"""Evaluation protocols of Sec. 5.1 (task classification) and 5.2 (task retrieval).

Both take plain arrays: `kernels`, a list over first-order conv layers of (M, h, w, c, g)
stacks (entries for layers with zero weight may be None), and `task_id` (M,).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from lps_jax import metrics, second_order


@dataclasses.dataclass(frozen=True)
class ClassificationSplit:
  train: np.ndarray  # model rows
  test: np.ndarray


@dataclasses.dataclass(frozen=True)
class RetrievalSplit:
  train: np.ndarray
  query: np.ndarray
  gallery: np.ndarray
  train_tasks: np.ndarray
  test_tasks: np.ndarray


def _rows_per_task(task_id: np.ndarray) -> dict[int, np.ndarray]:
  return {int(t): np.flatnonzero(task_id == t) for t in np.unique(task_id)}


def classification_split(task_id: np.ndarray, test_per_task: int = 2,
                         seed: int = 0) -> ClassificationSplit:
  """Per task, `test_per_task` random models are test, the rest train (paper: 8 / 2)."""
  rng = np.random.default_rng(seed)
  parts = [_cut(rows, test_per_task, t, rng, 'a train / test split')
           for t, rows in _rows_per_task(task_id).items()]
  return ClassificationSplit(np.concatenate([p[1] for p in parts]),
                             np.concatenate([p[0] for p in parts]))


def _cut(rows: np.ndarray, n_first: int, task: int, rng, purpose: str):
  """Shuffles one task's model rows and cuts off the first `n_first`."""
  if rows.size <= n_first:
    raise ValueError(f'task {task} has {rows.size} models; need more than {n_first} for '
                     f'{purpose} (train more runs per task).')
  rows = rows[rng.permutation(rows.size)]
  return rows[:n_first], rows[n_first:]


def retrieval_split(task_id: np.ndarray, test_tasks: int = 10, query_per_task: int = 2,
                    seed: int = 0) -> RetrievalSplit:
  """Random `test_tasks` tasks are held out; of each, `query_per_task` models query the rest."""
  rng = np.random.default_rng(seed)
  per_task = _rows_per_task(task_id)
  tasks = np.asarray(sorted(per_task))
  if tasks.size <= test_tasks:
    raise ValueError(f'{tasks.size} tasks cannot hold out {test_tasks}; lower --test_tasks.')
  held = np.sort(rng.choice(tasks, size=test_tasks, replace=False))
  parts = [_cut(per_task[int(t)], query_per_task, int(t), rng, 'query + gallery')
           for t in held]
  query, gallery = [p[0] for p in parts], [p[1] for p in parts]
  train_tasks = np.setdiff1d(tasks, held)
  train = np.flatnonzero(np.isin(task_id, train_tasks))
  return RetrievalSplit(train, np.concatenate(query), np.concatenate(gallery), train_tasks, held)


def _take(kernels, rows):
  return [None if k is None else np.asarray(k)[rows] for k in kernels]


def _relabel(task_id: np.ndarray, tasks: np.ndarray) -> np.ndarray:
  lookup = {int(t): i for i, t in enumerate(tasks)}
  return np.asarray([lookup[int(t)] for t in task_id], np.int32)


def run_classification(kernels, task_id, method: str, config: second_order.SecondOrderConfig,
                       split_seed: int = 0, ks=(1, 5, 10),
                       progress: Optional[Callable] = None) -> dict:
  """Table 1 for one method and split: top-k accuracy on the held-out models of each task."""
  split = classification_split(task_id, seed=split_seed)
  tasks = np.unique(task_id)
  y_train, y_test = _relabel(task_id[split.train], tasks), _relabel(task_id[split.test], tasks)
  if method == 'random':
    scores = np.random.default_rng(split_seed).random((split.test.size, tasks.size))
  else:
    model = second_order.SecondOrderModel(dataclasses.replace(config, method=method),
                                          tasks.size)
    model.fit(_take(kernels, split.train), y_train, progress=progress)
    scores = model.predict(_take(kernels, split.test))
  acc = metrics.topk_accuracy(scores, y_test, ks)
  return {f'top-{k}': v for k, v in acc.items()}


def run_retrieval(kernels, task_id, method: str, config: second_order.SecondOrderConfig,
                  split_seed: int = 0, test_tasks: int = 10, ks=(1, 5, 10),
                  progress: Optional[Callable] = None) -> dict:
  """Table 2 for one method and split: CMC rank-k and mAP of query vs gallery models."""
  split = retrieval_split(task_id, test_tasks=test_tasks, seed=split_seed)
  if method == 'random':
    rng = np.random.default_rng(split_seed)
    sim = rng.random((split.query.size, split.gallery.size))
  else:
    model = second_order.SecondOrderModel(dataclasses.replace(config, method=method),
                                          split.train_tasks.size)
    model.fit(_take(kernels, split.train), _relabel(task_id[split.train], split.train_tasks),
              progress=progress)
    sim = metrics.cosine_similarity(model.embed(_take(kernels, split.query)),
                                    model.embed(_take(kernels, split.gallery)))
  return metrics.retrieval_metrics(sim, task_id[split.query], task_id[split.gallery], ks)
