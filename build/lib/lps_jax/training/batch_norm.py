"""ResNet-20's batch normalization with what follows it (ReLU, the residual add), in one of two
implementations that hold the same variables (`params/{scale,bias}`, `batch_stats/{mean,var}`):

  flax    Flax's `nn.BatchNorm`, then the add and ReLU as jnp ops: what trained every model
          before the oneDNN batch norm existed, and what replays them bit for bit;
  onednn  in training, one oneDNN call each way (`lps_jax.training.onednn.norm`; the ReLU fused
          into it, the residual add + ReLU of a block's end left to XLA, since this oneDNN has
          no CPU `fuse_norm_add_relu`); in evaluation, Flax's formula with the running averages.

Both use momentum 0.9 and epsilon 1e-5 and the biased batch variance, as the paper's recipe.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lps_jax.common.errors import UserError
from lps_jax.training.onednn import norm as onednn_norm   # built and loaded only when used

NORM_IMPLS = ('flax', 'onednn')
MOMENTUM = 0.9
EPSILON = 1e-5


class OneDNNBatchNorm(nn.Module):
  """Batch norm (+ ReLU) through oneDNN in training; Flax's variables, initialisers and
  evaluation formula (`flax.linen.normalization._normalize`), so evaluation equals Flax's."""
  threads: int = 0

  @nn.compact
  def __call__(self, x, train: bool, relu: bool):
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    if not train or self.is_initializing():
      y = (x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + EPSILON) * scale) + bias
      return nn.relu(y) if relu else y
    y, mean, var = onednn_norm.batch_norm(x, scale, bias, epsilon=EPSILON, relu=relu,
                                          threads=self.threads)
    ra_mean.value = MOMENTUM * ra_mean.value + (1 - MOMENTUM) * mean
    ra_var.value = MOMENTUM * ra_var.value + (1 - MOMENTUM) * var
    return y


def norm(x: jax.Array, train: bool, name: str, impl: str = 'flax', threads: int = 0,
         relu: bool = False, residual: Optional[jax.Array] = None) -> jax.Array:
  """relu?(BN(x) [+ residual]) as the submodule `name` of the calling Flax module (call it
  inside a compact method). With `residual`, the ReLU is always applied after the add."""
  if impl == 'flax':
    y = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON,
                     name=name)(x)
  elif impl == 'onednn':
    y = OneDNNBatchNorm(threads, name=name)(x, train, relu and residual is None)
    if residual is None:
      return y
  else:
    raise UserError(f'unknown norm impl {impl!r}; choose from {NORM_IMPLS}.')
  if residual is not None:
    return nn.relu(residual + y)
  return nn.relu(y) if relu else y
