"""ResNet-20 for CIFAR (He et al. 2016), the paper's first-order network (Sec. 5).

3x3 conv (16) -> three stages of basic blocks (16/32/64 channels) with BatchNorm, a 1x1 conv +
BN shortcut where the shape changes, global average pooling, dense. Parameter names are stable:

  conv1/kernel, bn1/{scale,bias}
  stage{s}_block{b}/conv1/kernel, .../bn1, .../conv2/kernel, .../bn2,
  stage{s}_block{b}/shortcut_conv/kernel, .../shortcut_bn   (only where the shape changes)
  dense/{kernel,bias}

Kernels are HWIO: (h, w, in_channels, filters). `conv_layer_names` lists the 3x3 kernels that
LPS aligns (19 for ResNet-20: conv1 + 18 block convs, no shortcuts, no dense) in network order.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lps_jax.common import checks as config_checks
from lps_jax.common.checks import Range, valid
from lps_jax.common.errors import UserError
from lps_jax.symmetry import permutations
from lps_jax.training import batch_norm
from lps_jax.training.onednn import conv as onednn_conv   # built and loaded only when used
from lps_jax.training.onednn.conv import same_padding

# lax: XLA's conv; im2col: patches @ kernel; lax_bf16: bfloat16 inputs, float32 accumulation;
# onednn / onednn_bf16: the same conv as oneDNN custom calls (lps_jax.training.onednn, optional extra).
_POSITIVE = Range(1, integer=True, nonempty=True)
CONV_IMPLS = ('lax', 'im2col', 'lax_bf16', 'onednn', 'onednn_bf16')
PADDINGS = ('same', 'symmetric')   # Conv.padding: Flax's 'SAME', or PyTorch's k // 2 each side


def tuples_from_json(d: dict) -> dict:
  """JSON lists back to the tuples a frozen config dataclass holds."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Architecture. Defaults are ResNet-20: 3 stages x 3 blocks, widths 16/32/64."""
  blocks_per_stage: Tuple[int, ...] = dataclasses.field(
      default=(3, 3, 3), metadata=valid(_POSITIVE, 'Basic blocks per stage (ResNet-20: 3,3,3).'))
  widths: Tuple[int, ...] = dataclasses.field(
      default=(16, 32, 64), metadata=valid(_POSITIVE, 'Channels per stage (ResNet-20: 16,32,64).'))
  num_classes: int = dataclasses.field(default=2, metadata={'help': 'Output classes.'})

  @staticmethod
  def from_dict(d: dict) -> 'ResNetConfig':
    """Inverse of dataclasses.asdict (JSON lists back to tuples)."""
    return ResNetConfig(**tuples_from_json(d))

  def __post_init__(self):
    config_checks.check(self)
    if self.num_classes < 2:
      raise UserError(f'num_classes must be >= 2, got {self.num_classes}.')
    if len(self.blocks_per_stage) != len(self.widths) or not self.widths:
      raise UserError(f'blocks_per_stage {self.blocks_per_stage} and widths {self.widths} '
                       'must be non-empty and of equal length.')


def conv_layer_names(config: ResNetConfig = ResNetConfig()) -> list[str]:
  """The 3x3 conv layers in network order, as '/'-joined parameter paths (19 for ResNet-20)."""
  names = ['conv1']
  for s, n_blocks in enumerate(config.blocks_per_stage, start=1):
    for b in range(1, n_blocks + 1):
      names += [f'stage{s}_block{b}/conv1', f'stage{s}_block{b}/conv2']
  return names


def get_kernel(params, name: str) -> jax.Array:
  """Returns the kernel of conv layer `name` (e.g. 'stage2_block1/conv2') from a params tree.

  Works on stacked populations too (leading model axes are kept).
  """
  node = params
  for part in name.split('/'):
    if not hasattr(node, 'keys') or part not in node:
      raise KeyError(f'unknown conv layer {name!r}; valid names come from '
                     'lps_jax.training.resnet.conv_layer_names(config).')
    node = node[part]
  return node['kernel']


def conv_kernels(params, config: ResNetConfig = ResNetConfig()) -> list[jax.Array]:
  """The 3x3 conv kernels (HWIO, optionally with leading model axes) in network order."""
  return [get_kernel(params, n) for n in conv_layer_names(config)]


def _im2col_conv(x, kernel, stride: int):
  """'SAME'-padded conv as patches @ kernel: under vmap it is a batched matmul, not a grouped conv."""
  kh, kw, cin, cout = kernel.shape
  ho, wo = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  xp = jnp.pad(x, ((0, 0), same_padding(x.shape[1], kh, stride),
                   same_padding(x.shape[2], kw, stride), (0, 0)))
  cols = [xp[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
  return jnp.einsum('nhwk,ko->nhwo', patches, kernel.reshape(kh * kw * cin, cout))


class Conv(nn.Module):
  """Bias-free conv with an HWIO `kernel`: `lax` conv, im2col + matmul (same result),
  `lax_bf16` (inputs and kernel rounded to bfloat16, float32 accumulation and output), or
  `onednn` / `onednn_bf16` (the same in oneDNN, `threads` OpenMP threads per call).
  `padding`: 'same' (Flax's, what this project trains with: a stride-2 3x3 conv on 32x32 pads
  (0, 1)) or 'symmetric' (PyTorch's ResNets: k // 2 on each side), to run a mapped PyTorch
  checkpoint as the function it is (`lax` / `im2col` only)."""
  features: int
  kernel_size: int
  strides: int = 1
  impl: str = 'lax'
  threads: int = 0
  padding: str = 'same'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    if self.padding not in PADDINGS:
      raise UserError(f'unknown conv padding {self.padding!r}; choose from {PADDINGS}.')
    if self.padding == 'symmetric':
      if self.impl not in ('lax', 'im2col'):
        raise UserError(f"padding 'symmetric' runs with conv impl lax or im2col, not "
                        f'{self.impl!r}.')
      k = self.kernel_size // 2
      return jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides),
                                          [(k, k), (k, k)],
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.impl == 'im2col':
      return _im2col_conv(x, kernel, self.strides)
    if self.impl in ('onednn', 'onednn_bf16'):
      return onednn_conv.conv(x, kernel, self.strides, self.threads, self.impl == 'onednn_bf16')
    if self.impl not in ('lax', 'lax_bf16'):
      raise UserError(f'unknown conv impl {self.impl!r}; choose from {CONV_IMPLS}.')
    if self.impl == 'lax_bf16':
      x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    return jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), preferred_element_type=jnp.float32 if self.impl == 'lax_bf16' else None)


class BasicBlock(nn.Module):
  features: int
  strides: int
  conv_impl: str = 'lax'
  conv_threads: int = 0
  norm_impl: str = 'flax'
  conv_padding: str = 'same'

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(batch_norm.norm, train=train, impl=self.norm_impl,
                             threads=self.conv_threads)
    conv = functools.partial(Conv, impl=self.conv_impl, threads=self.conv_threads,
                             padding=self.conv_padding)
    y = conv(self.features, 3, self.strides, name='conv1')(x)
    y = norm(y, name='bn1', relu=True)
    y = conv(self.features, 3, 1, name='conv2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, name='shortcut_conv')(x)
      x = norm(x, name='shortcut_bn')
    return norm(y, name='bn2', residual=x)


class ResNet(nn.Module):
  """CIFAR ResNet; `features=True` returns the pooled features instead of the logits."""
  config: ResNetConfig = ResNetConfig()
  conv_impl: str = 'lax'
  conv_threads: int = 0   # OpenMP threads per oneDNN call (0 = OpenMP's default)
  norm_impl: str = 'flax'   # batch_norm.NORM_IMPLS
  conv_padding: str = 'same'   # PADDINGS ('symmetric': a mapped PyTorch checkpoint's function)

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    cfg = self.config
    x = Conv(cfg.widths[0], 3, 1, self.conv_impl, self.conv_threads, self.conv_padding,
             name='conv1')(x)
    x = batch_norm.norm(x, train, 'bn1', self.norm_impl, self.conv_threads, relu=True)
    for s, (n_blocks, width) in enumerate(zip(cfg.blocks_per_stage, cfg.widths), start=1):
      for b in range(1, n_blocks + 1):
        strides = 2 if (s > 1 and b == 1) else 1
        x = BasicBlock(width, strides, self.conv_impl, self.conv_threads, self.norm_impl,
                       self.conv_padding, name=f'stage{s}_block{b}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    if features:
      return x
    return nn.Dense(cfg.num_classes, name='dense')(x)


def init_variables(key: jax.Array, config: ResNetConfig = ResNetConfig()) -> dict[str, Any]:
  """Initial {'params', 'batch_stats'} of one model."""
  return ResNet(config).init(key, jnp.zeros((1, 32, 32, 3), jnp.float32), train=False)


def param_count(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def permutation_spec(config: ResNetConfig = ResNetConfig()) -> permutations.PermutationSpec:
  """ResNet's channel symmetry, written once (`lps_jax.symmetry.permutations`): each conv's output
  channels with its BatchNorm (params and running statistics) and the next convs' input
  channels. Convs whose outputs meet at a residual sum (the stem, each block's conv2 and
  shortcut within a stage) share one group, `stream{s}` (stage s; `stream0` from the stem until
  a shortcut starts the next); each block's inner channels have their own, `{block}/inner`.
  Paths are those of `permutations.flatten({'params': ..., 'batch_stats': ...})`."""
  axes: dict[str, tuple] = {}

  def conv(path, p_in, p_out):
    axes[f'params/{path}/kernel'] = (None, None, p_in, p_out)

  def norm(path, p):
    axes[f'params/{path}/scale'] = axes[f'params/{path}/bias'] = (p,)
    axes[f'batch_stats/{path}/mean'] = axes[f'batch_stats/{path}/var'] = (p,)

  stream, width_in = 'stream0', config.widths[0]
  conv('conv1', None, stream)
  norm('bn1', stream)
  for s, (n_blocks, width) in enumerate(zip(config.blocks_per_stage, config.widths), start=1):
    for b in range(1, n_blocks + 1):
      name, inner = f'stage{s}_block{b}', f'stage{s}_block{b}/inner'
      shortcut = (s > 1 and b == 1) or width_in != width     # as BasicBlock builds it
      out = f'stream{s}' if shortcut else stream
      conv(f'{name}/conv1', stream, inner)
      norm(f'{name}/bn1', inner)
      conv(f'{name}/conv2', inner, out)
      norm(f'{name}/bn2', out)
      if shortcut:
        conv(f'{name}/shortcut_conv', stream, out)
        norm(f'{name}/shortcut_bn', out)
      stream, width_in = out, width
  axes['params/dense/kernel'] = (stream, None)
  return permutations.PermutationSpec.from_axes(axes)


def random_permutation(variables: dict, key: jax.Array,
                       config: ResNetConfig = ResNetConfig()) -> dict:
  """One model's variables with every channel group of `permutation_spec` randomly permuted:
  the same function (Sec. 4: the order of filters and channels is changeable)."""
  spec = permutation_spec(config)
  flat = permutations.flatten(variables)
  seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
  perms = permutations.random_perms(spec, flat, np.random.default_rng(seed))
  return permutations.unflatten(permutations.apply(spec, perms, flat))
