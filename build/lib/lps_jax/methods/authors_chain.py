"""The authors' published meta-model: Gram matrices of chained kernels + one FC layer.

What `Wanggcong/SolutionSimilarityLearning` runs (commit 26279b6), not the paper's max + sort:
`scripts/train_sup.sh` line 4 trains `python train_sup.py --meta-model cifar_chain
--selected-layers 1 --epochs 10 --batch-size 1 --step1 6`, i.e. `sup_cifar_chain` of
`models/meta_model_cnn.py` (lines 74-110):

  X_1 = the first layer's filters, (c_1, c_in * 3 * 3) (rows = filters, PyTorch's OIHW order);
  X_k = layer k's filters with the chain so far multiplied in (lines 94-98):
        X_k[o, (p, t)] = sum_i X_{k-1}[i, p] W_k[o, i, t]   (t: layer k's 3x3 taps),
        so X_k is (c_k, 27 * 9^(k-1)) and the hidden channel order cancels;
  feature_k = the Gram X_k^T X_k, flattened (line 99: invariant to the order of the rows);
  output = sum over the selected depths of FC_k(feature_k) (lines 100-110).

Training (`train_sup.py` lines 105-124, `options/meta_options.py`): cross-entropy, SGD lr 1e-3,
momentum 0.9, no weight decay (the parsed --wd never reaches the optimizer), batch 1 (a
shuffled epoch), 10 epochs, lr / 10 from epoch 7 (MultiStepLR, milestone 6, stepped per epoch);
PyTorch's default Linear init (uniform in +-1/sqrt(fan_in), weights and bias). Retrieval reads the
L2-normalised FC outputs (`utils/train_test.py`, `test_retr`).

ResNet-20 on its chain: the script's `plain_net5` is conv-conv-conv-... with one channel order
per layer; on ResNet-20, layers 1, 2, 3 (`conv1`, `layer1.0.conv_a`, `layer1.0.conv_b`) form the
same chain: conv_a reads conv1's channels (the residual stream), conv_b reads conv_a's, and
conv_b's own output order is removed by the Gram. So depths 1-3 are exactly invariant to
`resnet.permutation_spec` as well. Kernels here are HWIO stacks (M, h, w, c_in, c_out).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lps_jax.common.errors import Diverged, UserError

LR, MOMENTUM, EPOCHS, MILESTONE = 1e-3, 0.9, 10, 6


def chained(kernels: Sequence[np.ndarray], depth: int) -> list[np.ndarray]:
  """[X_1, ..., X_depth], each (M, c_k, 27 * 9^(k-1)) in the authors' column order."""
  if len(kernels) < depth or any(k is None for k in kernels[:depth]):
    raise UserError(f'the chained Gram of depth {depth} reads conv layers 1-{depth}; '
                    f'{len(kernels)} given.')
  first = np.asarray(kernels[0], np.float32)            # (M, h, w, c_in, c_out)
  m = first.shape[0]
  x = np.moveaxis(first, -1, 1).transpose(0, 1, 4, 2, 3).reshape(m, first.shape[-1], -1)
  out = [x]
  for k in kernels[1:depth]:
    k = np.asarray(k, np.float32)                       # (M, 3, 3, c_prev, c_out)
    if k.shape[3] != x.shape[1]:
      raise UserError(f'layer {len(out) + 1} reads {k.shape[3]} channels, the chain has '
                      f'{x.shape[1]}: not a plain chain of convs.')
    w = k.reshape(m, -1, k.shape[3], k.shape[4])          # (M, taps, c_prev, c_out)
    x = np.einsum('mip,mtio->mopt', x, w).reshape(m, k.shape[4], -1)
    out.append(x)
  return out


def chain_grams(kernels: Sequence[np.ndarray], depths: Sequence[int]) -> list[np.ndarray]:
  """Per selected depth, the flattened Gram X_k^T X_k, (M, (27 * 9^(k-1))^2)."""
  xs = chained(kernels, max(depths))
  return [np.einsum('mop,moq->mpq', xs[d - 1], xs[d - 1]).reshape(len(xs[0]), -1)
          for d in depths]


class ChainGramFC:
  """The published meta-model as an `Estimator`: fixed chained Grams, one FC per depth (summed),
  trained with the script's recipe. `split_seed` seeds the init and the shuffling."""

  def __init__(self, depths: Sequence[int], num_classes: int, split_seed: int = 0,
               epochs: int = EPOCHS):
    self.depths, self.num_classes = tuple(depths), num_classes
    self.seed, self.epochs = split_seed, epochs
    self.params = None

  def _features(self, kernels) -> list[jnp.ndarray]:
    return [jnp.asarray(f) for f in chain_grams(kernels, self.depths)]

  @staticmethod
  def _logits(params, feats):
    return sum(f @ p['w'] + p['b'] for p, f in zip(params, feats))

  def fit(self, kernels, labels, progress: Optional[Callable] = None) -> None:
    feats, labels = self._features(kernels), jnp.asarray(labels, jnp.int32)
    key = jax.random.PRNGKey(self.seed)
    params = []
    for f in feats:
      key, kw, kb = jax.random.split(key, 3)
      bound = 1.0 / np.sqrt(f.shape[1])
      params.append({'w': jax.random.uniform(kw, (f.shape[1], self.num_classes), jnp.float32,
                                             -bound, bound),
                     'b': jax.random.uniform(kb, (self.num_classes,), jnp.float32,
                                             -bound, bound)})

    def loss(p, xs, y):
      return -jax.nn.log_softmax(self._logits(p, xs))[y]

    @jax.jit
    def epoch(params, velocity, feats, labels, order, lr):
      def step(carry, i):
        p, v = carry
        value, g = jax.value_and_grad(loss)(p, [f[i] for f in feats], labels[i])
        v = jax.tree_util.tree_map(lambda v, g: MOMENTUM * v + g, v, g)   # torch's SGD
        p = jax.tree_util.tree_map(lambda p, v: p - lr * v, p, v)
        return (p, v), value
      (params, velocity), losses = jax.lax.scan(step, (params, velocity), order)
      return params, velocity, losses.mean()

    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
    for e in range(self.epochs):
      key, k = jax.random.split(key)
      lr = LR if e < MILESTONE else LR / 10
      params, velocity, mean_loss = epoch(params, velocity, feats, labels,
                                          jax.random.permutation(k, labels.shape[0]),
                                          jnp.float32(lr))
      if not np.isfinite(float(mean_loss)):
        raise Diverged(f'authors_chain: loss is {float(mean_loss)} at epoch {e + 1}.')
      if progress is not None:
        progress(1, float(mean_loss))
    self.params = params

  def _z(self, kernels) -> np.ndarray:
    if self.params is None:
      raise UserError('authors_chain: predict before fit.')
    return np.asarray(self._logits(self.params, self._features(kernels)))

  def predict(self, kernels) -> np.ndarray:
    return np.asarray(jax.nn.softmax(self._z(kernels), axis=-1))

  def embed(self, kernels) -> np.ndarray:
    z = self._z(kernels)
    return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-12)
