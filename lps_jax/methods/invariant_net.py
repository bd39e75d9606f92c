"""A permutation-invariant weight-space network over all layers of a model (our own code).

After NFN's NP layers (Zhou et al., "Permutation Equivariant Neural Functionals", NeurIPS 2023)
and UNF (Zhou et al. 2024), written for any network with a `permutations.PermutationSpec`:
every variable is a *node* whose channel axes are permuted by the spec's groups (a conv kernel
(c_in, c_out, h*w), a BatchNorm's scale / bias / mean / var together (n, 4), the FC kernel
(n, classes)). One equivariant layer maps each node to hidden features with

  a per-entry Dense of its features and its means over each non-empty subset of its channel
    axes (broadcast back),
  + for each of its groups, a message over that group's channels: a Dense of every node
    sharing the group pooled onto it (mean over its other axes), concatenated,
  + a global context (Dense of every node's mean over all axes),

then ReLU; the readout is the mean of each node over its channel axes, concatenated, and an
MLP. Every term commutes with a permutation of any group, so the network is exactly invariant
to the symmetry the spec describes (tested), whatever the channel counts (a wider network's
models can be read too). Trained with AdamW on cross-entropy; the same fit / predict / embed
interface as every method.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lps_jax.common import checks as config_checks
from lps_jax.common.checks import Range, valid
from lps_jax.common.errors import UserError, Diverged
from lps_jax.training import modelset
from lps_jax.training.modelset import NetworkStack

INT1 = Range(1, integer=True)


@dataclasses.dataclass(frozen=True)
class InvariantConfig:
  hidden: int = dataclasses.field(default=16, metadata=valid(INT1, 'Hidden features per entry.'))
  depth: int = dataclasses.field(default=2, metadata=valid(INT1, 'Equivariant layers.'))
  epochs: int = dataclasses.field(default=50, metadata=valid(
      INT1, 'Training epochs (on 400 ResNet-20s the training loss is ~0 by epoch 40).'))
  batch_size: int = dataclasses.field(default=32, metadata=valid(INT1, 'Models per step.'))
  learning_rate: float = dataclasses.field(default=1e-3, metadata=valid(
      Range(0, open=True), 'AdamW learning rate (cosine decay).'))
  weight_decay: float = dataclasses.field(default=1e-2, metadata=valid(Range(0),
                                                                       'AdamW weight decay.'))
  seed: int = dataclasses.field(default=0, metadata=valid(Range(0, integer=True),
                                                          'Init and shuffling seed.'))

  def __post_init__(self):
    config_checks.check(self)


@dataclasses.dataclass(frozen=True)
class Node:
  name: str
  groups: tuple[str, ...]        # the group of each channel axis (leading axes of the array)
  paths: tuple[str, ...]         # the variables it stacks on the feature axis


def nodes_of(stack: NetworkStack, spec, prefixes=('params/', 'batch_stats/')
             ) -> tuple[list[Node], list[str]]:
  """The nodes of a stack's variables under `spec` (those whose paths start with one of
  `prefixes`), and the unpermuted paths (read as global features). Variables with one channel
  axis and the same module and group share a node."""
  nodes, by_module, unpermuted = [], {}, []
  for path in stack.paths:
    if not path.startswith(tuple(prefixes)):
      continue
    groups = spec.axes_to_perm.get(path)
    if groups is None or all(g is None for g in groups):
      unpermuted.append(path)
      continue
    channel = tuple(g for g in groups if g is not None)
    if len(set(channel)) != len(channel):
      raise UserError(f'{path}: one group on two axes is not supported.')
    if len(channel) == 1 and np.asarray(stack.get(path)).ndim == 2:   # (M, n): a norm vector
      module = path.split('/', 1)[1].rsplit('/', 1)[0]
      by_module.setdefault((module, channel), []).append(path)
    else:
      nodes.append(Node(path, channel, (path,)))
  nodes += [Node(m, g, tuple(p)) for (m, g), p in sorted(by_module.items())]
  return nodes, unpermuted


def node_arrays(stack: NetworkStack, spec, nodes: list[Node]) -> list[np.ndarray]:
  """Each node as (M, *channel sizes, features): channel axes first, the rest flattened."""
  out = []
  for node in nodes:
    parts = []
    for path in node.paths:
      x = np.asarray(stack.get(path), np.float32)
      groups = spec.axes_to_perm[path]
      chan = [1 + a for a, g in enumerate(groups) if g is not None]
      rest = [1 + a for a, g in enumerate(groups) if g is None]
      x = np.transpose(x, [0] + chan + rest)
      parts.append(x.reshape(x.shape[:1 + len(chan)] + (-1,)))
    out.append(np.concatenate(parts, axis=-1))
  return out


def _rms(x: np.ndarray, axis) -> np.ndarray:
  return np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=axis)).astype(np.float32) + 1e-8


def _mean_except(x, axis: int, num_channel: int):
  """Mean over the channel axes of x (channel axes first, features last) other than `axis`."""
  others = tuple(a for a in range(num_channel) if a != axis)
  return jnp.mean(x, axis=others) if others else x


class EquivariantLayer(nn.Module):
  nodes: tuple[Node, ...]
  hidden: int

  @nn.compact
  def __call__(self, xs, context):
    pooled = {}                       # group -> every node's features pooled onto its channels
    for node, x in zip(self.nodes, xs):
      for a, g in enumerate(node.groups):
        pooled.setdefault(g, []).append(_mean_except(x, a, len(node.groups)))
    messages = {g: nn.Dense(self.hidden, use_bias=False, name=f'message_{g}')(
        jnp.concatenate(parts, axis=-1)) for g, parts in sorted(pooled.items())}
    glob = nn.Dense(self.hidden, name='context')(jnp.concatenate(
        [context] + [jnp.mean(x, axis=tuple(range(len(n.groups))))
                     for n, x in zip(self.nodes, xs)]))
    out = []
    for i, (node, x) in enumerate(zip(self.nodes, xs)):
      k = len(node.groups)
      means = [jnp.broadcast_to(jnp.mean(x, axis=axes, keepdims=True), x.shape)
               for r in range(1, k + 1) for axes in itertools.combinations(range(k), r)]
      y = nn.Dense(self.hidden, name=f'node_{i}')(jnp.concatenate([x] + means, axis=-1)) + glob
      for a, g in enumerate(node.groups):
        shape = [1] * k + [self.hidden]
        shape[a] = -1
        y = y + messages[g].reshape(shape)
      out.append(nn.relu(y))
    return out


class InvariantNet(nn.Module):
  nodes: tuple[Node, ...]
  hidden: int
  depth: int
  num_classes: int

  @nn.compact
  def __call__(self, xs, context):
    for d in range(self.depth):
      xs = EquivariantLayer(self.nodes, self.hidden, name=f'layer_{d}')(xs, context)
    pooled = jnp.concatenate([context] + [jnp.mean(x, axis=tuple(range(len(n.groups))))
                                          for n, x in zip(self.nodes, xs)])
    h = nn.relu(nn.Dense(4 * self.hidden, name='readout')(pooled))
    return nn.Dense(self.num_classes, name='logits')(h)


class InvariantModel:
  """fit / predict / embed of an `InvariantNet` on `NetworkStack`s (all of a model's
  variables; their permutation spec comes with them)."""

  def __init__(self, config: InvariantConfig, num_classes: int, split_seed: int = 0,
               prefixes=('params/', 'batch_stats/')):
    """`prefixes`: which variables it reads ('params/' alone leaves out BatchNorm's running
    statistics, which hold the training images' feature statistics)."""
    self.config, self.num_classes, self.split_seed = config, num_classes, split_seed
    self.prefixes = tuple(prefixes)

  def _raw(self, stack):
    """The node arrays and the unpermuted variables (context) of a stack, unscaled."""
    modelset.require_stack(stack, 'the invariant network')
    context = np.concatenate([np.asarray(stack.get(p), np.float32).reshape(stack.num_models, -1)
                              for p in self.unpermuted], axis=1)
    return node_arrays(stack, stack.spec(), self.nodes), context

  def _inputs(self, stack):
    xs, context = self._raw(stack)
    return [x / s for x, s in zip(xs, self.scales)], context / self.context_scale

  def fit(self, stack, labels, progress: Optional[Callable] = None) -> None:
    cfg = self.config
    modelset.require_stack(stack, 'the invariant network')
    nodes, self.unpermuted = nodes_of(stack, stack.spec(), self.prefixes)
    self.nodes = tuple(nodes)
    xs, context = self._raw(stack)
    # One scale per node and feature (root mean square over models and channels): a
    # permutation-invariant normalisation.
    self.scales = [_rms(x, tuple(range(x.ndim - 1))) for x in xs]
    self.context_scale = _rms(context, 0)
    xs, context = [x / s for x, s in zip(xs, self.scales)], context / self.context_scale
    labels = jnp.asarray(labels, jnp.int32)
    batched = self._build()
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), self.split_seed)
    params = jax.jit(self.net.init)(key, [x[0] for x in xs], context[0])
    m = labels.shape[0]
    bs = min(cfg.batch_size, m)
    steps = m // bs
    tx = optax.adamw(optax.cosine_decay_schedule(cfg.learning_rate, cfg.epochs * steps),
                     weight_decay=cfg.weight_decay)
    opt_state = tx.init(params)

    def loss_fn(p, xb, cb, yb):
      return optax.softmax_cross_entropy_with_integer_labels(batched(p, xb, cb), yb).mean()

    @jax.jit
    def epoch(params, opt_state, key, xs, context, labels):
      perm = jax.random.permutation(key, m)[:steps * bs].reshape(steps, bs)

      def step(carry, rows):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p, [x[rows] for x in xs], context[rows],
                                              labels[rows])
        updates, s = tx.update(g, s, p)
        return (optax.apply_updates(p, updates), s), loss

      (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), perm)
      return params, opt_state, losses.mean()

    xs, context = [jnp.asarray(x) for x in xs], jnp.asarray(context)
    for e in range(cfg.epochs):
      params, opt_state, loss = epoch(params, opt_state, jax.random.fold_in(key, e + 1), xs,
                                      context, labels)
      if not np.isfinite(float(loss)):
        raise Diverged(f'invariant network: loss is {float(loss)} at epoch {e + 1}; '
                                 'lower --learning_rate.')
      if progress is not None:
        progress(e + 1, float(loss))
    self.params = params

  def _build(self):
    """The network of `self.nodes`, and its apply vmapped over models (jitted as `_apply`)."""
    cfg = self.config
    self.net = InvariantNet(self.nodes, cfg.hidden, cfg.depth, self.num_classes)
    batched = jax.vmap(self.net.apply, in_axes=(None, 0, 0))
    self._apply = jax.jit(batched)
    return batched

  def state(self) -> dict[str, np.ndarray]:
    """The fitted state as plain arrays (an lps_query index keeps it): the network's
    parameters, the per-node scales, and which variables make which node."""
    out = {'net:' + json.dumps(list(k)): np.asarray(v)          # module names hold '/'
           for k, v in traverse_util.flatten_dict(self.params).items()}
    out.update({f'scale/{i}': np.asarray(s) for i, s in enumerate(self.scales)})
    out['context_scale'] = np.asarray(self.context_scale)
    out['layout'] = np.asarray(json.dumps({
        'nodes': [dataclasses.asdict(n) for n in self.nodes], 'unpermuted': self.unpermuted,
        'prefixes': list(self.prefixes)}))
    return out

  def load_state(self, arrays: dict) -> None:
    layout = json.loads(str(arrays['layout']))
    if tuple(layout['prefixes']) != self.prefixes:
      raise UserError(f'the stored invariant network reads {layout["prefixes"]}, this method '
                      f'reads {list(self.prefixes)}.')
    self.nodes = tuple(Node(n['name'], tuple(n['groups']), tuple(n['paths']))
                       for n in layout['nodes'])
    self.unpermuted = list(layout['unpermuted'])
    self.scales = [np.asarray(arrays[f'scale/{i}']) for i in range(len(self.nodes))]
    self.context_scale = np.asarray(arrays['context_scale'])
    self.params = traverse_util.unflatten_dict(
        {tuple(json.loads(k[len('net:'):])): jnp.asarray(v) for k, v in arrays.items()
         if k.startswith('net:')})
    self._build()

  def logits(self, stack) -> np.ndarray:
    xs, context = self._inputs(stack)
    return np.asarray(self._apply(self.params, [jnp.asarray(x) for x in xs],
                                  jnp.asarray(context)))

  def predict(self, stack) -> np.ndarray:
    return np.asarray(jax.nn.softmax(self.logits(stack), axis=-1))

  def embed(self, stack) -> np.ndarray:
    z = self.logits(stack)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
