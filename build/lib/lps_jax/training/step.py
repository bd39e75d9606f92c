"""The pure per-model training step of the first-order ResNets (Sec. 5) and its pieces.

One model's state is {'params', 'batch_stats', 'opt_state'}. A step is two pure functions:

  forward_and_vjp   gathers the step's batch by index, augments it, runs the forward pass and
                    returns the VJP of the loss (its residuals are the activations);
  apply_gradients   pulls the gradient back through that VJP and applies the SGD update.

`train_step` is their composition in one program ("fused"); running them as two programs
("split") keeps XLA:CPU from fusing activation re-computation into the transposes of the weight
gradients (BENCHMARKS.md). Either way the arithmetic is the same.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lps_jax.training import data as data_lib
from lps_jax.training import resnet
from lps_jax.training.config import TrainConfig


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (as torch.optim.SGD), step lr schedule."""
  schedule = optax.piecewise_constant_schedule(
      cfg.learning_rate, {int(b) * steps_per_epoch: cfg.lr_decay for b in cfg.lr_boundaries})
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(schedule, momentum=cfg.momentum))


def model_key(seed: int, task_id, run) -> jax.Array:
  """The root PRNG key of one model: fold_in(fold_in(PRNGKey(seed), task_id), run)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), task_id), run)


def init_model_state(key: jax.Array, model_cfg: resnet.ResNetConfig,
                     tx: optax.GradientTransformation) -> dict:
  """{'params', 'batch_stats', 'opt_state'} of one model from its root key."""
  variables = resnet.init_variables(jax.random.fold_in(key, 0), model_cfg)
  return {'params': variables['params'], 'batch_stats': variables['batch_stats'],
          'opt_state': tx.init(variables['params'])}


def batch(key: jax.Array, train_idx: jax.Array, train_labels: jax.Array, images: jax.Array,
          epoch: jax.Array, step: jax.Array, *, batch_size: int, stride: int):
  """The augmented images and labels of one step, gathered on device by index.

  The epoch's data order is permutation(fold_in(fold_in(key, 1), epoch)); step s takes the
  `batch_size` rows from s * `stride` (stride = the configured batch size; an epoch's last,
  partial batch is smaller) and augments them with fold_in(epoch_key, s + 1).
  """
  epoch_key = jax.random.fold_in(jax.random.fold_in(key, 1), epoch)
  perm = jax.random.permutation(jax.random.fold_in(epoch_key, 0), train_idx.shape[0])
  sel = jax.lax.dynamic_slice(perm, (step * stride,), (batch_size,))
  x = data_lib.augment(jax.random.fold_in(epoch_key, step + 1), images[train_idx[sel]])
  return x, train_labels[sel]


def forward_and_vjp(state: dict, key: jax.Array, train_idx: jax.Array,
                    train_labels: jax.Array, images: jax.Array, epoch: jax.Array,
                    step: jax.Array, *, model: resnet.ResNet, batch_size: int,
                    stride: int) -> tuple[Callable, dict, dict]:
  """Forward pass of one step: (vjp of the loss w.r.t. params, new batch_stats, metrics)."""
  x, y = batch(key, train_idx, train_labels, images, epoch, step, batch_size=batch_size,
               stride=stride)

  def loss_fn(params):
    logits, new_vars = model.apply({'params': params, 'batch_stats': state['batch_stats']},
                                   x, train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (new_vars['batch_stats'], jnp.mean(jnp.argmax(logits, -1) == y))

  loss, vjp, (batch_stats, acc) = jax.vjp(loss_fn, state['params'], has_aux=True)
  return vjp, batch_stats, {'loss': loss, 'accuracy': acc}


def apply_gradients(state: dict, vjp: Callable, batch_stats: dict, *,
                    tx: optax.GradientTransformation) -> dict:
  """Backward pass and SGD update of one step, from `forward_and_vjp`'s outputs."""
  grads = vjp(jnp.ones((), jnp.float32))[0]
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  return {'params': optax.apply_updates(state['params'], updates),
          'batch_stats': batch_stats, 'opt_state': opt_state}


def train_step(state: dict, key: jax.Array, train_idx: jax.Array, train_labels: jax.Array,
               images: jax.Array, epoch: jax.Array, step: jax.Array, *,
               model: resnet.ResNet, tx: optax.GradientTransformation, batch_size: int,
               stride: int) -> tuple[dict, dict]:
  """One SGD step of one model on its task (pure): `apply_gradients` after `forward_and_vjp`."""
  vjp, batch_stats, metrics = forward_and_vjp(state, key, train_idx, train_labels, images, epoch,
                                              step, model=model, batch_size=batch_size,
                                              stride=stride)
  return apply_gradients(state, vjp, batch_stats, tx=tx), metrics


def eval_step(state: dict, eval_idx: jax.Array, eval_labels: jax.Array, images: jax.Array, *,
              model: resnet.ResNet) -> dict:
  """Held-out loss and accuracy of one model (BatchNorm in inference mode)."""
  logits = model.apply({'params': state['params'], 'batch_stats': state['batch_stats']},
                       data_lib.normalize(images[eval_idx]), train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, eval_labels).mean()
  return {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == eval_labels)}
