"""The one method interface: a registry entry (`Method`) builds an estimator (`Estimator`).

An estimator names a model's task from what the method reads (`Method.reads`): conv kernels (a
list over layers of (M, h, w, c, g) stacks, entries the method does not read may be None), or
whole networks (a `training.modelset.NetworkStack`). Every estimator implements `Estimator`;
every method is a `Method` subclass whose `build` returns one, plus a line in
`methods.registry.REGISTRY`. Wrappers compose estimators: `Ensemble` (members averaged) and
`CachedFit` (a fitted estimator kept in a `common.cache.Cache`, reused by any later run that
trains the same thing on the same data). Adding a method: docs/methods.md.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol, runtime_checkable

import numpy as np

from lps_jax.align.fit import SecondOrderConfig
from lps_jax.common import cache as cache_lib
from lps_jax.training.modelset import NetworkStack

READS_KERNELS, READS_NETWORKS, READS_OUTPUTS = 'kernels', 'networks', 'outputs'  # Method.reads


@runtime_checkable
class Estimator(Protocol):
  """What every method builds. `inputs` are what its method reads (kernels or a NetworkStack);
  `labels` are class indices 0..num_classes-1."""

  def fit(self, inputs, labels, progress: Optional[Callable] = None) -> None:
    """Trains on the training models; `progress(n, loss)` counts `Method.fit_count` steps."""

  def predict(self, inputs) -> np.ndarray:
    """(M, num_classes) class probabilities."""

  def embed(self, inputs) -> np.ndarray:
    """(M, D) L2-normalised embeddings (task retrieval ranks by cosine)."""

  # An indexable estimator (`Method.indexable`, kept by lps_query) also has
  # `state() -> {name: array}` and `load_state(arrays)`: its fitted state as plain arrays.
  # One that chooses settings on its training models (cross-validation) may have
  # `chosen() -> {name: value}` (plain JSON values): the tables record what each split chose.


def chosen(estimator) -> dict:
  """What a fitted estimator chose on its training models ({} when it chooses nothing)."""
  pick = getattr(estimator, 'chosen', None)
  return dict(pick()) if callable(pick) else {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A registry entry: what the method is (label, citation, the paper's numbers where the paper
  has them) and how to build its estimator. Subclasses say what they read and build."""
  name: str
  label: str
  cite: str = 'LPS paper, Sec. 5.1'
  paper: dict = dataclasses.field(default_factory=dict)  # protocol -> (top/rank-1, 5, 10)
  layers: tuple = ()             # conv layers it reads (0-based), if not the run config's
  any_width: bool = False        # reads models of other channel counts (cross-architecture)

  reads = READS_KERNELS          # or READS_NETWORKS, READS_OUTPUTS (networks + their outputs)
  indexable = False              # whether lps_query can keep its fitted estimator in an index

  def build(self, base: SecondOrderConfig, num_classes: int,
            cache: Optional[cache_lib.Cache] = None) -> Estimator:
    """An unfitted estimator for `num_classes` tasks (`base.split_seed` seeds what is random)."""
    raise NotImplementedError(f'{type(self).__name__} does not build an estimator')

  def estimator(self, base: SecondOrderConfig, num_classes: int,
                cache: Optional[cache_lib.Cache] = None) -> Estimator:
    """`build`, taking either kind of input: a kernel reader also reads the kernels of whole
    networks (a model set read for other methods of the same run)."""
    built = self.build(base, num_classes, cache)
    return OnKernels(built) if self.reads == READS_KERNELS else built

  def config(self, base: SecondOrderConfig) -> SecondOrderConfig:
    """The second-order config it trains with (methods without one: `base`)."""
    return base

  def fit_count(self, base: SecondOrderConfig) -> int:
    """Steps a progress bar counts for one fit."""
    return 1

  def active_layers(self, base: SecondOrderConfig) -> tuple[int, ...]:
    """The conv layers it reads."""
    return self.layers or self.config(base).active_layers()

  def num_layers(self, base: SecondOrderConfig) -> int:
    """How many conv layers (network order) its kernels must include."""
    return max(self.active_layers(base)) + 1

  @property
  def reads_networks(self) -> bool:
    """Whether it needs every variable of each model (the model set folder), not kernels."""
    return self.reads in (READS_NETWORKS, READS_OUTPUTS)

  @property
  def reads_statistics(self) -> bool:
    """Whether it reads BatchNorm's running statistics (a checkpoint must carry them)."""
    return False

  @property
  def reads_probe_outputs(self) -> bool:
    """Whether it needs the models' outputs on probe images (`zoo.probe.probe_logits`)."""
    return self.reads == READS_OUTPUTS


def take(inputs, rows) -> object:
  """The models `rows` of a method's inputs (a kernels list, entries may be None, or a
  `NetworkStack`)."""
  if isinstance(inputs, NetworkStack):
    return inputs.take(rows)
  return [None if k is None else np.asarray(k)[rows] for k in inputs]


def num_conv(inputs) -> int:
  """How many conv layers a method's inputs hold."""
  return inputs.num_conv if isinstance(inputs, NetworkStack) else len(inputs)


def kernels_of(inputs) -> list:
  """The conv kernels of a method's inputs (a `NetworkStack`'s, or the kernels list itself)."""
  return inputs.kernels if isinstance(inputs, NetworkStack) else inputs


class OnKernels:
  """A kernel-reading estimator that also takes whole networks (their `kernels`)."""

  def __init__(self, inner):
    self.inner = inner

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def fit(self, inputs, labels, progress: Optional[Callable] = None) -> None:
    self.inner.fit(kernels_of(inputs), labels, progress=progress)

  def predict(self, inputs) -> np.ndarray:
    return self.inner.predict(kernels_of(inputs))

  def embed(self, inputs) -> np.ndarray:
    return self.inner.embed(kernels_of(inputs))


class Ensemble:
  """Members fitted on the same data: mean of their task probabilities; embeddings are the
  members' L2-normalised embeddings concatenated / sqrt(n), so cosine = mean of cosines."""

  def __init__(self, members: list):
    self.members = members

  def fit(self, inputs, labels, progress=None):
    for m in self.members:
      m.fit(inputs, labels, progress=progress)

  def predict(self, inputs) -> np.ndarray:
    return np.mean([m.predict(inputs) for m in self.members], axis=0)

  def embed(self, inputs) -> np.ndarray:
    return np.concatenate([m.embed(inputs) for m in self.members], 1) / np.sqrt(
        len(self.members))


class CachedFit:
  """An estimator whose fitted state is kept in `cache` under a key naming its config, the
  number of classes and a fingerprint of its training data: a later fit of the same thing loads
  it (then `progress(fit_count, None)` is called once, so progress bars stay true). The inner
  estimator serialises itself (`to_bytes` / `from_bytes(inputs, blob)`)."""

  def __init__(self, inner, cache: cache_lib.Cache, key: dict, read: Callable, fit_count: int):
    """`key`: what identifies the training besides its data; `read(inputs)`: the arrays of
    `inputs` it trains on (fingerprinted)."""
    self.inner, self.cache, self.key, self.read, self.count = inner, cache, key, read, fit_count

  def __getattr__(self, name):   # the fitted estimator's own attributes (config, ...)
    return getattr(self.inner, name)

  def fit(self, inputs, labels, progress: Optional[Callable] = None) -> None:
    key = dict(self.key, data=cache_lib.fingerprint(np.asarray(labels), *self.read(inputs)))
    blob = self.cache.get_bytes(key)
    if blob is not None:
      self.inner.from_bytes(inputs, blob)
      if progress is not None:
        progress(self.count, None)
      return
    self.inner.fit(inputs, labels, progress=progress)
    self.cache.put_bytes(key, self.inner.to_bytes())

  def predict(self, inputs) -> np.ndarray:
    return self.inner.predict(inputs)

  def embed(self, inputs) -> np.ndarray:
    return self.inner.embed(inputs)
