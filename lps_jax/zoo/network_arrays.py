"""One checkpoint's arrays as the variables of lps_jax's Flax ResNet: what whole-network methods
read of a model trained anywhere.

Two sources are recognised (`to_flax`):
- Flax / lps_jax trees (names with `kernel`, e.g. `params.conv1.kernel` from a msgpack or orbax
  checkpoint, or `conv1/kernel` from an npz): the paths are kept, HWIO as written.
- PyTorch ResNets (a `state_dict`; names ending in `weight`, `bias`, `running_mean`, ...):
  mapped by order and shape onto the Flax network, walked in network order (conv1, bn1, then per
  block conv1, bn1, conv2, bn2 and the 1x1 shortcut conv + BN where the shape changes, then
  the FC): conv OIHW -> HWIO, BatchNorm weight / bias -> scale / bias, running_mean / var ->
  mean / var, FC (out, in) -> (in, out). What differs: PyTorch pads a stride-2 3x3 conv
  symmetrically (1, 1), Flax's 'SAME' pads (0, 1) on 32x32 inputs, so the mapped network
  computes the checkpoint's function only when run with `resnet.ResNet(conv_padding=
  'symmetric')` (`zoo.probe.probe_logits(..., padding='symmetric')`; tested against PyTorch);
  the parameters, their symmetry and every weight-space method are unaffected. Option-A
  (parameter-free) shortcuts have no counterpart and are refused.

The architecture (widths, blocks per stage, classes) is read off the shapes. BatchNorm running
statistics are optional: a checkpoint without them maps to parameters only.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np

from lps_jax.common.errors import UserError
from lps_jax.symmetry import permutations
from lps_jax.training import resnet
from lps_jax.training.modelset import NetworkStack

PARAMS, STATS = 'params/', 'batch_stats/'
_BN_ROLES = (('weight', 'scale'), ('bias', 'bias'), ('running_mean', 'mean'),
             ('running_var', 'var'))


class NetworkError(UserError):
  """A checkpoint that does not map onto lps_jax's ResNet."""


@functools.lru_cache(maxsize=8)
def expected(config: resnet.ResNetConfig) -> dict[str, tuple]:
  """{path: shape} of one model's variables, in network order (the permutation spec's order,
  then the FC bias)."""
  shapes = permutations.flatten(jax.tree_util.tree_map(
      lambda s: np.empty(s.shape, np.float32),
      jax.eval_shape(lambda: resnet.init_variables(jax.random.PRNGKey(0), config))))
  order = list(resnet.permutation_spec(config).axes_to_perm) + ['params/dense/bias']
  return {p: shapes[p].shape for p in order}


def _float(origin: str, name: str, a) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype.kind != 'f':
    raise NetworkError(f'{origin}: {name} is {a.dtype}, not float weights.')
  return a.astype(np.float32)


def _is_flax(arrays: dict) -> bool:
  return any(n.replace('.', '/').endswith('conv1/kernel') for n in arrays)


def _flax_paths(arrays: dict, origin: str) -> dict[str, np.ndarray]:
  out = {}
  for name, a in arrays.items():
    path = name.replace('.', '/')
    for root in (PARAMS, STATS):     # drop wrappers before the tree ('state/params/...')
      if f'/{root}' in f'/{path}':
        path = root + f'/{path}'.split(f'/{root}', 1)[1]
        break
    else:
      path = PARAMS + path
    if np.ndim(a):
      out[path] = _float(origin, name, a)
  return out


def _config_from_flax(flat: dict, origin: str) -> resnet.ResNetConfig:
  if 'params/dense/kernel' not in flat:
    raise NetworkError(f'{origin}: no params/dense/kernel: not a whole lps_jax ResNet (a '
                       'whole-network index needs every layer).')
  blocks, widths = {}, {}
  for p, a in flat.items():
    parts = p.split('/')
    if len(parts) == 4 and parts[1].startswith('stage') and parts[2] == 'conv2':
      s, b = (int(x) for x in parts[1][len('stage'):].split('_block'))
      blocks[s] = max(blocks.get(s, 0), b)
      widths[s] = a.shape[-1]
  if not blocks:
    raise NetworkError(f'{origin}: no stage*_block*/conv2 kernels: not an lps_jax ResNet.')
  stages = sorted(blocks)
  return resnet.ResNetConfig(tuple(blocks[s] for s in stages), tuple(widths[s] for s in stages),
                             flat['params/dense/kernel'].shape[-1])


def _config_from_torch(tensors: list, origin: str) -> resnet.ResNetConfig:
  """Widths and blocks per stage from the convs in file order: the stem, then per block two
  3x3 convs and, where a stage starts (stride 2 or a new width), a 1x1 shortcut conv."""
  convs = [a.shape for _, a in tensors if a.ndim == 4]
  fc = [a for _, a in tensors if a.ndim == 2]
  blocks, widths, i = [], [], 1
  while i + 1 < len(convs) and convs[i][2:] == convs[i + 1][2:] == (3, 3):
    shortcut = i + 2 < len(convs) and convs[i + 2][2:] == (1, 1)
    if not widths or shortcut:
      widths.append(int(convs[i][0]))
      blocks.append(0)
    blocks[-1] += 1
    i += 3 if shortcut else 2
  if not fc or not blocks or i != len(convs) or convs[0][2:] != (3, 3):
    raise NetworkError(f'{origin}: convs shaped {[tuple(c) for c in convs][:6]}... and '
                       f'{len(fc)} FC layers: not the CIFAR ResNet lps_jax builds (a 3x3 stem, '
                       'two 3x3 convs per block, a 1x1 conv + BN shortcut where a stage starts, '
                       'one FC).')
  return resnet.ResNetConfig(tuple(blocks), tuple(widths), int(fc[-1].shape[0]))


def _from_torch(arrays: dict, origin: str) -> tuple[dict, resnet.ResNetConfig]:
  tensors = [(n, np.asarray(a)) for n, a in arrays.items()
             if np.ndim(a) and np.asarray(a).dtype.kind == 'f']
  config = _config_from_torch(tensors, origin)
  want = expected(config)
  out, queue = {}, list(tensors)

  def take(path, shape, name_hint=''):
    if not queue:
      raise NetworkError(f'{origin}: the checkpoint ends where {path} {shape} is expected.')
    name, a = queue.pop(0)
    if name_hint and not name.endswith(name_hint):
      raise NetworkError(f'{origin}: {name} {a.shape} where a BatchNorm {name_hint} is expected '
                         f'({path}).')
    if a.size != int(np.prod(shape)):
      raise NetworkError(f'{origin}: {name} has shape {a.shape} where {path} {shape} is '
                         'expected; not the ResNet layout lps_jax builds (option-A shortcuts '
                         'without a 1x1 conv are not mapped).')
    return name, a

  paths = list(want)
  i = 0
  while i < len(paths):
    path, shape = paths[i], want[paths[i]]
    leaf = path.rsplit('/', 1)[1]
    if leaf == 'kernel' and len(shape) == 4:
      name, a = take(path, shape)
      if a.ndim != 4 or a.shape[2:] != shape[:2]:
        raise NetworkError(f'{origin}: {name} {a.shape} where the conv {path} (HWIO {shape}) '
                           'is expected.')
      out[path] = _float(origin, name, a).transpose(2, 3, 1, 0)
      i += 1
    elif leaf == 'scale':                   # a BatchNorm: weight, bias, [running_mean, var]
      module = path[len(PARAMS):-len('/scale')]
      for role, flax_leaf in _BN_ROLES:
        if role.startswith('running') and not (queue and queue[0][0].endswith(role)):
          break                              # parameters-only checkpoint
        root = STATS if role.startswith('running') else PARAMS
        name, a = take(f'{root}{module}/{flax_leaf}', shape, role if role != 'weight' else '')
        out[f'{root}{module}/{flax_leaf}'] = _float(origin, name, a)
      i += 4                                 # scale, bias, mean, var of the spec's order
    elif path == 'params/dense/kernel':
      name, a = take(path, shape)
      out[path] = _float(origin, name, a).reshape(shape[::-1]).T
      i += 1
    else:                                    # params/dense/bias
      name, a = take(path, shape)
      out[path] = _float(origin, name, a).reshape(shape)
      i += 1
  if queue:
    raise NetworkError(f'{origin}: {len(queue)} float tensors left over after the FC '
                       f'({[n for n, _ in queue[:3]]}): not the ResNet layout lps_jax builds.')
  return out, config


def to_flax(arrays: dict, origin: str = 'checkpoint') -> tuple[dict, resnet.ResNetConfig]:
  """({Flax path: array}, the ResNetConfig) of one model's checkpoint arrays (a
  `foreign_checkpoints.read_arrays` dict). Every parameter is required; running statistics
  are kept where the checkpoint has them."""
  if _is_flax(arrays):
    flat = _flax_paths(arrays, origin)
    config = _config_from_flax(flat, origin)
  else:
    flat, config = _from_torch(arrays, origin)
  want = expected(config)
  missing = [p for p in want if p.startswith(PARAMS) and p not in flat]
  if missing:
    raise NetworkError(f'{origin}: lacks {len(missing)} parameters of its ResNet '
                       f'({missing[:3]}...); a whole-network index needs every layer.')
  bad = [f'{p} {flat[p].shape} (expected {want[p]})' for p in want
         if p in flat and flat[p].shape != want[p]]
  if bad:
    raise NetworkError(f'{origin}: shapes do not fit a ResNet {config.widths}: {bad[:3]}.')
  if not all(np.all(np.isfinite(a)) for a in flat.values()):
    raise NetworkError(f'{origin}: NaN/Inf weights.')
  return {p: flat[p] for p in want if p in flat}, config


def has_statistics(flat: dict) -> bool:
  """Whether a mapped model carries BatchNorm running statistics."""
  return any(p.startswith(STATS) for p in flat)


def stack(flats: Sequence[dict], config: resnet.ResNetConfig, origins: Sequence[str] = ()
          ) -> NetworkStack:
  """The `NetworkStack` of mapped models of one architecture (`to_flax` outputs), conv
  kernels first; every model must carry the same variables."""
  paths = list(flats[0])
  for i, f in enumerate(flats[1:], 1):
    if list(f) != paths:
      who = origins[i] if i < len(origins) else f'model {i}'
      extra = sorted(set(f) ^ set(paths))[:3]
      raise NetworkError(f'{who} carries other variables than the first model ({extra}...): '
                         'a zoo mixes checkpoints with and without BatchNorm statistics; '
                         'use one kind, or an index of parameters only.')
  conv = [f'params/{n}/kernel' for n in resnet.conv_layer_names(config)]
  order = conv + [p for p in paths if p not in conv]
  return NetworkStack([np.stack([f[p] for f in flats]) for p in order], order,
                      dataclasses.asdict(config), len(conv))
