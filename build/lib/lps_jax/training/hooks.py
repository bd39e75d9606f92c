"""Periodic actions of the trainer, as hooks (big_vision's periodic actions).

After every epoch of a chunk the trainer builds an `EpochEnd` (what the hooks may read: the
chunk, the epochs done, the placed state, the training loss) and calls its hooks in order:
progress (with the held-out evaluation), the stop budget, any hooks the caller supplies (the
slices' trajectory recorder: `zoo.slice_folder.TrajectoryRecorder`), the checkpoint, and the
`on_epoch_end` callback. A hook that asks to stop (`EpochEnd.stop = True`) makes the checkpoint
save now; the trainer then raises `workdir.TrainingStopped`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol

import numpy as np
import orbax.checkpoint as ocp

from lps_jax.training import distributed, popmap


@dataclasses.dataclass
class EpochEnd:
  """One finished epoch of one chunk, as the hooks see it."""
  chunk_index: int
  n_real: int                    # real models in the chunk (the rest are padding)
  done: int                      # epochs done
  epochs: int                    # epochs in the recipe
  state: Any                     # the chunk's placed training state (gather is collective)
  loss: np.ndarray               # (n_real,) mean training loss of the epoch
  workdir: str
  population: popmap.Population
  stop: bool = False             # set by a hook: checkpoint now, then stop

  def host_state(self) -> dict:
    """The chunk's state on the host (collective: every process calls it)."""
    return self.population.gather(self.state)

  @property
  def last(self) -> bool:
    return self.done == self.epochs


class Hook(Protocol):
  def __call__(self, epoch: EpochEnd) -> None:
    """Acts on a finished epoch; may set `epoch.stop`."""


class Progress:
  """The progress bar; the held-out accuracy every `eval_every` epochs and at the end."""

  def __init__(self, bar, evaluate: Callable[[Any], np.ndarray], eval_every: int,
               models_done: int):
    self.bar, self.evaluate, self.eval_every = bar, evaluate, eval_every
    self.models_done = models_done

  def __call__(self, epoch: EpochEnd) -> None:
    postfix = {'chunk': epoch.chunk_index + 1, 'models_done': self.models_done,
               'loss': f'{epoch.loss.mean():.3f}'}
    if epoch.done % self.eval_every == 0 or epoch.last:
      postfix['heldout_acc'] = f'{self.evaluate(epoch.state)[:epoch.n_real].mean():.3f}'
    self.bar.set_postfix(postfix, refresh=False)
    self.bar.update(1)


class StopAfter:
  """Asks to stop after `epochs` epochs trained in this call (all chunks; None: never)."""

  def __init__(self, epochs: Optional[int]):
    self.left = epochs

  def __call__(self, epoch: EpochEnd) -> None:
    if self.left is not None:
      self.left -= 1
      epoch.stop = epoch.stop or self.left <= 0


class Checkpoint:
  """Saves the chunk's state every `every` epochs, and whenever a hook asked to stop (never
  after the last epoch: the finished chunk is saved as a model set instead)."""

  def __init__(self, manager: ocp.CheckpointManager, every: int):
    self.manager, self.every = manager, every

  def __call__(self, epoch: EpochEnd) -> None:
    if not epoch.last and (epoch.done % self.every == 0 or epoch.stop):
      self.manager.save(epoch.done, args=ocp.args.StandardSave(epoch.host_state()))
      self.manager.wait_until_finished()


class Callback:
  """`fn(chunk_index, epochs_done)` after the epoch and its checkpoint."""

  def __init__(self, fn: Callable[[int, int], None]):
    self.fn = fn

  def __call__(self, epoch: EpochEnd) -> None:
    self.fn(epoch.chunk_index, epoch.done)


def is_writer() -> bool:
  """Whether this process writes (hooks gather on every process, one writes)."""
  return distributed.is_primary()
