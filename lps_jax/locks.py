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

LOCK_NAME = '.lock'


class FolderBusy(ValueError):
  """Another live process holds the folder's lock; the message names it and what to do."""


def hold(folder: str, what: str, flag: str):
  """Takes the lock of `folder` (created if missing) and returns the open lock file: the lock
  is held until it is closed or the process ends. Raises FolderBusy if another process has it.
  `what` names the folder to the user ('workdir', 'results folder'), `flag` the flag to change."""
  import fcntl
  os.makedirs(folder, exist_ok=True)
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
  return f


@contextlib.contextmanager
def exclusive(folder: str, what: str, flag: str):
  """`hold` for the duration of a with-block."""
  f = hold(folder, what, flag)
  try:
    yield
  finally:
    f.close()
