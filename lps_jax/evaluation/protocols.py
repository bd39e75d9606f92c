"""Evaluation protocols of Sec. 5.1 (task classification) and 5.2 (task retrieval).

All take plain arrays: `kernels`, a list over first-order conv layers of (M, h, w, c, g)
stacks (entries for layers with zero weight may be None), and `task_id` (M,). With a
`common.cache.Cache`, trained second-order networks are stored under a key naming their config and a
hash of their training data, and reused by any later run that needs the same network.

Also the experiments built on them: per-branch accuracy (Sec. 5.4, Fig. 3b), the alignment
ablation (Sec. 5.5, Fig. 3c) and transferability vs parameter similarity (Sec. 5.3, Fig. 3a).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import numpy as np

from lps_jax.align.fit import SecondOrderConfig
from lps_jax.common import cache as cache_lib
from lps_jax.common.errors import UserError
from lps_jax.evaluation import metrics
from lps_jax.evaluation import transfer
from lps_jax.methods import interface
from lps_jax.methods import registry as methods

# Fig. 3c variants for layers >= 2: (label, methods.REGISTRY name).
ALIGNMENT_VARIANTS = (('w/o align', 'unaligned'), ('filt.', 'filter_only'),
                      ('chan.', 'channel_only'), ('filt. + chan.', 'lps'))


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
    raise UserError(f'task {task} has {rows.size} models; need more than {n_first} for '
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
    raise UserError(f'{tasks.size} tasks cannot hold out {test_tasks}; lower --test_tasks.')
  held = np.sort(rng.choice(tasks, size=test_tasks, replace=False))
  parts = [_cut(per_task[int(t)], query_per_task, int(t), rng, 'query + gallery')
           for t in held]
  query, gallery = [p[0] for p in parts], [p[1] for p in parts]
  train_tasks = np.setdiff1d(tasks, held)
  train = np.flatnonzero(np.isin(task_id, train_tasks))
  return RetrievalSplit(train, np.concatenate(query), np.concatenate(gallery), train_tasks, held)


def fit(method: methods.Method | str, config: SecondOrderConfig, num_classes: int, kernels,
        labels, cache: Optional[cache_lib.Cache] = None, progress: Optional[Callable] = None):
  """A fitted estimator of `method` (a `methods.REGISTRY` name or entry) on `kernels` /
  `labels`; with `cache`, what the method keeps there (second-order networks, whole-network
  alignments) is reused when this exact training ran before."""
  method = methods.get(method) if isinstance(method, str) else method
  model = method.estimator(config, num_classes, cache)
  model.fit(kernels, labels, progress=progress)
  return model


def _one_hot_weights(layer: int) -> tuple[float, ...]:
  return tuple(1.0 if i == layer else 0.0 for i in range(layer + 1))


def _check_layers(layers, num_layers: int) -> list[int]:
  bad = [l for l in layers if not 0 <= int(l) < num_layers]
  if bad:
    raise UserError(f'branch indices {[b + 1 for b in bad]} are out of range: branches are '
                     f'numbered 1..{num_layers} (one per conv layer).')
  return [int(l) for l in layers]


def run_branches(kernels, task_id, config: SecondOrderConfig, layers,
                 split_seed: int = 0, progress: Optional[Callable] = None,
                 cache: Optional[cache_lib.Cache] = None, method: str = 'lps') -> dict:
  """Fig. 3b: one branch at a time (w_l = 1 for l = l', else 0), task classification, read
  by `method` (LPS; 'wn_branch' on whole-network-aligned kernels).

  `layers` are 0-based conv layer indices (branch l' = layer + 1). Returns
  {layer: {'top-1': .., 'top-5': .., 'top-10': ..}}.
  """
  num_conv = interface.num_conv(kernels)
  layers = _check_layers(layers, num_conv)
  return {l: run_classification(kernels, task_id, method,
                                dataclasses.replace(config, layer_weights=_one_hot_weights(l)),
                                split_seed, progress=progress, cache=cache) for l in layers}


def run_alignment_ablation(kernels, task_id, config: SecondOrderConfig, layers,
                           split_seed: int = 0, variants=ALIGNMENT_VARIANTS,
                           progress: Optional[Callable] = None,
                           cache: Optional[cache_lib.Cache] = None) -> dict:
  """Fig. 3c: for each branch >= 2, no alignment / filter (Eq. 8) / channel (Eq. 6) / both.

  Returns {variant label: {layer: accuracies}}. The first layer has no channel alignment
  (Eq. 7), so layer 0 is refused.
  """
  layers = _check_layers(layers, len(kernels))
  if 0 in layers:
    raise UserError('branch 1 has only the unaligned-channel case (Eq. 7); the alignment '
                     'ablation covers branches 2..19.')
  out = {}
  for label, method in variants:
    out[label] = {l: run_classification(
        kernels, task_id, method, dataclasses.replace(config, layer_weights=_one_hot_weights(l)),
        split_seed, progress=progress, cache=cache) for l in layers}
  return out


def run_transfer(kernels, task_id, params, batch_stats, images, labels, model_config,
                 config: SecondOrderConfig, split_seed: int = 0,
                 test_tasks: int = 10, num_permutations: int = 10000,
                 progress: Optional[Callable] = None, feature_progress: Optional[Callable] = None,
                 cache: Optional[cache_lib.Cache] = None) -> dict:
  """Sec. 5.3: parameter similarity vs transferability over the held-out tasks' pairs.

  The second-order network is trained in the retrieval setting (on the train tasks); the
  similarity of two held-out tasks is the mean cosine over their models' representations
  (`transfer.task_similarity`); transferability source -> target is the mean ARI of 2-means on
  the target's images in the source models' pooled features (`transfer.transferability`).
  `params` / `batch_stats` are the stacked first-order variables, rows as `task_id`; `images`,
  `labels` the data split whose target-task images are clustered.
  """
  split = retrieval_split(task_id, test_tasks=test_tasks, seed=split_seed)
  model = fit('lps', _seeded(config, split_seed), split.train_tasks.size,
              interface.take(kernels, split.train),
              _relabel(task_id[split.train], split.train_tasks),
              cache, progress)
  rows = np.flatnonzero(np.isin(task_id, split.test_tasks))
  tasks, sim = transfer.task_similarity(model.embed(interface.take(kernels, rows)), task_id[rows])
  ari = transfer.transferability(params, batch_stats, task_id, images, labels, tasks,
                                 model_config, cache=cache, progress=feature_progress)
  off = ~np.eye(tasks.size, dtype=bool)
  corr = transfer.correlation(sim[off], ari[off], num_permutations=num_permutations,
                              seed=split_seed)
  return {'tasks': tasks.tolist(), 'similarity': sim.tolist(), 'ari': ari.tolist(),
          'correlation': corr}


def _relabel(task_id: np.ndarray, tasks: np.ndarray) -> np.ndarray:
  lookup = {int(t): i for i, t in enumerate(tasks)}
  return np.asarray([lookup[int(t)] for t in task_id], np.int32)


def _seeded(config: SecondOrderConfig, split_seed: int) -> SecondOrderConfig:
  """Every split draws its own phi init and shuffling (and validation models)."""
  return dataclasses.replace(config, split_seed=split_seed)


def run_classification(kernels, task_id, method: str, config: SecondOrderConfig,
                       split_seed: int = 0, ks=(1, 5, 10),
                       progress: Optional[Callable] = None,
                       cache: Optional[cache_lib.Cache] = None) -> dict:
  """Table 1 for one method and split: top-k accuracy on the held-out models of each task, and
  the seconds the fit took (features included; a cached fit counts as its reading)."""
  split = classification_split(task_id, seed=split_seed)
  tasks = np.unique(task_id)
  y_train, y_test = _relabel(task_id[split.train], tasks), _relabel(task_id[split.test], tasks)
  t0 = time.perf_counter()
  model = fit(method, _seeded(config, split_seed), tasks.size, interface.take(kernels, split.train),
              y_train, cache, progress)
  fit_seconds = time.perf_counter() - t0
  acc = metrics.topk_accuracy(model.predict(interface.take(kernels, split.test)), y_test, ks)
  return dict({f'top-{k}': v for k, v in acc.items()}, fit_seconds=fit_seconds,
              **_chosen(model))


def run_retrieval(kernels, task_id, method: str, config: SecondOrderConfig,
                  split_seed: int = 0, test_tasks: int = 10, ks=(1, 5, 10),
                  progress: Optional[Callable] = None,
                  cache: Optional[cache_lib.Cache] = None) -> dict:
  """Table 2 for one method and split: CMC rank-k and mAP of query vs gallery models, and the
  seconds the fit took."""
  split = retrieval_split(task_id, test_tasks=test_tasks, seed=split_seed)
  t0 = time.perf_counter()
  model = fit(method, _seeded(config, split_seed), split.train_tasks.size,
              interface.take(kernels, split.train),
              _relabel(task_id[split.train], split.train_tasks),
              cache, progress)
  fit_seconds = time.perf_counter() - t0
  sim = metrics.cosine_similarity(model.embed(interface.take(kernels, split.query)),
                                  model.embed(interface.take(kernels, split.gallery)))
  return dict(metrics.retrieval_metrics(sim, task_id[split.query], task_id[split.gallery], ks),
              fit_seconds=fit_seconds, **_chosen(model))


def _chosen(model) -> dict:
  """{'chosen': what the fit chose on its training models}, or {} (`interface.chosen`)."""
  picked = interface.chosen(model)
  return {'chosen': picked} if picked else {}


def _shapes(inputs, layers) -> list:
  kernels = interface.kernels_of(inputs)
  return [np.asarray(kernels[i]).shape[1:] for i in layers]


def run_cross_architecture(kernels, task_id, other_kernels, other_task_id, method: str,
                           config: SecondOrderConfig, split_seed: int = 0, ks=(1, 5, 10),
                           progress: Optional[Callable] = None,
                           cache: Optional[cache_lib.Cache] = None) -> dict:
  """Different networks (the paper's stated disadvantage): `method` fitted on every model of
  one architecture names the tasks of another architecture's models; top-k over the first
  set's tasks. A method whose features depend on the channel counts is refused when the
  shapes differ."""
  m = methods.get(method)
  tasks = np.unique(task_id)
  absent = sorted(set(np.unique(other_task_id).tolist()) - set(tasks.tolist()))
  if absent:
    raise UserError(f'the other model set has tasks {absent[:10]} that the fitted set lacks.')
  layers = m.active_layers(config)
  if not m.any_width and _shapes(kernels, layers) != _shapes(other_kernels, layers):
    width_free = ', '.join(methods.width_free())
    raise UserError(f'method {method!r} reads layers of fixed shape {_shapes(kernels, layers)[0]}'
                     f', the other models have {_shapes(other_kernels, layers)[0]}; methods that '
                     f'read any width: {width_free}.')
  model = fit(m, _seeded(config, split_seed), tasks.size, kernels, _relabel(task_id, tasks),
              cache, progress)
  acc = metrics.topk_accuracy(model.predict(other_kernels), _relabel(other_task_id, tasks), ks)
  return {f'top-{k}': v for k, v in acc.items()}
