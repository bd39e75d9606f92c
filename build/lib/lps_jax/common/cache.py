"""A content-addressed cache of finished work.

`Cache` stores finished pieces (trained second-order networks, whole-network alignments, probe
outputs, feature statistics) under the SHA-256 of a JSON key that names everything they depend
on, so a hit can only come from the same inputs and a killed run resumes where it stopped.
Writes are atomic (`common.files`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Optional

import numpy as np

from lps_jax.common import files


def canonical(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): canonical(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [canonical(v) for v in obj]
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  return obj


def digest(key: Any) -> str:
  """SHA-256 (hex, first 20 chars) of a JSON-able key."""
  text = json.dumps(canonical(key), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def fingerprint(*arrays: np.ndarray) -> str:
  """Content hash of arrays (shape, dtype and bytes): identifies a model set's data."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f'{a.shape}{a.dtype}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()[:20]


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
                  json.dumps(canonical(key), indent=1, sort_keys=True).encode())

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
                  json.dumps(canonical(key), indent=1, sort_keys=True).encode())
    return out
