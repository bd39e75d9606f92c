"""Channel permutation symmetry as small data, and whole-network weight matching.

A `PermutationSpec` says, for each channel group (a permutation), which axis of which variable
it permutes (as samuela/git-re-basin's `PermutationSpec`): permuting every listed axis of a
group together leaves the network's function unchanged (Sec. 4 of the paper: the order of
filters and channels is changeable). `lps_jax.training.resnet.permutation_spec` writes ResNet's; this
module only reads specs, so it works for any architecture that provides one.

Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023, Alg. 1): the permutations of
model B that maximise sum_l <W_l^A, P W_l^B>, solved by coordinate descent over the groups,
each step a linear assignment (Hungarian) with the other groups fixed; this aligns whole
networks along their permutation chain jointly, where the paper's order chain rule sorts each
layer in turn. `align_to_mean` refines the reference towards the mean of the aligned models.
Variables are flat dicts {'/'-joined path: array} (`flatten` / `unflatten`); arrays are numpy.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from lps_jax.common.errors import UserError

Flat = dict[str, np.ndarray]
Perms = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
  """perm_to_axes: group -> ((variable path, axis), ...); axes_to_perm: path -> group per axis
  (None where an axis is not permuted). Paths not listed are not permuted."""
  perm_to_axes: Mapping[str, tuple[tuple[str, int], ...]]
  axes_to_perm: Mapping[str, tuple[Optional[str], ...]]

  @staticmethod
  def from_axes(axes_to_perm: Mapping[str, Sequence[Optional[str]]]) -> 'PermutationSpec':
    perm_to_axes: dict[str, list] = {}
    for path, groups in axes_to_perm.items():
      for axis, group in enumerate(groups):
        if group is not None:
          perm_to_axes.setdefault(group, []).append((path, axis))
    return PermutationSpec({g: tuple(v) for g, v in perm_to_axes.items()},
                           {k: tuple(v) for k, v in axes_to_perm.items()})

  def restrict(self, paths: Sequence[str]) -> 'PermutationSpec':
    """The spec of these variables only (e.g. the first layers of a network): the groups
    that touch none of them drop out; the others keep only these axes."""
    missing = [p for p in paths if p not in self.axes_to_perm]
    if missing:
      raise UserError(f'the spec does not know {missing[:3]}.')
    return PermutationSpec.from_axes({p: self.axes_to_perm[p] for p in paths})

  def sizes(self, flat: Flat) -> dict[str, int]:
    """The size of every group, read off the variables present (checked to agree)."""
    out = {}
    for group, axes in self.perm_to_axes.items():
      sizes = {flat[p].shape[a] for p, a in axes if p in flat}
      if not sizes:
        raise UserError(f'permutation {group!r}: none of its variables is given.')
      if len(sizes) != 1:
        raise UserError(f'permutation {group!r} spans axes of sizes {sorted(sizes)}: the spec '
                         'does not match these variables.')
      out[group] = sizes.pop()
    return out


def flatten(tree: Mapping, prefix: str = '') -> Flat:
  """{'params': {'conv1': {'kernel': x}}} -> {'params/conv1/kernel': x} (numpy)."""
  out = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if hasattr(v, 'keys'):
      out.update(flatten(v, path + '/'))
    else:
      out[path] = np.asarray(v)
  return out


def unflatten(flat: Flat) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def unstack(stacked: Flat) -> list[Flat]:
  """{path: (M, ...) array} -> one {path: array} per model."""
  arrays = {p: np.asarray(a) for p, a in stacked.items()}
  count = {a.shape[0] for a in arrays.values()}
  if len(count) != 1:
    raise UserError(f'cannot unstack: the variables hold {sorted(count)} models (none given, '
                     'or stacks of different sizes).')
  return [{p: a[m] for p, a in arrays.items()} for m in range(count.pop())]


def apply(spec: PermutationSpec, perms: Perms, flat: Flat,
          except_axis: Optional[tuple[str, int]] = None) -> Flat:
  """Every variable with each permuted axis reordered, `x[..., perm[g], ...]` (np.take): the
  permuted model. `except_axis` (path, axis) is left as it is (for weight matching)."""
  out = {}
  for path, x in flat.items():
    for axis, group in enumerate(spec.axes_to_perm.get(path, ())):
      if group is not None and (path, axis) != except_axis:
        x = np.take(x, perms[group], axis=axis)
    out[path] = x
  return out


def random_perms(spec: PermutationSpec, flat: Flat, rng: np.random.Generator) -> Perms:
  return {g: rng.permutation(n) for g, n in sorted(spec.sizes(flat).items())}


def identity_perms(spec: PermutationSpec, flat: Flat) -> Perms:
  return {g: np.arange(n) for g, n in spec.sizes(flat).items()}


def inverse(perms: Perms) -> Perms:
  return {g: np.argsort(p) for g, p in perms.items()}


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
