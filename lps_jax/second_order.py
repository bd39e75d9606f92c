"""The hierarchical second-order network (Sec. 4, Fig. 2) and its training (Eq. 9).

Library first: everything takes plain arrays, one stack of HWIO kernels per conv layer,
`kernels[l]` of shape (M, h, w, c, g), and task labels (M,). Loading a model set
(`lps_jax.modelset.load`) is one way to get them; a PyTorch checkpoint's OIHW kernels
transposed with (2, 3, 1, 0) is another.

Branch l holds second-order filters phi_l (h, w, c, G), aligns the layer's kernels (Eq. 5-8),
flattens, and projects with one Dense to the tasks. Branches with w_l = 0 are not built.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lps_jax import align, popmap

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


class Branch(nn.Module):
  """One branch: align a layer's kernel against learned phi, flatten, Dense to the tasks."""
  num_filters: int
  num_classes: int
  first_layer: bool
  raw: bool = False
  channel_align: bool = True
  filter_align: bool = True
  feature_norm: bool = False

  @nn.compact
  def __call__(self, theta):
    if self.raw:
      feats = theta.reshape(-1)
    else:
      h, w, c, _ = theta.shape
      phi = self.param('phi', nn.initializers.normal(1.0 / np.sqrt(h * w * c)),
                       (h, w, c, self.num_filters))
      feats = align.align_layer(theta, phi, self.first_layer, self.channel_align,
                                self.filter_align).reshape(-1)
    if self.feature_norm:  # Per model: remove the common offset, unit scale (not in the paper).
      feats = (feats - jnp.mean(feats)) / (jnp.std(feats) + 1e-6)
    return nn.Dense(self.num_classes, name='fc')(feats)


class SecondOrderNet(nn.Module):
  """Branches for the layers with w_l > 0; returns their logits (one single model)."""
  layers: tuple[int, ...]   # Indices into the first-order conv layers (0 = first layer).
  num_filters: int
  num_classes: int
  method: str = 'lps'
  feature_norm: bool = False

  @nn.compact
  def __call__(self, kernels: Sequence[jax.Array]) -> list[jax.Array]:
    opts = METHODS[self.method]
    return [Branch(self.num_filters, self.num_classes, layer == 0, name=f'branch_{layer}',
                   feature_norm=self.feature_norm, **opts)(theta)
            for layer, theta in zip(self.layers, kernels)]


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


@dataclasses.dataclass(frozen=True)
class SecondOrderConfig:
  """Training recipe; defaults are the paper's (Sec. 5)."""
  method: str = 'lps'
  layer_weights: tuple[float, ...] = (1.0,)   # w_l per first-order conv layer (w_1 = 1, rest 0).
  num_filters: int = 100                       # G
  epochs: int = 100
  batch_size: int = 1
  learning_rate: float = 1e-3
  lr_boundaries: tuple[int, ...] = (40, 80)
  momentum: float = 0.9
  seed: int = 0
  # Not in the paper: standardise each branch's aligned features per model before the FC.
  # Deep layers' Eq. 6 features share a large offset (max statistics concentrate) and vary
  # ~1 % across models, which the FC cannot use at lr 1e-3 (RESULTS.md, Fig. 3b).
  feature_norm: bool = False

  def active_layers(self) -> tuple[int, ...]:
    return tuple(i for i, w in enumerate(self.layer_weights) if w > 0)


def _check_inputs(kernels: Sequence[np.ndarray], labels: np.ndarray, layers: Sequence[int]):
  if len(kernels) <= max(layers):
    raise ValueError(f'layer_weights select layer {max(layers)} but only {len(kernels)} kernel '
                     'stacks were given.')
  m = labels.shape[0]
  for i in layers:
    k = kernels[i]
    if k.ndim != 5 or k.shape[0] != m:
      raise ValueError(f'kernels[{i}] must be (M={m}, h, w, c, g) in HWIO, got {k.shape}.')
    if not np.all(np.isfinite(k)):
      raise ValueError(f'kernels[{i}] contains NaN/Inf weights; drop or retrain those models.')


class SecondOrderModel:
  """A trained second-order network: predicts tasks and embeds models."""

  def __init__(self, config: SecondOrderConfig, num_classes: int, params=None):
    self.config = config
    self.layers = config.active_layers()
    if not self.layers:
      raise ValueError('at least one layer weight must be > 0.')
    self.weights = jnp.asarray([config.layer_weights[i] for i in self.layers], jnp.float32)
    self.net = SecondOrderNet(self.layers, config.num_filters, num_classes, config.method,
                              config.feature_norm)
    self.num_classes = num_classes
    self.params = params
    self._mapped = {}

  def _select(self, kernels):
    return [jnp.asarray(kernels[i], jnp.float32) for i in self.layers]

  def _select_host(self, kernels):
    return [kernels[i] for i in self.layers]

  def init(self, kernels) -> None:
    example = [k[0] for k in self._select(kernels)]
    self.params = self.net.init(jax.random.PRNGKey(self.config.seed), example)['params']

  def _map(self, head):
    """`head(branch logits)` of every model, mapped over the stack by `popmap` (one program)."""
    if head not in self._mapped:
      pop = popmap.Population('vmap')
      fn = pop.map(lambda ks, params: head(self.net.apply({'params': params}, ks), self.weights),
                   (0, None))
      self._mapped[head] = lambda ks: pop.gather(fn(pop.place(ks), self.params))
    return self._mapped[head]

  def predict(self, kernels) -> np.ndarray:
    """Task probabilities (M, num_classes) of Eq. 9's mixture."""
    return self._map(mixture_probs)([np.asarray(k, np.float32) for k in
                                     self._select_host(kernels)])

  def embed(self, kernels) -> np.ndarray:
    """L2-normalised parameter representations (M, D); cosine = dot product."""
    return self._map(embedding)([np.asarray(k, np.float32) for k in self._select_host(kernels)])

  def fit(self, kernels, labels, progress=None) -> list[float]:
    """Trains with SGD + momentum, step lr schedule, Eq. 9; returns the mean loss per epoch.

    `progress(epoch, loss)` is called after each epoch. An epoch is one jitted `lax.scan`
    over its shuffled batches (no per-step host round trips).
    """
    labels = np.asarray(labels, np.int32)
    _check_inputs(kernels, labels, self.layers)
    if labels.min() < 0 or labels.max() >= self.num_classes:
      raise ValueError(f'labels must be in [0, {self.num_classes}).')
    cfg = self.config
    ks = self._select(kernels)
    if self.params is None:
      self.init(kernels)
    m = labels.shape[0]
    bs = min(cfg.batch_size, m)
    steps = m // bs
    schedule = optax.piecewise_constant_schedule(
        cfg.learning_rate, {b * steps: 0.1 for b in cfg.lr_boundaries})
    tx = optax.sgd(schedule, momentum=cfg.momentum)
    opt_state = tx.init(self.params)
    y = jnp.asarray(labels)

    def loss_fn(params, batch_k, batch_y):
      logits = jax.vmap(lambda kk: self.net.apply({'params': params}, kk))(batch_k)
      return jnp.mean(jax.vmap(lambda yy, *z: eq9_loss(z, yy, self.weights))(batch_y, *logits))

    @jax.jit
    def run_epoch(params, opt_state, key):
      perm = jax.random.permutation(key, m)[:steps * bs].reshape(steps, bs)

      def body(carry, idx):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, [k[idx] for k in ks], y[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

      (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), perm)
      return params, opt_state, jnp.mean(losses)

    history = []
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    params = self.params
    for epoch in range(cfg.epochs):
      params, opt_state, loss = run_epoch(params, opt_state, jax.random.fold_in(key, epoch))
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f'second-order loss became {loss} at epoch {epoch + 1}; '
                                 'lower --learning_rate.')
      history.append(loss)
      if progress is not None:
        progress(epoch + 1, loss)
    self.params = params
    return history
