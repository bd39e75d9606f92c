"""Results directories: a folder of results tied to one configuration.

- `ResultsDir` guards a results folder: the first run writes `config.json`; a later run with a
  different configuration is refused (its results are never overwritten), one with the same
  configuration rewrites them (and reuses the cache).
- Finished pieces of work are kept in `common.cache.Cache` (content-addressed).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional


from lps_jax.common import files, locks
from lps_jax.common.cache import canonical
from lps_jax.common.errors import UserError


class ResultsError(UserError):
  """A results folder that cannot be used as asked; the message says what to do."""


def _read_json(path: str, remedy: str) -> Any:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ResultsError(f'{path} is corrupt ({e}); {remedy}.') from e


class ResultsDir:
  """A results folder tied to one configuration (a JSON-able dict), written to `config.json`."""

  CONFIG = 'config.json'

  def __init__(self, path: str, config: dict):
    self.path = path
    self.config = canonical(config)
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
    files.write_bytes(self.file(name), json.dumps(canonical(obj), indent=1).encode())

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
