"""What an index reads of a checkpoint (`Needs`), and reading it: conv kernels for a method that
reads kernels, the whole network (every parameter, BatchNorm statistics where the method reads
them) for a whole-network method. A checkpoint that lacks what an index needs is refused in one
line naming the methods whose indexes would take it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import numpy as np

from lps_jax.common.errors import UserError
from lps_jax.methods import registry as methods
from lps_jax.training import resnet
from lps_jax.zoo import foreign_checkpoints as checkpoints
from lps_jax.zoo import network_arrays

Checkpoint = Union[str, os.PathLike, dict, Sequence[np.ndarray]]   # path, arrays, HWIO kernels


class QueryError(UserError):
  """A missing or damaged index folder, or a query that does not fit it."""


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a method's index reads of each model."""
  num_layers: int               # conv layers, network order (kernel readers)
  whole: bool = False           # every parameter, mapped onto the Flax ResNet
  statistics: bool = False      # and BatchNorm's running statistics

  @staticmethod
  def of(method: str, config) -> 'Needs':
    m = methods.get(method)
    if m.reads_probe_outputs:
      raise QueryError(f'{method} reads the models\' outputs, which a checkpoint does not hold; '
                       'an index needs a weight-space method.')
    return Needs(m.num_layers(config), m.reads_networks, m.reads_statistics)

  def describe(self) -> str:
    if self.whole:
      return 'every parameter' + (' and BatchNorm running statistics' if self.statistics else '')
    return 'conv layer 1' if self.num_layers == 1 else f'conv layers 1-{self.num_layers}'

  def satisfied_by(self, carries: 'Needs') -> bool:
    if self.whole:      # a whole network of any depth
      return carries.whole and (carries.statistics or not self.statistics)
    return carries.num_layers >= self.num_layers


def indexable() -> list[str]:
  """The methods an index can be built with."""
  return [n for n, m in methods.REGISTRY.items() if m.indexable]


def arrays_of(checkpoint: Checkpoint, origin: str) -> dict:
  if isinstance(checkpoint, (str, os.PathLike)):
    return checkpoints.read_arrays(os.fspath(checkpoint))
  if isinstance(checkpoint, dict):
    return checkpoint
  return {f'conv{i}/kernel': np.asarray(k) for i, k in enumerate(checkpoint)}


def carries(arrays: dict, layout: str, origin: str) -> Needs:
  """What a checkpoint's arrays hold, in `Needs` terms."""
  try:
    flat, _ = network_arrays.to_flax(arrays, origin)
    whole, stats = True, network_arrays.has_statistics(flat)
  except UserError:
    whole = stats = False
  layout = 'hwio' if layout == 'auto' else layout
  spatial = slice(0, 2) if layout == 'hwio' else slice(2, 4)
  convs = sum(1 for a in arrays.values() if np.ndim(a) == 4 and np.shape(a)[spatial] == (3, 3))
  return Needs(convs, whole, stats)


def refuse(origin: str, needs: Needs, method: str, have: Needs, why: str, config) -> QueryError:
  takers = [n for n in indexable() if Needs.of(n, config).satisfied_by(have)]
  return QueryError(f'{origin}: the {method} index reads {needs.describe()}, which this '
                    f'checkpoint does not carry ({why}); indexes of '
                    f'{", ".join(takers) or "no method"} take it.')


def read(checkpoint: Checkpoint, needs: Needs, method: str, config, layout: str = 'auto',
         layers: Optional[Sequence[str]] = None, origin: Optional[str] = None):
  """(what the index reads of one model, the names it came from): a list of HWIO kernels, or
  (flat Flax variables, ResNetConfig) for a whole-network index."""
  origin = origin or (os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike))
                      else 'arrays')
  arrays = arrays_of(checkpoint, origin)
  if isinstance(checkpoint, (str, os.PathLike)) and layout == 'auto':
    layout = checkpoints.default_layout(os.fspath(checkpoint))
  layout = 'hwio' if layout == 'auto' else layout
  if needs.whole:
    try:
      flat, model = network_arrays.to_flax(arrays, origin)
    except UserError as e:
      raise refuse(origin, needs, method, carries(arrays, layout, origin),
                   str(e).split(': ', 1)[-1].rstrip('.'), config) from e
    if needs.statistics and not network_arrays.has_statistics(flat):
      raise refuse(origin, needs, method,
                   Needs(len(resnet.conv_layer_names(model)), True, False),
                   'no BatchNorm running statistics', config)
    if not needs.statistics:
      flat = {p: a for p, a in flat.items() if not p.startswith(network_arrays.STATS)}
    return (flat, model), [f'the whole network ({len(flat)} variables)']
  try:
    kernels, names = checkpoints.conv_kernels(arrays, needs.num_layers, layout, layers,
                                              origin=origin)
  except checkpoints.CheckpointError as e:
    if layers:
      raise
    raise refuse(origin, needs, method, carries(arrays, layout, origin),
                 str(e).split(': ', 1)[-1].rstrip('.'), config) from e
  return kernels, names


def stack(items: Sequence, needs: Needs, origins: Sequence[str]):
  """The method inputs of many models read by `read` (one architecture)."""
  if needs.whole:
    models = {dataclasses.astuple(m) for _, m in items}
    if len(models) > 1:
      raise QueryError(f'the models are of {len(models)} architectures (widths, blocks, classes: '
                       f'{sorted(models)[:3]}); a whole-network index reads one.')
    return network_arrays.stack([f for f, _ in items], items[0][1], origins)
  shapes = {}
  for k, o in zip(items, origins):
    shapes.setdefault(tuple(x.shape for x in k), []).append(o)
  if len(shapes) > 1:
    desc = '; '.join(f'{len(v)} with layer 1 {s[0]} (e.g. {v[0]})' for s, v in shapes.items())
    raise QueryError(f'the models mix architectures ({desc}); an index reads one: split the zoo '
                     'by architecture.')
  return [np.stack([k[l] for k in items]) for l in range(needs.num_layers)]
