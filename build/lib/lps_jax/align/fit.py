"""Training the second-order network with Eq. 9, and the trained model (predict / embed).

Defaults are the paper's recipe (Sec. 5): SGD momentum 0.9, batch 1, lr 1e-3 /10 after epochs
40 and 80, 100 epochs, G = 100, w_1 = 1. Options that are not in the paper are opt-in and say
so in their help: weight decay, early stopping on validation models carved from the training
models, feature standardisation (per model, or per feature across models), learned branch
weights (all-branch fusion). RESULTS.md reports which of them generalise better.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lps_jax.align.second_order import (FEATURE_NORMS, METHODS, STATS, SecondOrderNet, embedding,
                                        eq9_loss, mixture_probs)
from lps_jax.common import checks as config_checks
from lps_jax.common.checks import Range, valid
from lps_jax.common.errors import UserError, Diverged
from lps_jax.training import popmap


INT0, INT1 = Range(0, integer=True), Range(1, integer=True)


def _help(text: str, **extra) -> dict:
  return {'help': text, **extra}


@dataclasses.dataclass(frozen=True)
class SecondOrderConfig:
  """Second-order training recipe; defaults are the paper's (Sec. 5)."""
  method: str = dataclasses.field(
      default='lps', metadata=_help('Feature extractor of every branch.', choices=tuple(METHODS)))
  layer_weights: tuple[float, ...] = dataclasses.field(
      default=(1.0,), metadata=valid(Range(0, nonempty=True), 'w_l per conv layer (Eq. 9); '
                                     'missing = 0. The paper: w_1 = 1, the rest 0.'))
  num_filters: int = dataclasses.field(default=100, metadata=valid(INT1,
                                                                   'Second-order filters G.'))
  epochs: int = dataclasses.field(default=100, metadata=valid(INT1, 'Training epochs.'))
  batch_size: int = dataclasses.field(default=1, metadata=valid(INT1, 'Models per step.'))
  learning_rate: float = dataclasses.field(default=1e-3, metadata=valid(
      Range(0, open=True), 'Initial learning rate.'))
  lr_boundaries: tuple[int, ...] = dataclasses.field(
      default=(40, 80), metadata=valid(INT1, 'Epochs after which the learning rate is divided '
                                             'by 10.'))
  momentum: float = dataclasses.field(default=0.9, metadata=valid(Range(0, 1), 'SGD momentum.'))
  seed: int = dataclasses.field(
      default=0, metadata=valid(INT0, 'Seed of phi\'s init and the shuffling (folded with the '
                                'split seed, so every split draws its own).'))
  split_seed: int = dataclasses.field(
      default=0, metadata=valid(INT0, 'The model / task split this network trains on (set per '
                                'split by the protocols).'))
  weight_decay: float = dataclasses.field(
      default=0.0, metadata=valid(Range(0), 'Not in the paper: L2 weight decay on phi and the FC '
                                  '(coupled, as torch.optim.SGD).'))
  val_per_task: int = dataclasses.field(
      default=0, metadata=valid(INT0, 'Not in the paper: early stopping. Hold out this many training '
                                'models per task as validation and keep the epoch with the best '
                                'validation accuracy (then lowest validation loss).'))
  feature_norm: str = dataclasses.field(
      default='none', metadata=_help(
          "Not in the paper: standardise each branch's aligned features, per model ('model') "
          "or per feature across the training models ('across').", choices=FEATURE_NORMS))
  learned_weights: bool = dataclasses.field(
      default=False, metadata=_help('Not in the paper: learn the branch weights w_l = '
                                    'softmax(a)_l (fusion of the active branches).'))

  def __post_init__(self):
    config_checks.check(self)

  def active_layers(self) -> tuple[int, ...]:
    return tuple(i for i, w in enumerate(self.layer_weights) if w > 0)


def _check_inputs(kernels: Sequence[np.ndarray], labels: np.ndarray, layers: Sequence[int]):
  if len(kernels) <= max(layers):
    raise UserError(f'layer_weights select layer {max(layers)} but only {len(kernels)} kernel '
                     'stacks were given.')
  m = labels.shape[0]
  for i in layers:
    k = kernels[i]
    if k is None or k.ndim != 5 or k.shape[0] != m:
      raise UserError(f'kernels[{i}] must be (M={m}, h, w, c, g) in HWIO, got '
                       f'{None if k is None else k.shape}.')
    if not np.all(np.isfinite(k)):
      raise UserError(f'kernels[{i}] contains NaN/Inf weights; drop or retrain those models.')


def validation_rows(labels: np.ndarray, per_task: int, seed: int) -> np.ndarray:
  """`per_task` random rows of every label (a validation set carved from the training rows)."""
  rng = np.random.default_rng(seed)
  rows = []
  for t in np.unique(labels):
    idx = np.flatnonzero(labels == t)
    if idx.size <= per_task:
      raise UserError(f'task {t} has {idx.size} training models: too few to hold out '
                       f'{per_task} for validation (lower --val_per_task).')
    rows.append(rng.permutation(idx)[:per_task])
  return np.sort(np.concatenate(rows))


class SecondOrderModel:
  """A second-order network: `fit` on kernels + task labels, then `predict` / `embed`."""

  def __init__(self, config: SecondOrderConfig, num_classes: int):
    self.config = config
    self.layers = config.active_layers()
    if not self.layers:
      raise UserError('at least one layer weight must be > 0.')
    self.fixed_weights = jnp.asarray([config.layer_weights[i] for i in self.layers], jnp.float32)
    self.net = SecondOrderNet(self.layers, config.num_filters, num_classes, config.method,
                              config.feature_norm, config.learned_weights)
    self.num_classes = num_classes
    self.variables = None   # {'params': ..., 'feature_stats': ... (feature_norm='across')}
    self._mapped = {}

  # -- weights of Eq. 9
  def weights(self, params) -> jax.Array:
    """w_l of the active branches: fixed, or softmax of the learned logits."""
    if self.config.learned_weights:
      return jax.nn.softmax(params['branch_logits'])
    return self.fixed_weights

  @property
  def params(self):
    return None if self.variables is None else self.variables['params']

  def _select(self, kernels):
    return [np.asarray(kernels[i], np.float32) for i in self.layers]

  def init(self, kernels) -> None:
    example = [jnp.asarray(k[0]) for k in self._select(kernels)]
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), self.config.split_seed)
    variables = dict(self.net.init(key, example))
    if self.config.learned_weights:  # Start from the given weights, normalised.
      w = self.fixed_weights / jnp.sum(self.fixed_weights)
      variables['params'] = dict(variables['params'], branch_logits=jnp.log(w))
    self.variables = variables

  # -- serialisation (the results cache stores trained networks)
  def to_bytes(self) -> bytes:
    return flax.serialization.to_bytes(self.variables)

  def from_bytes(self, kernels, blob: bytes) -> None:
    self.init(kernels)
    self.variables = flax.serialization.from_bytes(self.variables, blob)

  def state(self) -> dict[str, np.ndarray]:
    """The fitted variables as flat arrays (lps_query's index keeps them)."""
    return {k: np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(self.variables, sep='/').items()}

  def load_state(self, arrays: dict) -> None:
    self.variables = flax.traverse_util.unflatten_dict(
        {k: jnp.asarray(v) for k, v in arrays.items()}, sep='/')

  # -- inference, through popmap (one program over the stack)
  def _map(self, head: Callable) -> Callable:
    if head not in self._mapped:
      pop = popmap.Population('vmap')
      fn = pop.map(lambda ks, v: head(self.net.apply(v, ks), self.weights(v['params'])),
                   (0, None))
      self._mapped[head] = lambda ks: pop.gather(fn(pop.place(ks), self.variables))
    return self._mapped[head]

  def predict(self, kernels) -> np.ndarray:
    """Task probabilities (M, num_classes) of Eq. 9's mixture."""
    return self._map(mixture_probs)(self._select(kernels))

  def embed(self, kernels) -> np.ndarray:
    """L2-normalised parameter representations (M, D); cosine = dot product."""
    return self._map(embedding)(self._select(kernels))

  # -- training
  def _logits(self, variables, ks) -> list[jax.Array]:
    """Branch logits of a stack of models: a list over branches of (B, num_classes)."""
    return jax.vmap(lambda kk: self.net.apply(variables, kk))(ks)

  def _mean_loss(self, logits, y, params) -> jax.Array:
    """Eq. 9 averaged over a stack of models."""
    w = self.weights(params)
    return jnp.mean(jax.vmap(lambda yy, *z: eq9_loss(z, yy, w))(y, *logits))

  def _features(self, variables, ks) -> list[jax.Array]:
    """Each branch's aligned features, before standardisation, of a stack of models."""
    return jax.vmap(lambda k: self.net.apply(variables, k, features_only=True))(ks)

  def _feature_stats(self, feats: list[jax.Array]) -> dict:
    """Per-feature mean / std of each branch's features over the models (feature_norm=
    'across'); eager, as when the committed results were made (jitted, the rounding differs)."""
    return {f'branch_{l}': {'mean': jnp.mean(f, axis=0), 'std': jnp.std(f, axis=0) + 1e-6}
            for l, f in zip(self.layers, feats)}

  def fit(self, kernels, labels, progress: Optional[Callable] = None) -> list[float]:
    """Trains with SGD + momentum, step lr schedule, Eq. 9; returns the mean loss per epoch.

    `progress(epoch, loss)` is called after each epoch. An epoch is one jitted `lax.scan`
    over its shuffled batches (no per-step host round trips).
    """
    cfg = self.config
    labels = np.asarray(labels, np.int32)
    _check_inputs(kernels, labels, self.layers)
    if labels.min() < 0 or labels.max() >= self.num_classes:
      raise UserError(f'labels must be in [0, {self.num_classes}).')
    ks_all = self._select(kernels)
    val = (validation_rows(labels, cfg.val_per_task, cfg.seed + 7919 * cfg.split_seed)
           if cfg.val_per_task else np.zeros(0, int))
    train = np.setdiff1d(np.arange(labels.size), val)
    ks = [jnp.asarray(k[train]) for k in ks_all]
    y = jnp.asarray(labels[train])
    if self.variables is None:
      self.init(kernels)
    m = train.size
    bs = min(cfg.batch_size, m)
    steps = m // bs
    schedule = optax.piecewise_constant_schedule(
        cfg.learning_rate, {b * steps: 0.1 for b in cfg.lr_boundaries})
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(schedule, momentum=cfg.momentum))
    opt_state = tx.init(self.variables['params'])
    fixed = {k: v for k, v in self.variables.items() if k != 'params'}

    def loss_fn(params, fixed, batch_k, batch_y):
      return self._mean_loss(self._logits(dict(fixed, params=params), batch_k), batch_y, params)

    @jax.jit
    def run_epoch(params, opt_state, fixed, key):
      perm = jax.random.permutation(key, m)[:steps * bs].reshape(steps, bs)

      def body(carry, idx):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, fixed, [k[idx] for k in ks], y[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

      (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), perm)
      return params, opt_state, jnp.mean(losses)

    val_k = [jnp.asarray(k[val]) for k in ks_all]
    val_y = jnp.asarray(labels[val])
    val_score = jax.jit(lambda params, fixed: self._val_score(dict(fixed, params=params),
                                                              val_k, val_y))
    features = jax.jit(self._features)   # traced once per fit, called every epoch
    history, best = [], None
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), cfg.split_seed), 1)
    params = self.variables['params']
    for epoch in range(cfg.epochs):
      if cfg.feature_norm == 'across':  # Statistics of the current phi, for this epoch.
        stats = self._feature_stats(features(dict(fixed, params=params), ks))
        fixed = dict(fixed, **{STATS: stats})
      params, opt_state, loss = run_epoch(params, opt_state, fixed, jax.random.fold_in(key, epoch))
      loss = float(loss)
      if not np.isfinite(loss):
        raise Diverged(f'second-order loss became {loss} at epoch {epoch + 1}; '
                                 'lower --learning_rate.')
      history.append(loss)
      if val.size:
        acc, val_loss = (float(v) for v in val_score(params, fixed))
        if best is None or (acc, -val_loss) > best[0]:
          best = ((acc, -val_loss), params, fixed, epoch + 1)
      if progress is not None:
        progress(epoch + 1, loss)
    if best is not None:
      _, params, fixed, self.best_epoch = best
    self.variables = dict(fixed, params=params)
    return history

  def _val_score(self, variables, ks, y):
    """(accuracy, Eq. 9 loss) on the validation models."""
    logits = self._logits(variables, ks)
    w = self.weights(variables['params'])
    probs = jax.vmap(lambda *z: mixture_probs(z, w))(*logits)
    return jnp.mean(jnp.argmax(probs, -1) == y), self._mean_loss(logits, y, variables['params'])
