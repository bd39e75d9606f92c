"""Chunked, resumable training of a population of first-order ResNets (Sec. 5: ModelSet500).

The population is cut into chunks of `models_per_chunk` models. A chunk trains epoch by epoch
through a `popmap.Population` (the strategy and devices of `ExecutionConfig`); its state is
checkpointed every `checkpoint_every` epochs and, once finished, saved as a model set that is
never trained again. Layout of the work directory and the guards: `lps_jax.training.workdir`.

Reproducibility: model m = (task t, run r) has the root key fold_in(fold_in(PRNGKey(seed), t), r)
(`train_step.model_key`); its init, data order and augmentation derive from it, so results do
not depend on chunking, strategy or device count beyond float rounding (on CPU: not at all).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import shutil
import sys
import warnings
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from lps_jax.common.errors import UserError
from lps_jax.training import data as data_lib
from lps_jax.training import distributed, modelset, popmap, resnet, workdir
from lps_jax.training import hooks as hooks_lib
from lps_jax.training.config import ExecutionConfig, PopulationConfig
from lps_jax.training.step import (apply_gradients, eval_step, forward_and_vjp, init_model_state,
                                   make_optimizer, model_key, train_step)
from lps_jax.training.workdir import TrainingError, TrainingStopped


@dataclasses.dataclass
class Chunk:
  index: int
  rows: np.ndarray   # model indices into config.models(), padded to the chunk size
  n_real: int        # how many of them are real (the rest repeat the last model)


class PopulationTrainer:
  """Trains a population chunk by chunk, checkpointing so that a rerun resumes."""

  def __init__(self, config: PopulationConfig, execution: ExecutionConfig,
               train_split: data_lib.Split, eval_split: Optional[data_lib.Split] = None):
    self.config = config
    self.execution = ex = execution.resolve()
    self.tasks = data_lib.make_tasks(train_split, config.task_ids, config.holdout_fraction,
                                     config.split_seed, eval_split=eval_split)
    self.batch_sizes = config.train.batch_sizes(self.tasks.train_idx.shape[1])
    self.steps_per_epoch = config.train.steps_per_epoch(self.tasks.train_idx.shape[1])
    self.tx = make_optimizer(config.train, self.steps_per_epoch)
    self.model = resnet.ResNet(config.model, conv_impl=ex.conv_impl,
                               conv_threads=ex.conv_threads, norm_impl=ex.norm_impl)
    self.population = pop = popmap.Population(ex.strategy, popmap.make_mesh(ex.num_devices))
    self.chunk_size = pop.padded_size(ex.models_per_chunk)
    if self.chunk_size != ex.models_per_chunk:
      logging.info('models_per_chunk %d rounded up to %d to divide over %d devices',
                   ex.models_per_chunk, self.chunk_size, ex.num_devices)
    n_models = len(config.models())
    if n_models % self.chunk_size:
      logging.info('%d models in chunks of %d: the last chunk is padded with %d repeats '
                   '(computed, then dropped)', n_models, self.chunk_size,
                   self.chunk_size - n_models % self.chunk_size)
    # Images live on every device once; tasks gather batches by index inside the step.
    self.images = pop.place(train_split.images, shared=True)
    self.eval_images = (self.images if eval_split is None
                        else pop.place(eval_split.images, shared=True))
    self._steps = {b: self._make_step(b) for b in sorted(set(self.batch_sizes))}
    self._eval = pop.map(functools.partial(eval_step, model=self.model), (0, 0, 0, None))
    self._init = jax.jit(jax.vmap(lambda k: init_model_state(k, config.model, self.tx)))

  def _make_step(self, batch_size: int) -> Callable:
    """(state, keys, train_idx, train_labels, images, epoch, step) -> (state, metrics) over the
    population, for steps of `batch_size` images (the partial last batch has its own)."""
    sizes = dict(batch_size=batch_size, stride=self.config.train.batch_size)
    in_axes = (0, 0, 0, 0, None, None, None)
    if self.execution.step == 'fused':
      return self.population.map(
          functools.partial(train_step, model=self.model, tx=self.tx, **sizes), in_axes,
          donate_argnums=(0,))
    forward = jax.jit(functools.partial(forward_and_vjp, model=self.model, **sizes))
    # Donating the VJP residuals (the activations) frees them as soon as the backward program
    # ends, instead of when Python lets go: 1.15x images/s on 2 CPU cores (BENCHMARKS.md).
    # XLA cannot alias them to outputs, which jax reports once per compile; that is expected.
    backward = jax.jit(functools.partial(apply_gradients, tx=self.tx), donate_argnums=(0, 1))

    def split_step(state, *args):  # Two programs per model: see lps_jax.training.step.
      vjp, batch_stats, metrics = forward(state, *args)
      with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
        return backward(state, vjp, batch_stats), metrics
    step = self.population.map(split_step, in_axes, compile=False)
    step.parts = (forward, backward)
    return step

  # -- chunks
  def chunks(self) -> list[Chunk]:
    n = len(self.config.models())
    out = []
    for i, start in enumerate(range(0, n, self.chunk_size)):
      rows = np.arange(start, min(start + self.chunk_size, n))
      n_real = rows.size
      rows = np.concatenate([rows, np.full(self.chunk_size - n_real, rows[-1])])
      out.append(Chunk(i, rows, n_real))
    return out

  def chunk_inputs(self, chunk: Chunk):
    """(tasks, runs, host keys, placed [keys, train_idx, train_labels, eval_idx, eval_labels])."""
    models = self.config.models()
    task_pos = {t: i for i, t in enumerate(self.config.task_ids)}
    tasks = np.asarray([models[m][0] for m in chunk.rows])
    runs = np.asarray([models[m][1] for m in chunk.rows])
    pos = np.asarray([task_pos[t] for t in tasks])
    keys = np.asarray(jax.vmap(lambda t, r: model_key(self.config.seed, t, r))(tasks, runs))
    t = self.tasks
    per_model = [keys, t.train_idx[pos], t.train_labels[pos], t.eval_idx[pos], t.eval_labels[pos]]
    return tasks, runs, keys, [self.population.place(x) for x in per_model]

  def initial_state(self, keys: np.ndarray) -> dict:
    """Stacked host state of the models with these root keys, at initialisation."""
    return distributed.to_host(self._init(keys))

  def step_fn(self, batch_size: int) -> Callable:
    return self._steps[batch_size]

  # -- public API
  def train(self, path: str, progress: bool = True,
            on_epoch_end: Optional[Callable[[int, int], None]] = None,
            stop_after_epochs: Optional[int] = None,
            hooks: Sequence[hooks_lib.Hook] = ()) -> modelset.ModelSet:
    """Trains every chunk not yet finished in work directory `path`; returns the model set.

    `on_epoch_end(chunk_index, epochs_done)` is called after each epoch (and its checkpoint).
    `stop_after_epochs=N`: after N epochs trained in this call, checkpoint and raise
    `TrainingStopped` (for job time limits; a rerun resumes there, on any device count).
    `hooks`: more periodic actions (`training.hooks`), called after each epoch before its
    checkpoint, e.g. the slices' trajectory recorder.
    With several processes every process calls this; only process 0 writes model sets.
    """
    # The writing process holds the workdir's lock for the whole run, before it cleans up.
    with (workdir.exclusive(path) if distributed.is_primary() else contextlib.nullcontext()):
      try:
        after = [hooks_lib.Callback(on_epoch_end)] if on_epoch_end else []
        return self._train(path, progress, [hooks_lib.StopAfter(stop_after_epochs), *hooks],
                           after)
      except OSError as e:
        if e.errno not in _WRITE_ERRORS:
          raise
        where = f' ({e.filename})' if e.filename else ''
        raise TrainingError(
            f'a write in {path} failed: {os.strerror(e.errno)}{where}. Finished chunks and the '
            'last complete checkpoint are kept (writes are atomic): free space or make the '
            'folder writable, then rerun the same command to resume.') from e

  def _train(self, path, progress, before: list, after: list):
    """`before` / `after`: hooks called before / after each epoch's checkpoint."""
    if distributed.is_primary():
      workdir.check_config(path, self.config)
      for stale in workdir.remove_partial_writes(path):
        logging.info('removed %s, left half-written by an interrupted run', stale)
    distributed.barrier('workdir_checked')
    final_path = workdir.modelset_dir(path)
    if os.path.isdir(final_path):
      logging.info('model set already complete in %s; loading it', final_path)
      return modelset.load(final_path)
    chunks = self.chunks()
    epochs = self.config.train.epochs
    bar = _progress_bar(len(chunks) * epochs, progress)
    done_sets, models_done = [], 0
    try:
      for chunk in chunks:
        finished = workdir.chunk_dir(path, chunk.index)
        if os.path.isdir(finished):
          done_sets.append(self._load_finished_chunk(chunk, finished))
          logging.info('chunk %d/%d already finished in %s: not retrained', chunk.index + 1,
                       len(chunks), finished)
          if distributed.is_primary():
            shutil.rmtree(workdir.ckpt_dir(path, chunk.index), ignore_errors=True)
          models_done += chunk.n_real
          bar.update(epochs)
          continue
        result = self._train_chunk(chunk, path, bar, models_done, before, after)
        if distributed.is_primary():
          modelset.save(finished, result)
          shutil.rmtree(workdir.ckpt_dir(path, chunk.index), ignore_errors=True)
        distributed.barrier(f'chunk_{chunk.index}_saved')
        done_sets.append(result)
        models_done += chunk.n_real
        logging.info('chunk %d/%d done: %d models, mean held-out accuracy %.3f',
                     chunk.index + 1, len(chunks), models_done,
                     float(np.mean(result.heldout_accuracy)))
    finally:
      bar.close()
    full = modelset.concatenate(done_sets)
    if distributed.is_primary():
      modelset.save(final_path, full)
    distributed.barrier('modelset_saved')
    return full

  def _load_finished_chunk(self, chunk: Chunk, path: str) -> modelset.ModelSet:
    """A finished chunk, checked to hold exactly the models this chunk plan expects."""
    done = modelset.load(path)
    models = self.config.models()
    want = [models[m] for m in chunk.rows[:chunk.n_real]]
    have = list(zip(done.task_id.tolist(), done.run.tolist()))
    if have != want:
      raise TrainingError(
          f'{path} holds {len(have)} models that do not match chunk {chunk.index} of '
          f'{self.chunk_size} models (it was written with another --models_per_chunk or device '
          'count). Rerun with the chunk size of the first run (see its log), or a new --workdir.')
    return done

  def _epoch(self, state, epoch: int, keys, tr_idx, tr_lab):
    """One epoch of a placed chunk: (state, mean training loss per model)."""
    losses = []
    for step, size in enumerate(self.batch_sizes):
      state, metrics = self._steps[size](state, keys, tr_idx, tr_lab, self.images,
                                         np.int32(epoch), np.int32(step))
      losses.append(metrics)  # Read back once per epoch: no host round trip per step.
    return state, np.mean([self.population.gather(m)['loss'] for m in losses], axis=0)

  def replay(self, task_id: int, run: int, epochs: int) -> dict:
    """The host state of model (task_id, run) after its first `epochs` epochs, computed as
    `train` computes it (on CPU: bit for bit), without touching any work directory."""
    models = self.config.models()
    if (task_id, run) not in models:
      raise UserError(f'model (task {task_id}, run {run}) is not in this population.')
    chunk = Chunk(-1, np.full(self.chunk_size, models.index((task_id, run))), 1)
    _, _, host_keys, (keys, tr_idx, tr_lab, _, _) = self.chunk_inputs(chunk)
    state = self.population.place(self.initial_state(host_keys))
    for epoch in range(epochs):
      state, _ = self._epoch(state, epoch, keys, tr_idx, tr_lab)
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[0], self.population.gather(state))

  def _train_chunk(self, chunk: Chunk, path: str, bar, models_done: int,
                   before: list, after: list) -> modelset.ModelSet:
    """One chunk from its last checkpoint to the end: epochs, then the periodic actions."""
    pop = self.population
    ckpt = workdir.ckpt_dir(path, chunk.index)
    tasks, runs, host_keys, (keys, tr_idx, tr_lab, ev_idx, ev_lab) = self.chunk_inputs(chunk)
    workdir.check_chunk_plan(ckpt, chunk.index, self.chunk_size, chunk.rows.tolist())
    host_state = self.initial_state(host_keys)
    mngr = workdir.checkpoint_manager(ckpt)
    start_epoch = mngr.latest_step() or 0
    if start_epoch:
      host_state = workdir.restore(mngr, start_epoch, host_state, ckpt)
      logging.info('chunk %d: resumed from epoch %d checkpoint in %s (onto %d device(s))',
                   chunk.index, start_epoch, ckpt, len(pop.devices))
    state = pop.place(host_state)
    bar.update(start_epoch)
    evaluate = lambda st: pop.gather(self._eval(st, ev_idx, ev_lab, self.eval_images))['accuracy']
    hooks = [hooks_lib.Progress(bar, evaluate, self.execution.eval_every, models_done), *before,
             hooks_lib.Checkpoint(mngr, self.execution.checkpoint_every), *after]
    epochs = self.config.train.epochs
    for epoch in range(start_epoch, epochs):
      state, loss = self._epoch(state, epoch, keys, tr_idx, tr_lab)
      loss = loss[:chunk.n_real]
      if not np.all(np.isfinite(loss)):
        bad = [f'task {tasks[i]} run {runs[i]}' for i in np.flatnonzero(~np.isfinite(loss))]
        raise TrainingError(
            f'NaN/Inf training loss at epoch {epoch + 1} for {", ".join(bad[:5])}; lower '
            '--learning_rate. The last complete checkpoint is kept, so a rerun resumes there.')
      event = hooks_lib.EpochEnd(chunk.index, chunk.n_real, epoch + 1, epochs, state, loss,
                                 path, pop)
      for hook in hooks:
        hook(event)
      if event.stop and not event.last:
        mngr.close()
        raise TrainingStopped(f'stopped after the requested epochs; chunk {chunk.index} is '
                              f'checkpointed at epoch {event.done} in {ckpt}: rerun the same '
                              'command to resume (any device count).')
    mngr.close()
    acc = evaluate(state)
    host = pop.gather(state)
    keep = lambda x: np.asarray(x)[:chunk.n_real]
    return modelset.ModelSet(
        params=jax.tree_util.tree_map(keep, host['params']),
        batch_stats=jax.tree_util.tree_map(keep, host['batch_stats']),
        task_id=keep(tasks).astype(np.int32), run=keep(runs).astype(np.int32),
        seed=np.full(chunk.n_real, self.config.seed, np.int64),
        heldout_accuracy=keep(acc).astype(np.float32), config=self.config.to_json())


# A full disk, a read-only or quota-limited file system, a lost mount: the user's to fix.
_WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EIO)


def _progress_bar(total: int, enabled: bool):
  from tqdm import tqdm  # tfds already depends on tqdm.
  tty = sys.stderr.isatty()
  return tqdm(total=total, desc='epochs (all chunks)', disable=not enabled,
              mininterval=0.5 if tty else 30.0, file=sys.stderr, dynamic_ncols=True)
