"""A retrieval index over a zoo: a method (a second-order network, a kernel probe, the chained-
Gram kernel) fitted on all of its models, every label a class, and their representations.

A query is one model (a checkpoint path, its arrays, or its conv kernels): the answer ranks the
labels by the method's probabilities, the indexed models by cosine similarity of
representations (Sec. 5.2), says how far the model lies from the index (1 - the top cosine, and
its percentile among the index's own held-out models) and answers "unknown" when the calibrated
score is below the threshold (`query.open_set`). Saved as a folder: index.json (method, config,
labels, what it reads, recipes, calibration), estimator.npz (the fitted state, `state()`), and
models.npz (one row per indexed model: embedding, label, run, recipe, path).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

from lps_jax.align.fit import SecondOrderConfig
from lps_jax.common import files
from lps_jax.common.errors import UserError
from lps_jax.methods import interface
from lps_jax.methods import registry as methods
from lps_jax.query import checkpoint_inputs as inputs_lib
from lps_jax.query import open_set
from lps_jax.query.checkpoint_inputs import Needs, QueryError
from lps_jax.training import resnet

FORMAT = 3


def method_names() -> list[str]:
  """The methods an index can be built with."""
  return inputs_lib.indexable()


@dataclasses.dataclass
class Index:
  method: str
  config: SecondOrderConfig
  labels: list                   # class names (a task, or a zoo's label)
  needs: Needs
  reads: dict                    # {'shapes': HWIO per layer} or {'model': ResNetConfig dict}
  estimator: object
  embeddings: np.ndarray         # (M, D), L2-normalised
  label_of: np.ndarray           # (M,) class index of each indexed model
  run: np.ndarray                # (M,) str
  recipe: np.ndarray             # (M,) str
  path: np.ndarray               # (M,) str
  calibration: Optional[open_set.Calibration] = None
  source: str = ''
  seconds: dict = dataclasses.field(default_factory=dict)

  @property
  def any_width(self) -> bool:
    return methods.get(self.method).any_width

  def recipes(self) -> dict:
    """Models per training recipe."""
    return dict(collections.Counter(self.recipe.tolist()))

  def describe(self) -> dict:
    return {'method': self.method, 'models': int(self.label_of.size), 'labels': len(self.labels),
            'reads': self.needs.describe(), 'recipes': self.recipes(), 'source': self.source,
            'calibration': None if self.calibration is None else self.calibration.summary(),
            'seconds': self.seconds}

  def read(self, checkpoint, layout: str = 'auto', layers=None, origin=None):
    """(one model's inputs, names read): `checkpoint_inputs.read`, checked against the index."""
    got, names = inputs_lib.read(checkpoint, self.needs, self.method, self.config, layout,
                                 layers, origin)
    origin = origin or (str(checkpoint) if isinstance(checkpoint, (str, os.PathLike))
                        else 'arrays')
    if self.needs.whole:
      model = dataclasses.asdict(got[1])
      if resnet.ResNetConfig.from_dict(self.reads['model']) != got[1]:
        raise QueryError(f'{origin}: a ResNet {model}; the index holds '
                         f'{self.reads["model"]}: build an index of that architecture.')
    else:
      check_kernels(self, got, origin)
    return got, names

  def query(self, checkpoint, top: int = 5, layout: str = 'auto', layers=None) -> dict:
    """The answer for one model (module docstring); raises UserError on a checkpoint that
    does not fit."""
    out = self.query_many([checkpoint], top, layout, layers)[0]
    if isinstance(out, UserError):
      raise out
    return out

  def query_many(self, checkpoints: Sequence, top: int = 5, layout: str = 'auto',
                 layers=None) -> list:
    """Answers (dicts) or the UserError of each checkpoint; readable ones run as one batch."""
    read, out = [], [None] * len(checkpoints)
    for i, c in enumerate(checkpoints):
      try:
        read.append((i, *self.read(c, layout, layers)))
      except UserError as e:
        out[i] = e
    groups = collections.defaultdict(list)     # one batch per architecture
    for i, got, names in read:
      groups[_shape_key(got)].append((i, got, names))
    for group in groups.values():
      origins = [_origin(checkpoints[i]) for i, _, _ in group]
      batch = inputs_lib.stack([got for _, got, _ in group], self.needs, origins)
      probs, emb = self.estimator.predict(batch), self.estimator.embed(batch)
      for row, (i, _, names) in enumerate(group):
        out[i] = self._answer(probs[row], emb[row], top, origins[row], names)
    return out

  def _answer(self, probs, emb, top, origin, names) -> dict:
    sims = self.embeddings @ emb
    order_t = np.argsort(-probs, kind='stable')[:top]
    order_m = np.argsort(-sims, kind='stable')[:top]
    best = int(order_t[0])
    distance = max(float(1.0 - sims.max()), 0.0)
    res = {'checkpoint': origin, 'read': names, 'answer': self.labels[best], 'known': True,
           'distance': distance,
           'labels': [{'label': self.labels[i], 'probability': float(probs[i])} for i in order_t],
           'models': [{'row': int(r), 'label': self.labels[self.label_of[r]],
                       'run': str(self.run[r]), 'recipe': str(self.recipe[r]),
                       'path': str(self.path[r]), 'cosine': float(sims[r])} for r in order_m]}
    cal = self.calibration
    if cal is not None:
      score = float(probs.max() if cal.score == 'probability' else sims.max())
      res.update(known=score >= cal.threshold, score=score, score_kind=cal.score,
                 threshold=cal.threshold, distance_percentile=cal.percentile(distance))
      if not res['known']:
        res['answer'] = 'unknown'
    return res


def _shape_key(got) -> tuple:
  if isinstance(got, tuple):     # (flat variables, ResNetConfig)
    return tuple((p, a.shape) for p, a in got[0].items())
  return tuple(np.shape(k) for k in got)


def _origin(c) -> str:
  return os.fspath(c) if isinstance(c, (str, os.PathLike)) else 'arrays'


def build(inputs, labels: Sequence[str], label_of: np.ndarray, run: Sequence, recipe: Sequence,
          path: Sequence, method: str = 'lps', config: SecondOrderConfig = SecondOrderConfig(),
          calibration_folds: int = 5, source: str = '',
          progress: Optional[Callable] = None) -> Index:
  """Fits `method` on every model (`inputs`: kernels, or a NetworkStack for a whole-network
  method), every label a class, embeds them, and calibrates "unknown" on held-out tasks
  (`calibration_folds` fits more; 0: no "unknown" answer)."""
  m = methods.get(method)
  if not m.indexable:
    raise UserError(f'an index needs a method it can keep ({", ".join(method_names())}); '
                    f'{method!r} cannot be kept in an index.')
  cfg = m.config(config)
  label_of = np.asarray(label_of)
  counts = np.bincount(label_of, minlength=len(labels))
  if counts.min() < 2:
    raise UserError(f'label {labels[int(np.argmin(counts))]!r} has {counts.min()} model(s); '
                    'every label needs >= 2 (the method trains on all, the calibration holds '
                    'some out).')
  t0 = time.perf_counter()
  est = m.estimator(cfg, len(labels))
  est.fit(inputs, label_of, progress=progress)
  embeddings = est.embed(inputs)
  seconds = {'fit': round(time.perf_counter() - t0, 2)}
  calibration = None
  if calibration_folds:
    t0 = time.perf_counter()
    calibration = open_set.calibrate(lambda k: m.estimator(cfg, k), inputs, label_of,
                                     calibration_folds, cfg.split_seed, progress)
    seconds['calibration'] = round(time.perf_counter() - t0, 2)
  needs = Needs.of(method, cfg)
  reads = ({'model': inputs.model} if needs.whole else
           {'shapes': [list(np.shape(k)[1:]) for k in interface.kernels_of(inputs)
                       [:needs.num_layers]]})
  return Index(method, cfg, list(labels), needs, reads, getattr(est, 'inner', est), embeddings,
               label_of, np.asarray(run, str), np.asarray(recipe, str), np.asarray(path, str),
               calibration, source, seconds)


def save(path: str, index: Index) -> None:
  os.makedirs(path, exist_ok=True)
  if os.path.exists(os.path.join(path, 'index.json')):   # a rebuild: incomplete until the end
    os.remove(os.path.join(path, 'index.json'))
  cal = index.calibration
  meta = {'format': FORMAT, 'method': index.method, 'config': dataclasses.asdict(index.config),
          'labels': index.labels, 'needs': dataclasses.asdict(index.needs), 'reads': index.reads,
          'source': index.source, 'recipes': index.recipes(), 'seconds': index.seconds,
          'calibration': None if cal is None else cal.summary()}
  rows = dict(embeddings=index.embeddings, label_of=index.label_of, run=index.run,
              recipe=index.recipe, path=index.path)
  if cal is not None:
    rows['heldout_distances'] = cal.distances
  for name, write in [('estimator.npz', lambda f: np.savez(f, **index.estimator.state())),
                      ('models.npz', lambda f: np.savez(f, **rows)),
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
    if meta.get('format') != FORMAT:
      raise QueryError(f'index format {meta.get("format")}, this release reads {FORMAT}')
    cfg = SecondOrderConfig(**resnet.tuples_from_json(meta['config']))
    with np.load(os.path.join(path, 'models.npz')) as f:
      rows = {k: f[k] for k in f.files}
    est = methods.get(meta['method']).build(cfg, len(meta['labels']))
    with np.load(os.path.join(path, 'estimator.npz')) as f:
      est.load_state({k: f[k] for k in f.files})
  except Exception as e:
    raise QueryError(f'index at {path!r} is unreadable ({type(e).__name__}: {e}); rebuild it '
                     'with --build.') from e
  cal = meta['calibration']
  return Index(meta['method'], cfg, meta['labels'], Needs(**meta['needs']), meta['reads'], est,
               rows['embeddings'], rows['label_of'], rows['run'], rows['recipe'], rows['path'],
               None if cal is None else open_set.Calibration.from_summary(
                   cal, rows['heldout_distances']), meta['source'], meta['seconds'])


def check_kernels(index: Index, kernels: Sequence[np.ndarray], origin: str) -> None:
  shapes = index.reads['shapes']
  if len(kernels) < len(shapes):
    raise QueryError(f'{origin}: {len(kernels)} conv layers given, the index reads '
                     f'{len(shapes)}.')
  for i, (k, shape) in enumerate(zip(kernels, shapes)):
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
