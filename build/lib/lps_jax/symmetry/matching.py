"""The one weight matcher: Git Re-Basin weight matching over a permutation spec.

Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023, Alg. 1): the permutations of
model B that maximise sum_l <W_l^A, P W_l^B>, solved by coordinate descent over the groups,
each step a linear assignment (Hungarian) with the other groups fixed; this aligns whole
networks along their permutation chain jointly, where the paper's order chain rule sorts each
layer in turn. `align_to_mean` refines the reference towards the mean of the aligned models.

`WeightMatcher` is what every method that aligns by matching uses (the `rebasin` and
`rebasin_chain` probes on the layers they read, the whole-network methods on every layer): a
reference fitted on training models, then any model's permutations onto it. On one layer (the
first, whose inputs are RGB) it is the Hungarian assignment of its filters.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from lps_jax.common.errors import UserError
from lps_jax.symmetry.permutations import (Flat, PermutationSpec, Perms, apply,
                                           identity_perms)


def sorted_init(spec: PermutationSpec, reference: Flat, model: Flat) -> Perms:
  """A start for weight matching that does not depend on the model's channel order: each
  group's assignment on the channels' slices with their values sorted (a sorted slice is
  invariant to every other group's permutation). Weight matching from it, in a seeded group
  order, is then equivariant: a permuted copy of a model lands on the same aligned model
  (up to ties)."""
  perms = {}
  for g, n in spec.sizes(model).items():
    gain = np.zeros((n, n))
    for path, axis in spec.perm_to_axes[g]:
      if path in reference and path in model:
        a = np.sort(np.moveaxis(reference[path], axis, 0).reshape(n, -1), axis=1)
        b = np.sort(np.moveaxis(model[path], axis, 0).reshape(n, -1), axis=1)
        gain += a @ b.T
    perms[g] = linear_sum_assignment(gain, maximize=True)[1]
  return perms


def weight_matching(spec: PermutationSpec, reference: Flat, model: Flat,
                    rng: Optional[np.random.Generator] = None, max_iter: int = 100,
                    init: Optional[Perms] = None) -> Perms:
  """Permutations P of `model` maximising sum over variables of <reference, P(model)>, by
  coordinate descent over the groups in random order until no group improves (Alg. 1 of
  Git Re-Basin). Only paths in both dicts and in the spec count (pass params, not running
  statistics, for the paper's objective). `apply(spec, P, model)` is then aligned."""
  rng = rng if rng is not None else np.random.default_rng(0)
  sizes = spec.sizes(model)
  perms = {g: np.array(p) for g, p in (init or identity_perms(spec, model)).items()}
  groups = sorted(sizes)
  for _ in range(max_iter):
    improved = False
    for g in rng.permutation(groups):
      n = sizes[g]
      gain = np.zeros((n, n))
      for path, axis in spec.perm_to_axes[g]:
        if path not in reference or path not in model:
          continue
        a = np.moveaxis(reference[path], axis, 0).reshape(n, -1)
        b = apply(spec, perms, {path: model[path]}, except_axis=(path, axis))[path]
        gain += a @ np.moveaxis(b, axis, 0).reshape(n, -1).T
      _, col = linear_sum_assignment(gain, maximize=True)
      old, new = gain[np.arange(n), perms[g]].sum(), gain[np.arange(n), col].sum()
      if new > old + 1e-12 * max(1.0, abs(old)):
        perms[g], improved = col, True
    if not improved:
      break
  return perms


def align_to_mean(spec: PermutationSpec, models: Sequence[Flat], rounds: int = 3,
                  seed: int = 0) -> tuple[Flat, list[Perms]]:
  """A reference for a population: start from model 0, align every model to it by weight
  matching, replace it by the mean of the aligned models, repeat `rounds` times. Returns the
  reference and each model's permutations (apply them to align the model)."""
  rng = np.random.default_rng(seed)
  keys = [k for k in models[0] if k in spec.axes_to_perm]
  reference = {k: models[0][k] for k in keys}
  perms = [identity_perms(spec, models[0]) for _ in models]
  for _ in range(rounds):
    perms = [weight_matching(spec, reference, {k: m[k] for k in keys}, rng, init=p)
             for m, p in zip(models, perms)]
    aligned = [apply(spec, p, {k: m[k] for k in keys}) for m, p in zip(models, perms)]
    reference = {k: np.mean([a[k] for a in aligned], axis=0) for k in keys}
  return reference, perms


class WeightMatcher:
  """Models matched to one reference fitted on training models (`align_to_mean` over
  `reference_models` of them drawn with `seed`, all if None or fewer). `sorted_start` starts
  each match from `sorted_init` (then a permuted copy of a model lands on the same aligned
  model); otherwise from the identity. Models are flat dicts; only paths in the spec count.
  `cached(key, compute)`, if given, keeps the reference and the permutations (a
  `common.cache.Cache.arrays`)."""

  def __init__(self, spec: PermutationSpec, reference_models: Optional[int] = None,
               rounds: int = 2, seed: int = 0, sorted_start: bool = False,
               cached: Optional[Callable] = None):
    self.spec, self.reference_models, self.rounds, self.seed = spec, reference_models, rounds, seed
    self.sorted_start = sorted_start
    self.cached = cached or (lambda key, compute: compute())
    self.reference: Optional[Flat] = None

  def reference_rows(self, num_models: int) -> np.ndarray:
    """The training models the reference is fitted on."""
    if self.reference_models is None:
      return np.arange(num_models)
    return np.sort(np.random.default_rng(self.seed).permutation(num_models)
                   [:self.reference_models])

  def fit(self, models: Sequence[Flat], key: Optional[dict] = None) -> 'WeightMatcher':
    """The reference from `models` (`key` names them for the cache)."""
    chosen = [models[i] for i in self.reference_rows(len(models))]
    self.reference = self.cached(
        dict(key or {}, kind='wn_reference', rounds=self.rounds, seed=self.seed),
        lambda: align_to_mean(self.spec, chosen, self.rounds, self.seed)[0])
    return self

  def perms(self, models: Sequence[Flat], key: Optional[dict] = None) -> list[Perms]:
    """Each model's permutations onto the reference; every model's search starts from the same
    seeded group order."""
    if self.reference is None:
      raise UserError('WeightMatcher.perms before fit.')
    groups = sorted(self.spec.perm_to_axes)

    def compute():
      found = [weight_matching(self.spec, self.reference, m, np.random.default_rng(self.seed),
                               init=sorted_init(self.spec, self.reference, m)
                               if self.sorted_start else None) for m in models]
      return {g: np.stack([p[g] for p in found]) for g in groups}

    stacked = self.cached(dict(key or {}, kind='wn_perms', seed=self.seed), compute)
    return [{g: stacked[g][i] for g in groups} for i in range(len(models))]

  def transform(self, models: Sequence[Flat], key: Optional[dict] = None) -> list[Flat]:
    """Every model permuted to best match the reference (its variables in the spec)."""
    return [apply(self.spec, p, {k: v for k, v in m.items() if k in self.spec.axes_to_perm})
            for p, m in zip(self.perms(models, key), models)]
