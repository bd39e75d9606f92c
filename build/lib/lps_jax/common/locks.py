"""One writer per folder: an advisory `flock` on <folder>/.lock, held while a run writes there.

A second run on the same folder (a job launched twice, a requeued copy whose first copy still
runs) stops at once with a message naming the holder, instead of both writing and undoing each
other's files. The lock dies with its process, so a killed run never blocks the rerun. Used by
the trainer's work directory, lps_main's results folder and lps_query's index.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from lps_jax.common.errors import UserError

LOCK_NAME = '.lock'


class FolderBusy(UserError):
  """Another live process holds the folder's lock; the message names it and what to do."""


class Held:
  """This process's hold on a folder's lock; `close()` (or the end of the process) lets go.
  With `hold(..., reentrant=True)` holds taken again by the same process share one flock
  (counted), so a library user may open a results folder twice (a notebook cell run again)
  without locking themselves out."""

  def __init__(self, key: str):
    self.key, self.closed = key, False

  def close(self) -> None:
    if not self.closed:
      self.closed = True
      entry = _HELD[self.key]
      entry[1] -= 1
      if entry[1] == 0:
        entry[0].close()
        del _HELD[self.key]

  def __del__(self):
    self.close()


# This process's locks: real path -> [open lock file, holds, reentrant]. (flock belongs to an open file,
# so a second open by the same process would refuse itself.)
_HELD: dict[str, list] = {}


def hold(folder: str, what: str, flag: str, reentrant: bool = False) -> Held:
  """Takes the lock of `folder` (created if missing) until the returned hold is closed or the
  process ends. Raises FolderBusy if another process has it. `what` names the folder to the
  user ('workdir', 'results folder'), `flag` the flag to change. Without `reentrant`, a second
  hold by this same process is refused too (two trainers in one process)."""
  import fcntl
  os.makedirs(folder, exist_ok=True)
  key = os.path.realpath(folder)
  if key in _HELD and reentrant and _HELD[key][2]:
    _HELD[key][1] += 1
    return Held(key)
  f = open(os.path.join(folder, LOCK_NAME), 'a+')
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or 'unknown process'
    f.close()
    raise FolderBusy(f'{what} {folder!r} is in use by another run ({holder}); wait for it to '
                     f'finish, stop it, or use another {flag}.') from None
  f.seek(0)
  f.truncate()
  f.write(f'pid {os.getpid()} on {platform.node()}, since '
          f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
  f.flush()
  _HELD[key] = [f, 1, reentrant]
  return Held(key)


@contextlib.contextmanager
def exclusive(folder: str, what: str, flag: str):
  """`hold` for the duration of a with-block."""
  h = hold(folder, what, flag)
  try:
    yield
  finally:
    h.close()
