"""A retrieval index over a model set: a second-order network (or a kernel probe) trained on
all of its models (every task a class) and the parameter representations of those models.

A query is one model's conv kernels; the answer ranks the known tasks by the model's task
probabilities (Eq. 9's mixture, or the probe's regression) and the known models by cosine
similarity of representations (Sec. 5.2). Saved as a folder: index.json (method, config, tasks,
layer shapes), variables.msgpack (a trained network) or probe.npz (a fitted probe), and
embeddings.npz (one row per indexed model). A probe whose features do not depend on the channel
counts (`Method.any_width`: gram, weight_stats) answers models of other widths.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from lps_jax.align.fit import SecondOrderConfig
from lps_jax.common import files
from lps_jax.common.errors import UserError
from lps_jax.methods import probes as baselines
from lps_jax.methods import registry as methods
from lps_jax.training import resnet

FORMAT = 1


def method_names() -> list[str]:
  """The methods an index can be built with."""
  return [n for n, m in methods.REGISTRY.items() if m.indexable]


class QueryError(UserError):
  """A missing or damaged index folder, or a query that does not fit it."""


@dataclasses.dataclass
class Index:
  method: str
  config: SecondOrderConfig
  tasks: np.ndarray              # task id of each class of the network
  shapes: list                   # HWIO shape of each conv layer the network reads
  model: object                  # SecondOrderModel or baselines.FeatureProbe
  embeddings: np.ndarray         # (M, D), L2-normalised
  task_id: np.ndarray            # (M,)
  run: np.ndarray                # (M,)
  source: str = ''

  @property
  def num_layers(self) -> int:
    return len(self.shapes)

  @property
  def any_width(self) -> bool:
    return methods.get(self.method).any_width


def build(kernels: Sequence[np.ndarray], task_id: np.ndarray, run: np.ndarray,
          method: str = 'lps', config: SecondOrderConfig = SecondOrderConfig(),
          source: str = '', progress: Optional[Callable] = None) -> Index:
  """Trains `method` (a second-order or probe method of `methods.REGISTRY`) on all models,
  every task a class, and embeds them."""
  m = methods.get(method)
  if not m.indexable:
    raise UserError(f'an index needs a second-order or probe method ({", ".join(method_names())}'
                    f'); {method!r} cannot be kept in an index.')
  cfg = m.config(config)
  tasks = np.unique(task_id)
  labels = np.searchsorted(tasks, task_id).astype(np.int32)
  model = m.build(cfg, tasks.size)
  model.fit(kernels, labels, progress=progress)
  num_layers = m.num_layers(cfg)
  return Index(method, cfg, tasks, [list(np.asarray(k).shape[1:]) for k in kernels[:num_layers]],
               model, model.embed(kernels), np.asarray(task_id), np.asarray(run), source)


def save(path: str, index: Index) -> None:
  os.makedirs(path, exist_ok=True)
  if os.path.exists(os.path.join(path, 'index.json')):   # a rebuild: incomplete until the end
    os.remove(os.path.join(path, 'index.json'))
  meta = {'format': FORMAT, 'method': index.method, 'config': dataclasses.asdict(index.config),
          'tasks': index.tasks.tolist(), 'shapes': index.shapes, 'source': index.source}
  if isinstance(index.model, baselines.FeatureProbe):
    model_file = ('probe.npz', lambda f: np.savez(f, **index.model.state()))
  else:
    model_file = ('variables.msgpack', lambda f: f.write(index.model.to_bytes()))
  for name, write in [model_file,
                      ('embeddings.npz', lambda f: np.savez(f, embeddings=index.embeddings,
                                                            task_id=index.task_id,
                                                            run=index.run)),
                      ('index.json', lambda f: f.write(json.dumps(meta, indent=1).encode()))]:
    with files.atomic_path(os.path.join(path, name)) as tmp, open(tmp, 'wb') as f:
      write(f)                                    # index.json last: its presence = complete


def load(path: str) -> Index:
  meta_path = os.path.join(path, 'index.json')
  if not os.path.exists(meta_path):
    raise QueryError(f'no index at {path!r} (missing index.json); build one with '
                      'python -m experiments.lps_query --build --modelset=... --index=PATH.')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    cfg = SecondOrderConfig(**resnet.tuples_from_json(meta['config']))
    with np.load(os.path.join(path, 'embeddings.npz')) as f:
      emb, task_id, run = f['embeddings'], f['task_id'], f['run']
    model = methods.get(meta['method']).build(cfg, len(meta['tasks']))
    if isinstance(model, baselines.FeatureProbe):
      with np.load(os.path.join(path, 'probe.npz')) as f:
        model.load_state({k: f[k] for k in f.files})
    else:
      example = [np.zeros([1] + s, np.float32) for s in meta['shapes']]
      with open(os.path.join(path, 'variables.msgpack'), 'rb') as f:
        model.from_bytes(example, f.read())
  except Exception as e:
    raise QueryError(f'index at {path!r} is unreadable ({type(e).__name__}: {e}); rebuild it '
                      'with --build.') from e
  return Index(meta['method'], cfg, np.asarray(meta['tasks']), meta['shapes'], model, emb,
               task_id, run, meta.get('source', ''))


def check_kernels(index: Index, kernels: Sequence[np.ndarray], origin: str) -> None:
  if len(kernels) < index.num_layers:
    raise QueryError(f'{origin}: {len(kernels)} conv layers given, the index reads '
                      f'{index.num_layers}.')
  for i, (k, shape) in enumerate(zip(kernels, index.shapes)):
    # A width-free probe reads any number of channels: the first layer's filters must have the
    # same size (h, w, RGB inputs), deeper ones the same h, w (the probe checks its features).
    compared = (3 if i == 0 else 2) if index.any_width else 4
    if list(k.shape[-4:])[:compared] != list(shape)[:compared]:
      hint = ('the wrong layer' if index.any_width else 'a ResNet of another width (an index '
              'of a method that reads any width takes it: ' +
              ', '.join(n for n in methods.width_free() if n in method_names()) + '), or the '
              'wrong layer')
      raise QueryError(f'{origin}: conv layer {i + 1} has HWIO shape {tuple(k.shape[-4:])}, '
                        f'the index expects {tuple(shape)} ({hint}: name the layers with '
                        '--layers, or set --layout).')
    if not np.all(np.isfinite(k)):
      raise QueryError(f'{origin}: conv layer {i + 1} has NaN/Inf weights.')


def query(index: Index, kernels: Sequence[np.ndarray], top: int = 5) -> dict:
  """Nearest tasks (by task probability) and models (by cosine) for one model's kernels."""
  stacked = [np.asarray(k, np.float32)[None] for k in kernels[:index.num_layers]]
  probs = index.model.predict(stacked)[0]
  emb = index.model.embed(stacked)[0]
  sims = index.embeddings @ emb
  order_t = np.argsort(-probs, kind='stable')[:top]
  order_m = np.argsort(-sims, kind='stable')[:top]
  return {'tasks': [{'task': int(index.tasks[i]), 'fine_labels': [2 * int(index.tasks[i]),
                                                                 2 * int(index.tasks[i]) + 1],
                     'probability': float(probs[i])} for i in order_t],
          'models': [{'row': int(r), 'task': int(index.task_id[r]), 'run': int(index.run[r]),
                      'cosine': float(sims[r])} for r in order_m]}
