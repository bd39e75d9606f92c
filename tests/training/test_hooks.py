"""The trainer's periodic actions (lps_jax.training.hooks): the stop budget spans chunks, a
checkpoint is written every N epochs and whenever a hook asks to stop, never after the last
epoch (the finished chunk becomes a model set)."""
import numpy as np

from lps_jax.training import hooks


class _Manager:
  def __init__(self):
    self.saved = []

  def save(self, step, args):
    self.saved.append(step)

  def wait_until_finished(self):
    pass


class _Population:
  def gather(self, state):
    return state


def _epoch(done, epochs=6, chunk=0):
  return hooks.EpochEnd(chunk, 2, done, epochs, {'x': np.zeros(2)}, np.zeros(2), '/tmp',
                        _Population())


def test_checkpoints_every_n_and_on_stop_but_never_after_the_last_epoch():
  manager, stop = _Manager(), hooks.StopAfter(None)
  save = hooks.Checkpoint(manager, every=2)
  for done in range(1, 7):
    e = _epoch(done)
    stop(e)
    save(e)
  assert manager.saved == [2, 4]
  manager, stop = _Manager(), hooks.StopAfter(3)
  save, stopped = hooks.Checkpoint(manager, every=2), []
  for chunk in range(2):               # the budget counts epochs of this call, across chunks
    for done in range(1, 3):
      e = _epoch(done, epochs=2, chunk=chunk)
      stop(e)
      save(e)
      stopped.append(e.stop)
  assert stopped == [False, False, True, True]
  assert manager.saved == [1]          # chunk 1, epoch 1: the stop's own checkpoint


def test_callback_and_progress_see_the_epoch():
  seen = []
  hooks.Callback(lambda chunk, done: seen.append((chunk, done)))(_epoch(3, chunk=1))
  assert seen == [(1, 3)]

  class _Bar:
    def __init__(self):
      self.postfix, self.n = None, 0

    def set_postfix(self, postfix, refresh):
      self.postfix = postfix

    def update(self, n):
      self.n += n

  bar = _Bar()
  progress = hooks.Progress(bar, lambda state: np.array([0.5, 1.0, 0.0]), eval_every=2,
                            models_done=4)
  progress(_epoch(1))
  assert 'heldout_acc' not in bar.postfix and bar.n == 1
  progress(_epoch(2))
  assert bar.postfix['heldout_acc'] == '0.750' and bar.postfix['models_done'] == 4
