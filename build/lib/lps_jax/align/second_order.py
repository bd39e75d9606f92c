"""The hierarchical second-order network (Sec. 4, Fig. 2) and the terms of Eq. 9.

Library first: everything takes plain arrays, one stack of HWIO kernels per conv layer,
`kernels[l]` of shape (M, h, w, c, g), and task labels (M,). Loading a model set
(`lps_jax.training.modelset.load`) is one way to get them; a PyTorch checkpoint's OIHW kernels
transposed with (2, 3, 1, 0) is another.

Branch l holds second-order filters phi_l (h, w, c, G), aligns the layer's kernels (Eq. 5-8),
flattens, and projects with one Dense to the tasks. Branches with w_l = 0 are not built.
Training (SGD on Eq. 9) and the opt-in options that are not in the paper (weight decay, early
stopping, feature standardisation across models, learned branch weights) live in
`lps_jax.align.fit`.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lps_jax import align
from lps_jax.common.errors import UserError

# Feature extractors: the method and the paper's baselines (Sec. 5.1).
METHODS = {
    'lps': dict(raw=False, channel_align=True, filter_align=True),       # Frobenius+FC, w/ alignment
    'no_align': dict(raw=False, channel_align=True, filter_align=False),  # Frobenius+FC, w/o alignment
    'fc_only': dict(raw=True, channel_align=False, filter_align=False),   # only one FC layer
    # Fig. 3c ablations for layers >= 2.
    'filter_only': dict(raw=False, channel_align=False, filter_align=True),
    'channel_only': dict(raw=False, channel_align=True, filter_align=False),
    'none': dict(raw=False, channel_align=False, filter_align=False),
}


# How a branch standardises its aligned features before the FC (not in the paper; 'none' is).
#   model:  per model, over its own features (removes the common offset of deep layers);
#   across: per feature, with mean / std over the training models (the 'feature_stats'
#           collection, refreshed each epoch by second_order_fit).
FEATURE_NORMS = ('none', 'model', 'across')
STATS = 'feature_stats'


class Branch(nn.Module):
  """One branch: align a layer's kernel against learned phi, flatten, Dense to the tasks."""
  num_filters: int
  num_classes: int
  first_layer: bool
  raw: bool = False
  channel_align: bool = True
  filter_align: bool = True
  feature_norm: str = 'none'

  @nn.compact
  def __call__(self, theta, features_only: bool = False):
    if self.raw:
      feats = theta.reshape(-1)
    else:
      h, w, c, _ = theta.shape
      phi = self.param('phi', nn.initializers.normal(1.0 / np.sqrt(h * w * c)),
                       (h, w, c, self.num_filters))
      feats = align.align_layer(theta, phi, self.first_layer, self.channel_align,
                                self.filter_align).reshape(-1)
    if self.feature_norm == 'model':
      feats = (feats - jnp.mean(feats)) / (jnp.std(feats) + 1e-6)
    elif self.feature_norm == 'across':
      mean = self.variable(STATS, 'mean', jnp.zeros, feats.shape)
      std = self.variable(STATS, 'std', jnp.ones, feats.shape)
      if features_only:
        return feats
      feats = (feats - mean.value) / std.value
    elif self.feature_norm != 'none':
      raise UserError(f'unknown feature_norm {self.feature_norm!r}; choose from {FEATURE_NORMS}.')
    if features_only:
      return feats
    return nn.Dense(self.num_classes, name='fc')(feats)


class SecondOrderNet(nn.Module):
  """Branches for the layers with w_l > 0; returns their logits (one single model), or their
  aligned features before standardisation (`features_only`)."""
  layers: tuple[int, ...]   # Indices into the first-order conv layers (0 = first layer).
  num_filters: int
  num_classes: int
  method: str = 'lps'
  feature_norm: str = 'none'
  learned_weights: bool = False  # Not in the paper: w_l = softmax(a)_l with a learned.

  @nn.compact
  def __call__(self, kernels: Sequence[jax.Array], features_only: bool = False):
    opts = METHODS[self.method]
    out = [Branch(self.num_filters, self.num_classes, layer == 0, name=f'branch_{layer}',
                  feature_norm=self.feature_norm, **opts)(theta, features_only)
           for layer, theta in zip(self.layers, kernels)]
    if self.learned_weights:
      self.param('branch_logits', nn.initializers.zeros, (len(self.layers),))
    return out


def eq9_loss(logits: Sequence[jax.Array], label: jax.Array, weights: jax.Array) -> jax.Array:
  """Eq. 9: -log( (1/W) sum_l w_l softmax(z_l)[y] ), computed stably in log space."""
  logp = jnp.stack([jax.nn.log_softmax(z)[label] for z in logits])
  return -(jax.nn.logsumexp(logp, b=weights) - jnp.log(jnp.sum(weights)))


def mixture_probs(logits: Sequence[jax.Array], weights: jax.Array) -> jax.Array:
  """(1/W) sum_l w_l softmax(z_l): the task probabilities Eq. 9 scores."""
  probs = jnp.stack([jax.nn.softmax(z) for z in logits])
  return jnp.tensordot(weights, probs, axes=1) / jnp.sum(weights)


def embedding(logits: Sequence[jax.Array], weights: jax.Array) -> jax.Array:
  """Parameter representation: last-FC outputs (weighted, concatenated), L2-normalised."""
  z = jnp.concatenate([w * l for w, l in zip(weights, logits)])
  return z / jnp.maximum(jnp.linalg.norm(z), 1e-12)


