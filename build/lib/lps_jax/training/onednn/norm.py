"""oneDNN batch normalization (training mode) inside jit: XLA FFI custom calls tied by a custom VJP.

`batch_norm(x, scale, bias, relu=..)` normalises NHWC `x` with its batch statistics over N, H, W
(variance biased, as Flax's `BatchNorm`), scales and shifts, and applies a ReLU when asked; it
returns (y, mean, var), the statistics without gradient (they feed the running averages only).
Forward and backward are each one call into oneDNN (`norm.cc`); the fused ReLU's mask travels
from one to the other as oneDNN's workspace. Under `jax.vmap` the leading axes are looped over
inside one call (`vmap_method='broadcast_all'`). float32 only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lps_jax.common.errors import UserError
from lps_jax.training.onednn import library

FWD, BWD = library.TARGETS[3:5]


@functools.cache
def workspace_bytes(n: int, h: int, w: int, c: int, epsilon: float, relu: bool,
                    threads: int) -> int:
  """Bytes of oneDNN's workspace for one model's call of this shape (at least 1)."""
  got = library.load().lps_onednn_bn_workspace_bytes(n, h, w, c, epsilon, int(relu), threads)
  if got < 0:
    raise UserError(f'oneDNN has no batch normalization for NHWC {(n, h, w, c)} '
                    f'(relu={relu}): use --norm_impl=flax.')
  return max(int(got), 1)


def _check(x, scale, bias):
  if x.ndim != 4 or scale.shape != (x.shape[-1],) or bias.shape != scale.shape:
    raise UserError(f'batch_norm takes NHWC x with scale and bias of shape (C,), got '
                    f'{x.shape}, {scale.shape}, {bias.shape}.')
  if any(a.dtype != jnp.float32 for a in (x, scale, bias)):
    raise UserError('the oneDNN batch norm runs in float32: cast its operands first.')


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn(x, scale, bias, epsilon, relu, threads):
  return _bn_fwd(x, scale, bias, epsilon, relu, threads)[0]


def _bn_fwd(x, scale, bias, epsilon, relu, threads):
  c = x.shape[-1]
  f32 = jnp.float32
  outs = (jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct((c,), f32),
          jax.ShapeDtypeStruct((c,), f32),
          jax.ShapeDtypeStruct((workspace_bytes(*x.shape, epsilon, relu, threads),), jnp.uint8))
  y, mean, var, workspace = jax.ffi.ffi_call(FWD, outs, vmap_method='broadcast_all')(
      x, scale, bias, epsilon=np.float32(epsilon), relu=np.int64(relu), threads=np.int64(threads))
  return (y, mean, var), (x, scale, mean, var, workspace)


def _bn_bwd(epsilon, relu, threads, residuals, cotangents):
  x, scale, mean, var, workspace = residuals
  c = x.shape[-1]
  f32 = jnp.float32
  outs = (jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct((c,), f32),
          jax.ShapeDtypeStruct((c,), f32))
  # cotangents[1:] (of mean, var) are zero: batch_norm stops their gradient.
  return jax.ffi.ffi_call(BWD, outs, vmap_method='broadcast_all')(
      x, cotangents[0], scale, mean, var, workspace, epsilon=np.float32(epsilon),
      relu=np.int64(relu), threads=np.int64(threads))


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float = 1e-5,
               relu: bool = False, threads: int = 0):
  """(relu?(BN(x)), batch mean, batch variance) of NHWC float32 `x`; one oneDNN call each way."""
  _check(x, scale, bias)
  library.load()
  y, mean, var = _bn(x, scale, bias, float(epsilon), bool(relu), int(threads))
  return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
