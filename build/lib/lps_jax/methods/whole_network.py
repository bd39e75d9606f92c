"""Whole-network methods: every layer of a model read at once (the paper's open problem, Sec. 6).

The paper aligns each layer on its own (Eq. 5-8) and reads only the first; here a network's
channel symmetry (`resnet.permutation_spec`) is resolved for all layers jointly, then read:

  Aligner       Git Re-Basin weight matching (Ainsworth et al. 2023, Alg. 1) of every model to
                one reference, the reference refined towards the mean of a subsample of the
                training models (`symmetry.matching.WeightMatcher`); fitted on training models;
  Aligned       any method (fit / predict / embed) on the aligned networks;
  FlatProbe     standardised, flattened arrays (by path prefix) + multinomial logistic
                regression: on aligned weights the linear probe of all layers and the FC, on
                `functional/` arrays the functional reference;
The functional reference's features (each model's logits on a fixed batch of probe images, not
weight-space) are computed where the zoo records them: `lps_jax.zoo.probe`.

Inputs are `modelset.NetworkStack`s (all variables of M models, conv kernels first).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from lps_jax.common import cache as cache_lib
from lps_jax.common.errors import UserError
from lps_jax.symmetry import matching, permutations
from lps_jax.training import modelset
from lps_jax.training.modelset import NetworkStack

OBJECTIVE = 'params/'   # weight matching scores parameters, not running statistics


def _need_stack(stack) -> NetworkStack:
  return modelset.require_stack(stack, 'a whole-network method')


def _objective(stack: NetworkStack) -> list[np.ndarray]:
  return [a for p, a in stack.items() if p.startswith(OBJECTIVE)]


class Aligner:
  """Whole networks matched to a reference fitted on training models: the one weight matcher
  (`symmetry.matching.WeightMatcher`, sorted starts) on every parameter of a `NetworkStack`.
  With a `common.cache.Cache`, the reference and each stack's permutations are kept
  (content-addressed)."""

  def __init__(self, reference_models: int = 50, rounds: int = 2, seed: int = 0, cache=None):
    self.reference_models, self.rounds, self.seed, self.cache = reference_models, rounds, seed, cache
    self.matcher = None

  def fit(self, stack: NetworkStack) -> 'Aligner':
    """The reference: `rounds` of align-to-mean over `reference_models` training models drawn
    with `seed` (all of them if fewer)."""
    stack = _need_stack(stack)
    self.matcher = matching.WeightMatcher(
        stack.spec(), self.reference_models, self.rounds, self.seed, sorted_start=True,
        cached=None if self.cache is None else self.cache.arrays)
    chosen = stack.take(self.matcher.reference_rows(stack.num_models))
    logging.info('whole-network alignment: a reference from %d training models, %d rounds',
                 chosen.num_models, self.rounds)
    self.matcher.fit(stack.model_flats(OBJECTIVE),
                     key={'models': cache_lib.fingerprint(*_objective(chosen))})
    return self

  @property
  def reference(self):
    return None if self.matcher is None else self.matcher.reference

  def perms_of(self, stack: NetworkStack) -> list[permutations.Perms]:
    """Each model's permutations onto the reference (Git Re-Basin weight matching)."""
    if self.matcher is None:
      raise UserError('Aligner.transform before fit.')
    ref = self.matcher.reference
    logging.info('whole-network alignment: matching %d models to the reference', stack.num_models)
    return self.matcher.perms(stack.model_flats(OBJECTIVE), key={
        'reference': cache_lib.fingerprint(*[ref[k] for k in sorted(ref)]),
        'models': cache_lib.fingerprint(*_objective(stack))})

  def transform(self, stack: NetworkStack) -> NetworkStack:
    """Every model permuted to best match the reference: the same functions, one order."""
    stack = _need_stack(stack)
    spec = self.matcher.spec
    return stack.replaced([
        permutations.apply(spec, p, {k: v for k, v in flat.items() if k in spec.axes_to_perm})
        for p, flat in zip(self.perms_of(stack), stack.model_flats())])


class Aligned:
  """`inner` (fit / predict / embed over stacks or kernel lists) on whole-network-aligned
  models: fit aligns the training models to a reference fitted on them; predict and embed
  align to the same reference."""

  def __init__(self, inner, aligner: Aligner):
    self.inner, self.aligner = inner, aligner

  def fit(self, stack, labels, progress: Optional[Callable] = None) -> None:
    self.aligner.fit(stack)
    self.inner.fit(self.aligner.transform(stack), labels, progress=progress)

  def predict(self, stack) -> np.ndarray:
    return self.inner.predict(self.aligner.transform(stack))

  def embed(self, stack) -> np.ndarray:
    return self.inner.embed(self.aligner.transform(stack))


class FlatProbe:
  """The arrays whose paths start with one of `prefixes`, flattened, standardised over the
  training models, + L2-penalised multinomial logistic regression (C). Fitted in the span of
  the training models (an exact reparametrisation for an L2 penalty, by the representer
  theorem), so 10^5 weights per model cost a 400 x 400 problem."""

  def __init__(self, prefixes: Sequence[str], num_classes: int, C: float = 1.0):
    self.prefixes, self.num_classes, self.C = tuple(prefixes), num_classes, C

  def _x(self, stack) -> np.ndarray:
    stack = _need_stack(stack)
    chosen = [np.asarray(a, np.float64).reshape(len(a), -1) for p, a in stack.items()
              if p.startswith(self.prefixes)]
    if not chosen:
      raise UserError(f'no arrays under {self.prefixes} in this stack.')
    return np.concatenate(chosen, axis=1)

  def _z(self, stack) -> np.ndarray:
    return self.scaler.transform(self._x(stack)) @ self.basis

  def fit(self, stack, labels, progress: Optional[Callable] = None) -> None:
    x = self._x(stack)
    self.scaler = StandardScaler().fit(x)
    x = self.scaler.transform(x)
    # An orthonormal basis of the training rows' span from their (M, M) Gram matrix (an SVD
    # of the wide (M, d) matrix itself is far slower).
    w, u = np.linalg.eigh(x @ x.T)
    keep = w > 1e-9 * w.max()
    self.basis = x.T @ (u[:, keep] / np.sqrt(w[keep]))
    self.clf = LogisticRegression(C=self.C, max_iter=5000).fit(self._z(stack), labels)
    if list(self.clf.classes_) != list(range(self.num_classes)):
      raise UserError('every task needs training models (labels 0..num_classes-1).')
    if progress is not None:
      progress(1, None)

  def predict(self, stack) -> np.ndarray:
    return self.clf.predict_proba(self._z(stack))

  def embed(self, stack) -> np.ndarray:
    z = self.clf.decision_function(self._z(stack))
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
