"""Atomic writes, written once: a file (or folder) appears whole under its name or not at all.

The temporary path sits beside the target (same file system, so the rename is atomic), starts
with '.', and ends in `.tmp<pid>` + the caller's suffix, so `stale_temporaries` can find what a
killed process left behind.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from typing import Any, Iterator

TMP = '.tmp'


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = '') -> Iterator[str]:
  """Yields a temporary path beside `path`; when the block ends normally, the temporary file or
  folder replaces `path` in one rename (an existing folder is moved aside first, then removed).
  On an error the temporary path is removed and `path` is untouched. `suffix` keeps writers that
  append their own extension (np.save: '.npy', np.savez: '.npz') writing where told."""
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, f'.{name}{TMP}{os.getpid()}-{uuid.uuid4().hex[:6]}{suffix}')
  try:
    yield tmp
    if os.path.isdir(path) and not os.path.islink(path):
      old = os.path.join(folder, f'.{name}.old{TMP}{os.getpid()}-{uuid.uuid4().hex[:6]}')
      os.replace(path, old)
      os.replace(tmp, path)
      _remove(old)
    else:
      os.replace(tmp, path)
  finally:
    _remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  with atomic_path(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, obj: Any, indent: int = 1) -> None:
  write_text(path, json.dumps(obj, indent=indent))


def stale_temporaries(folder: str, pattern: str = '*') -> list[str]:
  """The temporaries `atomic_path` left in `folder` (matching `pattern`) when its process was
  killed mid-write."""
  return glob.glob(os.path.join(folder, f'.{pattern}{TMP}*'))


def remove_stale_temporaries(folder: str, pattern: str = '*') -> list[str]:
  stale = stale_temporaries(folder, pattern)
  for p in stale:
    _remove(p)
  return stale
