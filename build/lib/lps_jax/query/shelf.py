"""Several indexes of one zoo in one folder (`--method=auto`), and the choice among them per
checkpoint: the index that knows the most labels, then the best method the checkpoint can feed.

`AUTO` is the decision table by what a checkpoint carries, best first, as measured on the
paper-recipe models (RESULTS.md, "The authors' published method and the chained-Gram kernel"):
a whole network -> `chain_kernel` (19 layers, BatchNorm's scale folded), conv layers 1-7 ->
`chain_kernel_stage1`, the first layer only -> `gram`.
"""
from __future__ import annotations

import os

from lps_jax.query import checkpoint_inputs as inputs_lib
from lps_jax.query import index as index_lib
from lps_jax.query.checkpoint_inputs import QueryError

AUTO = ('chain_kernel', 'chain_kernel_stage1', 'gram')


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
  most labels, ties broken by `AUTO` order (the order of `indexes`)."""
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
  return max(usable, key=lambda i: (len(i.labels), -indexes.index(i)))
