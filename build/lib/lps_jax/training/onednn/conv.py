"""oneDNN 2-D convolutions inside jit: XLA FFI custom calls tied together by a custom VJP.

`conv(x, kernel, stride, threads, bf16)` computes the same 'SAME'-padded convolution as
`lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME', ('NHWC', 'HWIO', 'NHWC'))`;
forward, gradient w.r.t. the input and w.r.t. the kernel are each one call into oneDNN (the
library PyTorch's CPU convolutions use). `threads` is the OpenMP team of each call (0 = OpenMP's
default); `bf16` rounds the inputs (and the incoming gradient) to bfloat16, with float32
accumulation and outputs. Under `jax.vmap` (a population with per-model kernels) the leading
axes are looped over inside one call with one primitive (`vmap_method='broadcast_all'`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lps_jax.common.errors import UserError
from lps_jax.training.onednn import library

FWD, BWD_DATA, BWD_WEIGHTS = library.TARGETS[:3]


def same_padding(size: int, k: int, stride: int) -> tuple[int, int]:
  """XLA's 'SAME' padding of one spatial axis: the odd row / column goes to the high side."""
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  return total // 2, total - total // 2


def _call(target: str, a, b, out_shape, stride: int, pads, threads: int):
  (pt, pb), (pl, pr) = pads
  i64 = np.int64
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method='broadcast_all')(
      a, b, stride=i64(stride), pad_top=i64(pt), pad_bottom=i64(pb), pad_left=i64(pl),
      pad_right=i64(pr), threads=i64(threads))


def _geometry(x_shape, k_shape, stride: int):
  n, h, w, c = x_shape
  kh, kw, kc, o = k_shape
  if kc != c:
    raise UserError(f'conv input has {c} channels but the kernel expects {kc}.')
  pads = (same_padding(h, kh, stride), same_padding(w, kw, stride))
  return pads, (n, -(-h // stride), -(-w // stride), o)


def _inputs(bf16: bool, *arrays):
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  return tuple(a.astype(dtype) for a in arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: jax.Array, kernel: jax.Array, stride: int = 1, threads: int = 0,
         bf16: bool = False) -> jax.Array:
  """'SAME' conv of NHWC `x` with an HWIO `kernel` in oneDNN (float32 output)."""
  return _conv_fwd(x, kernel, stride, threads, bf16)[0]


def _conv_fwd(x, kernel, stride, threads, bf16):
  if x.ndim != 4 or kernel.ndim != 4:
    raise UserError(f'conv takes NHWC x and HWIO kernel, got shapes {x.shape}, {kernel.shape}.')
  library.load()
  pads, y_shape = _geometry(x.shape, kernel.shape, stride)
  x, kernel = _inputs(bf16, x, kernel)
  return _call(FWD, x, kernel, y_shape, stride, pads, threads), (x, kernel)


def _conv_bwd(stride, threads, bf16, residuals, dy):
  x, kernel = residuals
  pads, _ = _geometry(x.shape, kernel.shape, stride)
  (dy,) = _inputs(bf16, dy)
  dx = _call(BWD_DATA, dy, kernel, x.shape, stride, pads, threads)
  dw = _call(BWD_WEIGHTS, x, dy, kernel.shape, stride, pads, threads)
  return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)
