"""Channel permutation symmetry as small data.

A `PermutationSpec` says, for each channel group (a permutation), which axis of which variable
it permutes (as samuela/git-re-basin's `PermutationSpec`): permuting every listed axis of a
group together leaves the network's function unchanged (Sec. 4 of the paper: the order of
filters and channels is changeable). `lps_jax.training.resnet.permutation_spec` writes ResNet's; this
module only reads specs, so it works for any architecture that provides one.

Variables are flat dicts {'/'-joined path: array} (`flatten` / `unflatten`); arrays are numpy.
The one weight matcher that resolves a spec's symmetry is `lps_jax.symmetry.matching`.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np
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
