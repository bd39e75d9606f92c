"""Population training of first-order ResNets (Sec. 5: ModelSet500), resumable.

A population is one stacked pytree (leading axis = model). Each model has its own task, run
index, PRNG stream (init, data order, augmentation) and optimizer state. `train_step` is the
pure single-model step; how it runs over a population is one swappable choice
(`make_population_fn`):

  loop    a Python loop of the jitted per-model step (the baseline, one device);
  vmap    one jitted program, `jax.vmap` over models inside `shard_map` over a device mesh;
  unroll  one jitted program, the per-model step unrolled over each device's local models
          inside `shard_map` over a device mesh.

On XLA:CPU, vmap lowers per-model convs to grouped convs (measured ~9x slower), so the CPU
default is `unroll` over simulated host devices; see BENCHMARKS.md for the figures.

Sharding: the model axis of the population state, per-model keys and task indices is split over
a `Mesh` of all devices (of all processes after `distributed.initialize`) with `NamedSharding`;
the jitted step keeps that layout (`out_shardings`), checkpoints store the sharded arrays and
restore onto whatever mesh the resuming run has (another device count included).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lps_jax import data as data_lib
from lps_jax import distributed
from lps_jax import modelset as modelset_lib
from lps_jax import resnet

STRATEGIES = ('loop', 'vmap', 'unroll')
# Fastest correct (strategy, conv_impl) per backend, from `python -m experiments.benchmark`.
DEFAULT_EXECUTION = {'cpu': ('unroll', 'lax'), 'gpu': ('vmap', 'lax'), 'tpu': ('vmap', 'lax')}
MODEL_AXIS = 'models'


class TrainingStopped(Exception):
  """Raised after `train(stop_after_epochs=N)` saved its checkpoint: rerun to resume."""


class TrainingError(RuntimeError):
  """Training cannot go on (NaN loss, bad checkpoint, ...); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """First-order recipe; defaults are the paper's (Sec. 5)."""
  epochs: int = 160
  batch_size: int = 128
  learning_rate: float = 0.1
  lr_boundaries: tuple[int, ...] = (80, 120)  # Epochs after which lr is multiplied by lr_decay.
  lr_decay: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 1e-4


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
  """Everything that determines a trained population (saved with checkpoints and model set)."""
  task_ids: tuple[int, ...] = tuple(range(50))
  runs_per_task: int = 10
  seed: int = 0
  split_seed: int = 0
  holdout_fraction: float = 0.2
  dataset: str = 'tfds'
  model: resnet.ResNetConfig = resnet.ResNetConfig()
  train: TrainConfig = TrainConfig()

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @staticmethod
  def from_json(d: dict) -> 'PopulationConfig':
    d = dict(d)
    d['model'] = resnet.ResNetConfig.from_dict(d['model'])
    d['train'] = TrainConfig(**resnet.tuples_from_json(d['train']))
    d['task_ids'] = tuple(d['task_ids'])
    return PopulationConfig(**d)

  def models(self) -> list[tuple[int, int]]:
    """(task_id, run) of every model, task-major: model m = (task_ids[m // runs], m % runs)."""
    return [(t, r) for t in self.task_ids for r in range(self.runs_per_task)]


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """How to run (does not change what is computed beyond float rounding)."""
  strategy: str = 'auto'
  conv_impl: str = 'auto'
  models_per_chunk: int = 8
  num_devices: int = 0  # 0 = all local devices.

  def resolve(self) -> 'ExecutionConfig':
    backend = jax.default_backend()
    strategy, conv_impl = DEFAULT_EXECUTION.get(backend, ('loop', 'lax'))
    strategy = strategy if self.strategy == 'auto' else self.strategy
    conv_impl = conv_impl if self.conv_impl == 'auto' else self.conv_impl
    if strategy not in STRATEGIES:
      raise ValueError(f'unknown strategy {strategy!r}; choose from {STRATEGIES} or auto.')
    if conv_impl not in resnet.CONV_IMPLS:
      raise ValueError(f'unknown conv_impl {conv_impl!r}; choose from {resnet.CONV_IMPLS}.')
    n_all = jax.device_count()
    n_dev = self.num_devices or n_all
    if jax.process_count() > 1:
      if strategy == 'loop':
        raise ValueError('the per-model loop runs on one device; with several processes use '
                         "--strategy=vmap or unroll (or 'auto').")
      if n_dev != n_all:
        raise ValueError(f'num_devices={n_dev}, but a run over {jax.process_count()} processes '
                         f'shards over all {n_all} devices: pass --num_devices=0.')
    if n_dev > n_all:
      raise ValueError(f'num_devices={n_dev} but only {n_all} devices exist; on CPU raise '
                       '--num_cpu_devices or lower --num_devices.')
    if n_dev < 0:
      raise ValueError(f'num_devices must be >= 0 (0 = all), got {n_dev}.')
    if strategy == 'loop':
      n_dev = 1
    if self.models_per_chunk < 1:
      raise ValueError(f'models_per_chunk must be >= 1, got {self.models_per_chunk}.')
    return ExecutionConfig(strategy, conv_impl, self.models_per_chunk, n_dev)


# ----------------------------------------------------------------------------- model step

def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay (as torch.optim.SGD), step lr schedule."""
  schedule = optax.piecewise_constant_schedule(
      cfg.learning_rate, {int(b) * steps_per_epoch: cfg.lr_decay for b in cfg.lr_boundaries})
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(schedule, momentum=cfg.momentum))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder of the shuffled epoch is dropped)."""
  if n_train < batch_size:
    raise ValueError(f'batch_size {batch_size} exceeds the {n_train} training images per '
                     'task; lower --batch_size.')
  return n_train // batch_size


def model_key(seed: int, task_id, run) -> jax.Array:
  """The root PRNG key of one model: fold_in(fold_in(PRNGKey(seed), task_id), run)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), task_id), run)


def init_model_state(key: jax.Array, model_cfg: resnet.ResNetConfig,
                     tx: optax.GradientTransformation) -> dict:
  """{'params', 'batch_stats', 'opt_state'} of one model from its root key."""
  variables = resnet.init_variables(jax.random.fold_in(key, 0), model_cfg)
  return {'params': variables['params'], 'batch_stats': variables['batch_stats'],
          'opt_state': tx.init(variables['params'])}


def train_step(state: dict, key: jax.Array, train_idx: jax.Array, train_labels: jax.Array,
               images: jax.Array, epoch: jax.Array, step: jax.Array, *,
               model: resnet.ResNet, tx: optax.GradientTransformation,
               batch_size: int) -> tuple[dict, dict]:
  """One SGD step of one model on its task (pure; batch gathered on device by index).

  The epoch's data order is permutation(fold_in(key, epoch)); step `step` takes its
  `batch_size` slice and augments it with fold_in(fold_in(key, epoch), step + 1).
  """
  epoch_key = jax.random.fold_in(jax.random.fold_in(key, 1), epoch)
  perm = jax.random.permutation(jax.random.fold_in(epoch_key, 0), train_idx.shape[0])
  sel = jax.lax.dynamic_slice(perm, (step * batch_size,), (batch_size,))
  x = data_lib.augment(jax.random.fold_in(epoch_key, step + 1), images[train_idx[sel]])
  y = train_labels[sel]

  def loss_fn(params):
    logits, new_vars = model.apply({'params': params, 'batch_stats': state['batch_stats']},
                                   x, train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (new_vars['batch_stats'], jnp.mean(jnp.argmax(logits, -1) == y))

  (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new_state = {'params': optax.apply_updates(state['params'], updates),
               'batch_stats': batch_stats, 'opt_state': opt_state}
  return new_state, {'loss': loss, 'accuracy': acc}


def eval_step(state: dict, eval_idx: jax.Array, eval_labels: jax.Array, images: jax.Array, *,
              model: resnet.ResNet) -> dict:
  """Held-out loss and accuracy of one model (BatchNorm in inference mode)."""
  logits = model.apply({'params': state['params'], 'batch_stats': state['batch_stats']},
                       data_lib.normalize(images[eval_idx]), train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, eval_labels).mean()
  return {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == eval_labels)}


# ------------------------------------------------------------------------ population maps

def make_mesh(num_devices: int) -> Mesh:
  """A 1-D mesh over the model axis: the first `num_devices` devices (all processes' devices
  when several processes take part)."""
  devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f'a mesh of {num_devices} devices does not fit the {len(devices)} '
                     'available; lower --num_devices.')
  return Mesh(np.asarray(devices[:num_devices]), (MODEL_AXIS,))


def make_population_fn(fn: Callable, in_axes: Sequence[Optional[int]], strategy: str,
                       mesh: Optional[Mesh] = None, donate_argnums: tuple[int, ...] = ()):
  """Lifts per-model `fn(*args)` to stacked args (axis 0 where in_axes is 0; None = shared).

  Outputs are stacked over models. `strategy` is one of STRATEGIES (module docstring); for
  vmap / unroll the model axis is sharded over `mesh` with shard_map, so the stacked inputs
  must have a leading size divisible by the mesh size.
  """
  in_axes = tuple(in_axes)
  if strategy == 'loop':
    jitted = jax.jit(fn)

    def looped(*args):
      stacked = next(a for a, ax in zip(args, in_axes) if ax == 0)
      n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
      outs = [jitted(*[jax.tree_util.tree_map(lambda x: x[i], a) if ax == 0 else a
                       for a, ax in zip(args, in_axes)]) for i in range(n)]
      return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)
    return looped

  if strategy == 'vmap':
    local = jax.vmap(fn, in_axes=in_axes)
  elif strategy == 'unroll':
    def local(*args):
      stacked = [a for a, ax in zip(args, in_axes) if ax == 0]
      n = jax.tree_util.tree_leaves(stacked[0])[0].shape[0]
      outs = [fn(*[jax.tree_util.tree_map(lambda x: x[i], a) if ax == 0 else a
                   for a, ax in zip(args, in_axes)]) for i in range(n)]
      return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)
  else:
    raise ValueError(f'unknown strategy {strategy!r}; choose from {STRATEGIES}.')
  mesh = mesh if mesh is not None else make_mesh(1)
  specs = tuple(P(MODEL_AXIS) if ax == 0 else P() for ax in in_axes)
  sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(MODEL_AXIS),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=donate_argnums,
                 out_shardings=NamedSharding(mesh, P(MODEL_AXIS)))


def shard_models(tree, mesh: Optional[Mesh]):
  """Places a stacked tree with its model axis split over `mesh` (no-op without a mesh).

  Host values are placed shard by shard (`distributed.place`): with several processes each
  one transfers only its own devices' models.
  """
  if mesh is None:
    return tree
  return distributed.place(tree, NamedSharding(mesh, P(MODEL_AXIS)))


# --------------------------------------------------------------------------- the trainer

@dataclasses.dataclass
class _Chunk:
  index: int
  rows: np.ndarray   # model indices into config.models(), padded to the chunk size
  n_real: int        # how many of them are real (the rest repeat the last model)


class PopulationTrainer:
  """Trains a population chunk by chunk, checkpointing so that a rerun resumes.

  Work directory layout:
    config.json              the PopulationConfig (a rerun with another config is refused)
    chunks/chunk_NNNNN/      finished chunks, each a model set (lps_jax.modelset)
    ckpt/chunk_NNNNN/<epoch> orbax checkpoints of the chunk in progress
    modelset/                the final model set, once every chunk is done
  """

  def __init__(self, config: PopulationConfig, execution: ExecutionConfig,
               train_split: data_lib.Split, eval_split: Optional[data_lib.Split] = None,
               checkpoint_every: int = 10, eval_every: int = 10):
    self.config = config
    self.execution = execution.resolve()
    self.checkpoint_every = max(1, checkpoint_every)
    self.eval_every = max(1, eval_every)
    self.tasks = data_lib.make_tasks(train_split, config.task_ids, config.holdout_fraction,
                                     config.split_seed, eval_split=eval_split)
    n_train = self.tasks.train_idx.shape[1]
    self.steps_per_epoch = steps_per_epoch(n_train, config.train.batch_size)
    self.tx = make_optimizer(config.train, self.steps_per_epoch)
    self.model = resnet.ResNet(config.model, conv_impl=self.execution.conv_impl)
    ex = self.execution
    self.mesh = None if ex.strategy == 'loop' else make_mesh(ex.num_devices)
    chunk = ex.models_per_chunk
    if self.mesh is not None and chunk % ex.num_devices:
      chunk = -(-chunk // ex.num_devices) * ex.num_devices
      logging.info('models_per_chunk %d rounded up to %d to divide over %d devices',
                   ex.models_per_chunk, chunk, ex.num_devices)
    self.chunk_size = chunk
    n_models = len(config.models())
    if n_models % chunk:
      logging.info('%d models in chunks of %d: the last chunk is padded with %d repeats '
                   '(computed, then dropped)', n_models, chunk, chunk - n_models % chunk)
    # Images live on the device once, replicated over the mesh; tasks gather by index.
    images = jnp.asarray(train_split.images)
    eval_images = images if eval_split is None else jnp.asarray(eval_split.images)
    if self.mesh is not None:
      rep = NamedSharding(self.mesh, P())
      images = distributed.place(train_split.images, rep)
      eval_images = (images if eval_split is None
                     else distributed.place(eval_split.images, rep))
    self.images, self.eval_images = images, eval_images
    self._train = make_population_fn(
        functools.partial(train_step, model=self.model, tx=self.tx,
                          batch_size=config.train.batch_size),
        (0, 0, 0, 0, None, None, None), ex.strategy, self.mesh, donate_argnums=(0,))
    self._eval = make_population_fn(functools.partial(eval_step, model=self.model),
                                    (0, 0, 0, None), ex.strategy, self.mesh)
    self._init = jax.jit(
        jax.vmap(lambda k: init_model_state(k, config.model, self.tx)),
        out_shardings=(None if self.mesh is None
                       else NamedSharding(self.mesh, P(MODEL_AXIS))))

  # -- chunk bookkeeping
  def chunks(self) -> list[_Chunk]:
    n = len(self.config.models())
    out = []
    for i, start in enumerate(range(0, n, self.chunk_size)):
      rows = np.arange(start, min(start + self.chunk_size, n))
      n_real = rows.size
      rows = np.concatenate([rows, np.full(self.chunk_size - n_real, rows[-1])])
      out.append(_Chunk(i, rows, n_real))
    return out

  def _chunk_inputs(self, chunk: _Chunk):
    models = self.config.models()
    task_pos = {t: i for i, t in enumerate(self.config.task_ids)}
    tasks = np.asarray([models[m][0] for m in chunk.rows])
    runs = np.asarray([models[m][1] for m in chunk.rows])
    pos = np.asarray([task_pos[t] for t in tasks])
    keys = np.asarray(jax.vmap(lambda t, r: model_key(self.config.seed, t, r))(tasks, runs))
    t = self.tasks
    per_model = [keys, t.train_idx[pos], t.train_labels[pos], t.eval_idx[pos], t.eval_labels[pos]]
    per_model = ([jnp.asarray(x) for x in per_model] if self.mesh is None
                 else [shard_models(x, self.mesh) for x in per_model])
    return tasks, runs, per_model

  # -- public API
  def train(self, workdir: str, progress: bool = True,
            on_epoch_end: Optional[Callable[[int, int], None]] = None,
            stop_after_epochs: Optional[int] = None) -> modelset_lib.ModelSet:
    """Trains every chunk not yet finished in `workdir`; returns the full model set.

    `on_epoch_end(chunk_index, epochs_done)` is called after each epoch (and its checkpoint).
    `stop_after_epochs=N`: after N epochs trained in this call, checkpoint and raise
    `TrainingStopped` (for job time limits; a rerun resumes there, on any device count).
    With several processes every process calls this; only process 0 writes model sets.
    """
    if distributed.is_primary():
      _check_workdir_config(workdir, self.config)
    distributed.barrier('workdir_checked')
    final_path = os.path.join(workdir, 'modelset')
    if os.path.isdir(final_path):
      logging.info('model set already complete in %s; loading it', final_path)
      return modelset_lib.load(final_path)
    chunks = self.chunks()
    epochs = self.config.train.epochs
    bar = _progress_bar(len(chunks) * epochs, progress)
    done_sets = []
    models_done = 0
    budget = {'left': stop_after_epochs}
    try:
      for chunk in chunks:
        chunk_dir = os.path.join(workdir, 'chunks', f'chunk_{chunk.index:05d}')
        ckpt_dir = os.path.join(workdir, 'ckpt', f'chunk_{chunk.index:05d}')
        if os.path.isdir(chunk_dir):
          done_sets.append(self._load_finished_chunk(chunk, chunk_dir))
          if distributed.is_primary():
            shutil.rmtree(ckpt_dir, ignore_errors=True)
          models_done += chunk.n_real
          bar.update(epochs)
          continue
        result = self._train_chunk(chunk, ckpt_dir, bar, models_done, on_epoch_end, budget)
        if distributed.is_primary():
          modelset_lib.save(chunk_dir, result)
          shutil.rmtree(ckpt_dir, ignore_errors=True)
        distributed.barrier(f'chunk_{chunk.index}_saved')
        done_sets.append(result)
        models_done += chunk.n_real
        logging.info('chunk %d/%d done: %d models, mean held-out accuracy %.3f',
                     chunk.index + 1, len(chunks), models_done,
                     float(np.mean(result.heldout_accuracy)))
    finally:
      bar.close()
    full = modelset_lib.concatenate(done_sets)
    if distributed.is_primary():
      modelset_lib.save(final_path, full)
    distributed.barrier('modelset_saved')
    return full

  def _load_finished_chunk(self, chunk: _Chunk, chunk_dir: str) -> modelset_lib.ModelSet:
    """A finished chunk, checked to hold exactly the models this chunk plan expects."""
    done = modelset_lib.load(chunk_dir)
    models = self.config.models()
    want = [models[m] for m in chunk.rows[:chunk.n_real]]
    have = list(zip(done.task_id.tolist(), done.run.tolist()))
    if have != want:
      raise TrainingError(
          f'{chunk_dir} holds {len(have)} models that do not match chunk {chunk.index} of '
          f'{self.chunk_size} models (it was written with another --models_per_chunk or device '
          'count). Rerun with the chunk size of the first run (see its log), or a new --workdir.')
    return done

  def _train_chunk(self, chunk: _Chunk, ckpt_dir: str, bar, models_done: int,
                   on_epoch_end, budget: Optional[dict] = None) -> modelset_lib.ModelSet:
    tasks, runs, (keys, tr_idx, tr_lab, ev_idx, ev_lab) = self._chunk_inputs(chunk)
    state = self._init(keys)
    _check_chunk_plan(ckpt_dir, chunk, self.chunk_size)
    mngr = ocp.CheckpointManager(
        os.path.abspath(ckpt_dir),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                             enable_async_checkpointing=False))
    start_epoch = 0
    if mngr.latest_step() is not None:
      start_epoch = mngr.latest_step()
      state = _restore(mngr, start_epoch, state, ckpt_dir)
      logging.info('chunk %d: resumed from epoch %d checkpoint in %s (onto %d device(s))',
                   chunk.index, start_epoch, ckpt_dir, 1 if self.mesh is None
                   else self.mesh.size)
    bar.update(start_epoch)
    epochs = self.config.train.epochs
    for epoch in range(start_epoch, epochs):
      losses = []
      for step in range(self.steps_per_epoch):
        state, metrics = self._train(state, keys, tr_idx, tr_lab, self.images,
                                     jnp.int32(epoch), jnp.int32(step))
        losses.append(metrics['loss'])
      loss = np.mean(np.stack(distributed.to_host(losses)), axis=0)[:chunk.n_real]
      if not np.all(np.isfinite(loss)):
        bad = [f'task {tasks[i]} run {runs[i]}' for i in np.flatnonzero(~np.isfinite(loss))]
        raise TrainingError(
            f'NaN/Inf training loss at epoch {epoch + 1} for {", ".join(bad[:5])}; lower '
            '--learning_rate. The last complete checkpoint is kept, so a rerun resumes there.')
      done = epoch + 1
      postfix = {'chunk': chunk.index + 1, 'models_done': models_done, 'loss': f'{loss.mean():.3f}'}
      if done % self.eval_every == 0 or done == epochs:
        acc = distributed.to_host(self._eval(state, ev_idx, ev_lab, self.eval_images)['accuracy'])
        postfix['heldout_acc'] = f'{acc[:chunk.n_real].mean():.3f}'
      bar.set_postfix(postfix, refresh=False)
      bar.update(1)
      if budget is not None and budget['left'] is not None:
        budget['left'] -= 1
      stop = budget is not None and budget['left'] is not None and budget['left'] <= 0
      if done < epochs and (done % self.checkpoint_every == 0 or stop):
        mngr.save(done, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
      if on_epoch_end is not None:
        on_epoch_end(chunk.index, done)
      if stop and done < epochs:
        mngr.close()
        raise TrainingStopped(f'stopped after the requested epochs; chunk {chunk.index} is '
                              f'checkpointed at epoch {done} in {ckpt_dir}: rerun the same '
                              'command to resume (any device count).')
    mngr.close()
    acc = distributed.to_host(self._eval(state, ev_idx, ev_lab, self.eval_images)['accuracy'])
    host = distributed.to_host({'params': state['params'], 'batch_stats': state['batch_stats']})
    keep = lambda x: np.asarray(x)[:chunk.n_real]
    return modelset_lib.ModelSet(
        params=jax.tree_util.tree_map(keep, host['params']),
        batch_stats=jax.tree_util.tree_map(keep, host['batch_stats']),
        task_id=keep(tasks).astype(np.int32), run=keep(runs).astype(np.int32),
        seed=np.full(chunk.n_real, self.config.seed, np.int64),
        heldout_accuracy=keep(acc).astype(np.float32), config=self.config.to_json())


def _restore(mngr, step: int, like: Any, ckpt_dir: str):
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      like)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax raises many types for damaged or foreign folders.
    raise TrainingError(
        f'checkpoint {os.path.join(ckpt_dir, str(step))} is unreadable or does not match this '
        f'population ({type(e).__name__}: {str(e)[:200]}); delete that folder to resume from '
        'an earlier checkpoint, or use a new --workdir.') from e


def _check_chunk_plan(ckpt_dir: str, chunk: _Chunk, chunk_size: int) -> None:
  """Refuses to resume a checkpoint written for another chunk plan (population size).

  Process 0 records the plan on first use; after a barrier every process compares.
  """
  path = os.path.join(ckpt_dir, 'chunk.json')
  plan = {'chunk_size': int(chunk_size), 'rows': [int(r) for r in chunk.rows]}
  if distributed.is_primary() and not os.path.exists(path):
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(plan, f)
    os.replace(tmp, path)
  distributed.barrier(f'chunk_{chunk.index}_plan')
  with open(path) as f:
    old = json.load(f)
  if old != plan:
    raise TrainingError(
        f'checkpoint {ckpt_dir} was written for a chunk of {old.get("chunk_size")} models '
        f'(model rows {old.get("rows", [])[:4]}...), this run plans {chunk_size} '
        f'({plan["rows"][:4]}...). Rerun with --models_per_chunk={old.get("chunk_size")} '
        '(and a device count dividing it), or use a new --workdir.')


def _check_workdir_config(workdir: str, config: PopulationConfig) -> None:
  """Writes config.json on first use; refuses a workdir made by a different config."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
      PopulationConfig.from_json(old)
    except Exception as e:
      raise TrainingError(f'{path} is unreadable ({e}); this is not a train_population workdir '
                          '(or it is damaged): use a new --workdir.') from e
    new = config.to_json()
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise TrainingError(f'workdir {workdir!r} holds a run with a different config (differs '
                          f'in: {", ".join(diff)}); use a new --workdir or the same flags.')
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(config.to_json(), f, indent=1)
  os.replace(tmp, path)


def _progress_bar(total: int, enabled: bool):
  from tqdm import tqdm  # tfds already depends on tqdm.
  tty = sys.stderr.isatty()
  return tqdm(total=total, desc='epochs (all chunks)', disable=not enabled,
              mininterval=0.5 if tty else 30.0, file=sys.stderr, dynamic_ncols=True)


def time_train_steps(trainer: PopulationTrainer, num_steps: int, warmup: int = 1) -> dict:
  """Times `num_steps` population steps on the first chunk (after `warmup` compiled steps).

  Returns wall seconds, images/s and model-steps/s; used by experiments.benchmark.
  """
  chunk = trainer.chunks()[0]
  _, _, (keys, tr_idx, tr_lab, _, _) = trainer._chunk_inputs(chunk)
  state = trainer._init(keys)
  t_compile = time.perf_counter()
  for i in range(warmup):
    state, m = trainer._train(state, keys, tr_idx, tr_lab, trainer.images, jnp.int32(0),
                              jnp.int32(i % trainer.steps_per_epoch))
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(num_steps):
    state, m = trainer._train(state, keys, tr_idx, tr_lab, trainer.images, jnp.int32(1),
                              jnp.int32(i % trainer.steps_per_epoch))
  jax.block_until_ready(m)
  seconds = time.perf_counter() - t0
  n = trainer.chunk_size * num_steps
  return {'seconds': seconds, 'warmup_seconds': t0 - t_compile,
          'images_per_s': n * trainer.config.train.batch_size / seconds,
          'model_steps_per_s': n / seconds}


def step_cost(trainer: PopulationTrainer) -> dict:
  """FLOPs of one model's train step (XLA cost analysis of the unbatched step) and the
  per-device memory of the compiled population step (arguments + outputs + temporaries).

  The FLOPs are the useful work, the same whatever the strategy; used by experiments.benchmark
  for GFLOP/s.
  """
  chunk = trainer.chunks()[0]
  _, _, (keys, tr_idx, tr_lab, _, _) = trainer._chunk_inputs(chunk)
  state = trainer._init(keys)
  one = lambda x: jnp.asarray(distributed.to_host(x)[0])
  step = jax.jit(functools.partial(train_step, model=trainer.model, tx=trainer.tx,
                                   batch_size=trainer.config.train.batch_size))
  single = step.lower(jax.tree_util.tree_map(one, state), one(keys), one(tr_idx), one(tr_lab),
                      jnp.asarray(distributed.to_host(trainer.images)), jnp.int32(0),
                      jnp.int32(0)).compile()
  cost = single.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if trainer.execution.strategy == 'loop':
    compiled = single
  else:
    compiled = trainer._train.lower(state, keys, tr_idx, tr_lab, trainer.images, jnp.int32(0),
                                    jnp.int32(0)).compile()
  mem = compiled.memory_analysis()
  peak = (None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       + mem.temp_size_in_bytes - mem.alias_size_in_bytes))
  return {'flops_per_model_step': float(cost.get('flops', float('nan'))),
          'step_memory_bytes_per_device': peak}
