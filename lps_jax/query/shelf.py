"""Several indexes of one zoo in one folder (`--method=auto`), and the choice among them per
checkpoint: the index that knows the most labels, then the one that names the zoo's own models
best, then the decision table.

"Names the zoo's own models best" is each index's measured top-1 on the held-out models of its
calibration folds (`open_set.Calibration.seen_top1`), compared when every tied index has one:
the choice follows what was measured on the zoo the user gave. Without calibrations, `AUTO`
decides, in the order Table 1 measured on the paper-recipe models (RESULTS.md, "Which method to
use": the first layer's `gram` 88.6 % 35-way and 87.5 % on the 20 whole tasks, against
`chain_kernel_stage1` 80.0 / 85.0 % and the 19-layer `chain_kernel` 80.8 %).
"""
from __future__ import annotations

import os

from lps_jax.query import checkpoint_inputs as inputs_lib
from lps_jax.query import index as index_lib
from lps_jax.query.checkpoint_inputs import QueryError

AUTO = ('gram', 'chain_kernel_stage1', 'chain_kernel')


def is_shelf(path: str) -> bool:
  return os.path.isdir(path) and not os.path.exists(os.path.join(path, 'index.json'))


def load(path: str) -> list[index_lib.Index]:
  """The indexes in the subfolders of `path` (one per method), in `AUTO` order first."""
  names = [] if not os.path.isdir(path) else sorted(
      d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, 'index.json')))
  if not names:
    raise QueryError(f'no indexes under {path!r}: build them with python -m '
                     'experiments.lps_query --build --method=auto --index=PATH.')
  names.sort(key=lambda n: AUTO.index(n) if n in AUTO else len(AUTO))
  return [index_lib.load(os.path.join(path, n)) for n in names]


def choose(indexes: list, checkpoint, layout: str = 'auto') -> index_lib.Index:
  """The index to answer `checkpoint` with: of those whose needs it satisfies, the one with the
  most labels; ties go to the best measured top-1 on the zoo when every tied index is
  calibrated, then to `AUTO` order (the order of `indexes`)."""
  origin = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else 'arrays'
  arrays = inputs_lib.arrays_of(checkpoint, origin)
  if isinstance(checkpoint, (str, os.PathLike)) and layout == 'auto':
    from lps_jax.zoo import foreign_checkpoints
    layout = foreign_checkpoints.default_layout(origin)
  have = inputs_lib.carries(arrays, layout, origin)
  usable = [i for i in indexes if i.needs.satisfied_by(have)]
  if not usable:
    raise QueryError(f'{origin}: carries {have.describe()}; none of the indexes '
                     f'({", ".join(i.method for i in indexes)}) reads that little.')
  most = max(len(i.labels) for i in usable)
  tied = [i for i in usable if len(i.labels) == most]
  measured = all(i.calibration is not None for i in tied)
  return max(tied, key=lambda i: (i.calibration.seen_top1 if measured else 0.0,
                                  -indexes.index(i)))
