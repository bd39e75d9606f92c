"""Results directories and a content-addressed cache of finished work.

- `ResultsDir` guards a results folder: the first run writes `config.json`; a later run with a
  different configuration is refused (its results are never overwritten), one with the same
  configuration rewrites them (and reuses the cache).
- `Cache` stores finished pieces (trained second-order networks, feature statistics) under the
  SHA-256 of a JSON key that names everything they depend on, so a hit can only come from the
  same inputs and a killed run resumes where it stopped. Writes are atomic (tmp + rename).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Optional

import numpy as np

from lps_jax.common import locks
from lps_jax.common import files
from lps_jax.common.errors import UserError


class ResultsError(UserError):
  """A results folder that cannot be used as asked; the message says what to do."""


def _canonical(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _canonical(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_canonical(v) for v in obj]
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  return obj


def digest(key: Any) -> str:
  """SHA-256 (hex, first 20 chars) of a JSON-able key."""
  text = json.dumps(_canonical(key), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def fingerprint(*arrays: np.ndarray) -> str:
  """Content hash of arrays (shape, dtype and bytes): identifies a model set's data."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f'{a.shape}{a.dtype}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()[:20]


def _read_json(path: str, remedy: str) -> Any:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ResultsError(f'{path} is corrupt ({e}); {remedy}.') from e


class Cache:
  """Content-addressed store: `get_bytes` / `put_bytes` and `arrays` (compute once, npz)."""

  def __init__(self, root: str):
    self.root = root
    os.makedirs(root, exist_ok=True)

  def _path(self, key: Any, suffix: str) -> str:
    return os.path.join(self.root, digest(key) + suffix)

  def get_bytes(self, key: Any) -> Optional[bytes]:
    path = self._path(key, '.bin')
    if not os.path.exists(path):
      return None
    with open(path, 'rb') as f:
      return f.read()

  def put_bytes(self, key: Any, data: bytes) -> None:
    files.write_bytes(self._path(key, '.bin'), data)
    files.write_bytes(self._path(key, '.json'),
                  json.dumps(_canonical(key), indent=1, sort_keys=True).encode())

  def arrays(self, key: Any, compute: Callable[[], dict]) -> dict:
    """`compute()` (a dict of arrays) once per key; later calls load the stored npz."""
    path = self._path(key, '.npz')
    if os.path.exists(path):
      try:
        with np.load(path) as f:
          return {k: f[k] for k in f.files}
      except (OSError, ValueError):  # Corrupt (e.g. a disk filled mid-write): recompute.
        os.remove(path)
    out = compute()
    with files.atomic_path(path, '.npz') as tmp:
      np.savez(tmp, **out)
    files.write_bytes(self._path(key, '.json'),
                  json.dumps(_canonical(key), indent=1, sort_keys=True).encode())
    return out


class ResultsDir:
  """A results folder tied to one configuration (a JSON-able dict), written to `config.json`."""

  CONFIG = 'config.json'

  def __init__(self, path: str, config: dict):
    self.path = path
    self.config = _canonical(config)
    cfg_path = os.path.join(path, self.CONFIG)
    # Held until this object goes (the run ends): a second run on the folder stops at once
    # (this process may open it again).
    self._lock = locks.hold(path, 'results folder', '--results_dir', reentrant=True)
    if set(os.listdir(path)) - {locks.LOCK_NAME}:
      if not os.path.exists(cfg_path):
        raise ResultsError(f'{path} is not empty and has no {self.CONFIG}: it is not a results '
                           'folder of lps_main; pass an empty or new --results_dir.')
      old = _read_json(cfg_path, 'move the folder away and rerun')
      if old != self.config:
        diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
        raise ResultsError(
            f'{path} holds results of a different configuration (differs in {diff}: '
            + '; '.join(f'{k}: {old.get(k)!r} there, {self.config.get(k)!r} now' for k in diff[:4])
            + '). Pass another --results_dir, or delete that folder to replace its results.')
    files.write_bytes(cfg_path, json.dumps(self.config, indent=1, sort_keys=True).encode())

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def write_json(self, name: str, obj: Any) -> None:
    files.write_bytes(self.file(name), json.dumps(_canonical(obj), indent=1).encode())

  def write_text(self, name: str, text: str) -> None:
    files.write_bytes(self.file(name), text.encode())


def read_results(path: str, mode: Optional[str] = None) -> dict:
  """Loads `results.json` of a finished run (for re-plotting), checking its mode."""
  file = os.path.join(path, 'results.json')
  if not os.path.exists(file):
    raise ResultsError(f'{path} holds no results.json: run the experiment first (without '
                       '--replot), or point --results_dir at a finished run.')
  res = _read_json(file, 'rerun the experiment to rewrite it')
  if mode is not None and res.get('mode') != mode:
    raise ResultsError(f'{file} holds a {res.get("mode")!r} run, not {mode!r}; pass the '
                       'matching --mode or --results_dir.')
  return res
