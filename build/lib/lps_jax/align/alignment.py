"""Alignment of first-order conv filters against learned second-order filters (Sec. 4).

Pure functions, one per equation. Kernels are HWIO: a first-order kernel `theta` is
(h, w, c, g) with c input channels and g filters; the second-order filters `phi` of that layer
are (h, w, c, G). Every function works under `jax.jit`, `jax.vmap` (e.g. over a leading
population axis) and `jax.grad` with respect to `phi` (gradients flow through max and sort).
`align_population` runs them over a stack of models through `lps_jax.training.popmap` (jax only).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lps_jax.common.errors import UserError
from lps_jax.training import popmap


__all__ = ['CHANNEL_IMPLS', 'frobenius_scores', 'channel_max', 'first_layer_scores', 'sort_filters',
           'channel_scores', 'streamed_channel_max', 'align_layer', 'align_network',
           'align_population']

CHANNEL_IMPLS = ('auto', 'einsum', 'stream')   # formulations of Eq. 5 + 6 (channel_scores)

def _check_pair(theta, phi):
  if theta.ndim != 4 or phi.ndim != 4:
    raise UserError(f'theta and phi must be HWIO kernels of rank 4, got shapes {theta.shape} '
                     f'and {phi.shape}; transpose PyTorch OIHW kernels with (2, 3, 1, 0).')
  if theta.shape[:3] != phi.shape[:3]:
    raise UserError(f'phi {phi.shape} must match theta {theta.shape} in (h, w, c): the '
                     'second-order filters of a layer have its spatial size and input channels.')


def frobenius_scores(theta: jax.Array, phi: jax.Array) -> jax.Array:
  """Eq. 5: s[gi, gj, ci, cj] = <theta[:, :, ci, gi], phi[:, :, cj, gj]>_F; (g, G, c, c)."""
  _check_pair(theta, phi)
  return jnp.einsum('hwcg,hwdG->gGcd', theta, phi)


def channel_max(s: jax.Array) -> jax.Array:
  """Eq. 6: sum over cj of max over ci of s[gi, gj, ci, cj]; (g, G, c, c) -> (g, G)."""
  if s.ndim != 4 or s.shape[2] != s.shape[3]:
    raise UserError(f'expected Frobenius scores of shape (g, G, c, c), got {s.shape}.')
  return jnp.sum(jnp.max(s, axis=2), axis=-1)


def first_layer_scores(theta: jax.Array, phi: jax.Array) -> jax.Array:
  """Eq. 7: s[gi, gj] = sum_{h,w,c} theta[h,w,c,gi] phi[h,w,c,gj] (input channels are RGB)."""
  _check_pair(theta, phi)
  return jnp.einsum('hwcg,hwcG->gG', theta, phi)


def sort_filters(s: jax.Array) -> jax.Array:
  """Eq. 8: ascending sort over the filter axis gi, independently for each gj; (g, G)."""
  if s.ndim != 2:
    raise UserError(f'expected scores of shape (g, G), got {s.shape}.')
  return jnp.sort(s, axis=0)


def channel_scores(theta: jax.Array, phi: jax.Array, channel_align: bool = True,
                   impl: str = 'auto') -> jax.Array:
  """(g, G) scores of a layer >= 2 before the sort.

  channel_align=True: Eq. 5 + 6 (max over the first-order channel matched to each cj).
  channel_align=False: channels matched by index, sum_c s[gi, gj, c, c] (no alignment).
  impl: 'einsum' = `channel_max(frobenius_scores(...))` (materialises the (g, G, c, c) scores;
  autodiff), 'stream' = `streamed_channel_max` (running max over ci, custom VJP), 'auto' =
  'stream' on CPU (forward + backward ~20x faster on a 64-channel layer there, measured by
  `experiments.benchmark --suites=align --align_impls=stream,einsum`), 'einsum' elsewhere.
  """
  if not channel_align:
    return first_layer_scores(theta, phi)
  if impl == 'auto':
    impl = 'stream' if jax.default_backend() == 'cpu' else 'einsum'
  if impl == 'stream':
    return streamed_channel_max(theta, phi)
  if impl != 'einsum':
    raise UserError(f"unknown impl {impl!r}; choose from {', '.join(CHANNEL_IMPLS)}.")
  return channel_max(frobenius_scores(theta, phi))


def _running_channel_max(theta, phi):
  """Eq. 5 + 6 without the (g, G, c, c) tensor: max over ci and its argmax, one ci at a time.

  Returns (v, idx), both (g, G, c): v[gi, gj, cj] = max_ci s[gi, gj, ci, cj] and the first ci
  attaining it (the same tie rule as jnp.argmax).
  """
  _check_pair(theta, phi)
  h, w, c, g = theta.shape
  big_g = phi.shape[-1]
  per_channel = theta.reshape(h * w, c, g).transpose(1, 2, 0)   # (ci, g, hw)
  flat_phi = phi.reshape(h * w, c * big_g)                       # (hw, cj * G)

  def body(carry, x):
    v, idx, ci = carry
    s = x @ flat_phi                                             # s[gi, (cj, gj)] for this ci
    better = s > v
    return (jnp.where(better, s, v), jnp.where(better, ci, idx), ci + 1), None

  init = (jnp.full((g, c * big_g), -jnp.inf, theta.dtype),
          jnp.zeros((g, c * big_g), jnp.int32), jnp.int32(0))
  (v, idx, _), _ = jax.lax.scan(body, init, per_channel)
  to_ggc = lambda a: a.reshape(g, c, big_g).transpose(0, 2, 1)
  return to_ggc(v), to_ggc(idx)


@jax.custom_vjp
def streamed_channel_max(theta: jax.Array, phi: jax.Array) -> jax.Array:
  """Eq. 5 + 6 as one op: equal to `channel_max(frobenius_scores(theta, phi))`, (g, G).

  Streams over the first-order channels ci keeping a running max, so memory is O(g G c)
  instead of O(g G c^2); the backward pass routes the gradient through the argmax channel
  (the subgradient autodiff of `jnp.max` takes when the max is unique).
  """
  return jnp.sum(_running_channel_max(theta, phi)[0], axis=-1)


def _streamed_fwd(theta, phi):
  v, idx = _running_channel_max(theta, phi)
  return jnp.sum(v, axis=-1), (theta, phi, idx)


def _streamed_bwd(res, ct):
  theta, phi, idx = res                                          # idx: (g, G, cj)
  h, w, c, g = theta.shape
  big_g = phi.shape[-1]
  # d phi[k, cj, gj] = sum_gi ct[gi, gj] theta[k, idx[gi, gj, cj], gi]
  per_filter = theta.reshape(h * w, c, g).transpose(2, 1, 0)     # (gi, ci, hw)
  picked = jnp.take_along_axis(per_filter, idx.reshape(g, -1)[:, :, None], axis=1)
  d_phi = jnp.einsum('gGdk,gG->kdG', picked.reshape(g, big_g, c, h * w), ct)
  # d theta[k, ci, gi] = sum_{gj, cj: idx = ci} ct[gi, gj] phi[k, cj, gj]
  per_phi = phi.reshape(h * w, c, big_g).transpose(2, 1, 0)      # (gj, cj, hw)
  contrib = ct[:, :, None, None] * per_phi[None]                 # (gi, gj, cj, hw)
  d_theta = jnp.zeros((g, c, h * w), theta.dtype).at[
      jnp.arange(g)[:, None, None], idx].add(contrib)
  return (d_theta.transpose(2, 1, 0).reshape(theta.shape),
          d_phi.reshape(phi.shape))


streamed_channel_max.defvjp(_streamed_fwd, _streamed_bwd)


def align_layer(theta: jax.Array, phi: jax.Array, first_layer: bool,
                channel_align: bool = True, filter_align: bool = True,
                impl: str = 'auto') -> jax.Array:
  """Eq. 7 (first layer) or Eq. 5 + 6 (other layers), then Eq. 8; returns (g, G).

  `channel_align` / `filter_align` switch Eq. 6 / Eq. 8 off for the ablations (Fig. 3c) and the
  "without alignment" baseline. `impl` picks the Eq. 5 + 6 formulation (`channel_scores`).
  """
  s = (first_layer_scores(theta, phi) if first_layer
       else channel_scores(theta, phi, channel_align, impl))
  return sort_filters(s) if filter_align else s


def align_network(params, phis: Sequence[jax.Array], layers: Optional[Sequence] = None,
                  channel_align: bool = True, filter_align: bool = True) -> list[jax.Array]:
  """Aligned (g, G) scores of the selected 3x3 conv layers of a ResNet parameter tree.

  `layers` are names from `lps_jax.training.resnet.conv_layer_names` or indices into it (default: all
  19 for ResNet-20, network order); `phis` has one (h, w, c, G) array per selected layer.
  Layer 0 ('conv1') uses Eq. 7, the others Eq. 5 + 6; all then Eq. 8.
  """
  names = _conv_layer_names(params)
  selected = _select_layers(names, layers)
  if len(phis) != len(selected):
    raise UserError(f'got {len(phis)} phi arrays for {len(selected)} selected layers.')
  out = []
  for (i, name), phi in zip(selected, phis):
    node = params
    for part in name.split('/'):
      node = node[part]
    out.append(align_layer(node['kernel'], phi, first_layer=(i == 0),
                           channel_align=channel_align, filter_align=filter_align))
  return out


def _conv_layer_names(params) -> list[str]:
  """3x3 conv layers of a ResNet params tree in network order (conv1, stage*_block*/conv{1,2})."""
  if 'conv1' not in params:
    raise UserError('params has no "conv1": pass the params tree of lps_jax.training.resnet.ResNet.')
  names = ['conv1']
  blocks = sorted((k for k in params if k.startswith('stage')),
                  key=lambda k: tuple(int(x) for x in k[5:].split('_block')))
  for b in blocks:
    names += [f'{b}/conv1', f'{b}/conv2']
  return names


def _select_layers(names: list[str], layers) -> list[tuple[int, str]]:
  if layers is None:
    return list(enumerate(names))
  out = []
  for layer in layers:
    if isinstance(layer, str):
      if layer not in names:
        raise UserError(f'unknown layer {layer!r}; valid: {names}.')
      out.append((names.index(layer), layer))
    else:
      if not 0 <= int(layer) < len(names):
        raise UserError(f'layer index {layer} out of range [0, {len(names)}).')
      out.append((int(layer), names[int(layer)]))
  return out


def align_population(kernels, phi, first_layer: bool, models_per_chunk: int = 64,
                     channel_align: bool = True, filter_align: bool = True,
                     strategy: str = 'auto', impl: str = 'auto',
                     mesh: Optional[Mesh] = None) -> np.ndarray:
  """`align_layer` over a stack of kernels (M, h, w, c, g) -> (M, g, G), chunk by chunk.

  Runs through `popmap.Population` (the mechanism the first-order trainer uses): 'loop' = one
  jitted program per model, 'vmap' = one program per chunk, vmapped and split over `mesh`
  (chunks rounded up to a multiple of its size); 'auto' = the faster measured on the backend
  (`experiments.benchmark --suites=align`): loop on CPU for layers >= 2, vmap elsewhere. A
  chunk of `models_per_chunk` models bounds the memory: a 64-channel layer's (g, G, c, c)
  scores are ~105 MB per model at G = 100.
  """
  kernels = np.asarray(kernels)
  if kernels.ndim != 5:
    raise UserError(f'expected stacked kernels (M, h, w, c, g), got {kernels.shape}.')
  if strategy == 'auto':
    strategy = 'loop' if (jax.default_backend() == 'cpu' and not first_layer) else 'vmap'
  if strategy not in ('loop', 'vmap'):
    raise UserError(f"unknown strategy {strategy!r}; choose 'auto', 'vmap' or 'loop'.")
  pop = popmap.Population(strategy, mesh)
  fn = pop.map(functools.partial(_align_one, first_layer=first_layer,
                                 channel_align=channel_align, filter_align=filter_align,
                                 impl=impl), (0, None))
  shared_phi = pop.place(phi, shared=True) if strategy == 'loop' else jnp.asarray(phi)
  m = kernels.shape[0]
  size = pop.padded_size(min(models_per_chunk, m))
  outs = []
  for start in range(0, m, size):
    part = kernels[start:start + size]
    n = part.shape[0]
    if n < size and strategy != 'loop':  # Pad the last chunk: it reuses the compiled program.
      part = np.concatenate([part, np.repeat(part[-1:], size - n, axis=0)])
    outs.append(pop.gather(fn(pop.place(part), shared_phi))[:n])
  return np.concatenate(outs)


def _align_one(theta, phi, *, first_layer, channel_align, filter_align, impl):
  return align_layer(theta, phi, first_layer, channel_align, filter_align, impl)
