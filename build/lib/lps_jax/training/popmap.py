"""One mechanism to run a per-model function over a population of models, on a device mesh.

A population is M models whose values are stacked on a leading model axis. A `Population`
decides where each model lives and how a per-model function runs over all of them:

  loop    one jitted program per model; model m lives on device m % n of the mesh, and
          asynchronous dispatch keeps all devices busy at once (the CPU default);
  vmap    one jitted program: `jax.vmap` over each device's models inside `shard_map` over the
          mesh's model axis (the GPU / TPU default);
  unroll  as vmap, with the per-model function unrolled over each device's models.

Values live in the strategy's layout: for vmap / unroll a global array split over the mesh
(`NamedSharding`, one block of models per device, across processes after
`distributed.initialize`); for loop a `PerModel` list of per-model trees, each on its device.
`place` puts stacked host values into that layout, `gather` brings them back as stacked numpy
arrays (identical on every process) and `map` lifts a per-model function. The first-order
trainer, `align.align_population` and the second-order network's predictions all run through it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lps_jax.common.errors import UserError
from lps_jax.training import distributed

STRATEGIES = ('loop', 'vmap', 'unroll')
MODEL_AXIS = 'models'


def make_mesh(num_devices: int = 1) -> Mesh:
  """A 1-D mesh over the model axis: the first `num_devices` devices (all processes' devices
  when several processes take part)."""
  devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()
  if not 1 <= num_devices <= len(devices):
    raise UserError(f'a mesh of {num_devices} devices does not fit the {len(devices)} '
                     'available; lower --num_devices.')
  return Mesh(np.asarray(devices[:num_devices]), (MODEL_AXIS,))


@dataclasses.dataclass
class PerModel:
  """The loop strategy's layout of a stacked value: one tree per model, model m on its device."""
  models: list


@dataclasses.dataclass
class PerDevice:
  """The loop strategy's layout of a value every model shares: one copy per device."""
  copies: dict


def _take(tree, i: int):
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[i], tree)


class Population:
  """Runs per-model functions over stacked models with `strategy` on `mesh` (module doc)."""

  def __init__(self, strategy: str, mesh: Optional[Mesh] = None):
    if strategy not in STRATEGIES:
      raise UserError(f'unknown strategy {strategy!r}; choose from {STRATEGIES}.')
    mesh = mesh if mesh is not None else make_mesh(1)
    if len(mesh.axis_names) != 1:
      raise UserError(f'a population runs on a 1-D mesh, got axes {mesh.axis_names}.')
    if strategy == 'loop' and jax.process_count() > 1:
      raise UserError('the loop strategy runs in one process; use vmap or unroll.')
    self.strategy, self.mesh = strategy, mesh
    self.devices = list(mesh.devices.flat)
    self._models = NamedSharding(mesh, P(mesh.axis_names[0]))
    self._replicated = NamedSharding(mesh, P())

  def padded_size(self, n: int) -> int:
    """The smallest population >= n this strategy runs (vmap / unroll: a multiple of the
    mesh size, so every device holds the same number of models)."""
    if self.strategy == 'loop':
      return n
    return -(-n // len(self.devices)) * len(self.devices)

  def device_of(self, m: int):
    """The device model m lives on (loop layout; vmap / unroll: its block's device)."""
    return self.devices[m % len(self.devices)]

  def place(self, tree, shared: bool = False):
    """Stacked host values (leading model axis) into this strategy's layout; `shared=True`
    places a value every model uses (no model axis) on every device."""
    if self.strategy == 'loop':
      if shared:
        return PerDevice({d: jax.device_put(tree, d) for d in self.devices})
      n = jax.tree_util.tree_leaves(tree)[0].shape[0]
      return PerModel([jax.device_put(_take(tree, m), self.device_of(m)) for m in range(n)])
    return distributed.place(tree, self._replicated if shared else self._models)

  def gather(self, value):
    """Stacked numpy arrays of a population value (any layout), the same on every process."""
    if isinstance(value, PerModel):
      host = jax.device_get(value.models)
      return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *host)
    return distributed.to_host(value)

  def map(self, fn: Callable, in_axes: Sequence[Optional[int]],
          donate_argnums: tuple[int, ...] = (), compile: bool = True) -> Callable:
    """Lifts per-model `fn(*args)` to population values.

    `in_axes[i]` is 0 where argument i is a population value (one per model) and None where it
    is shared by every model (placed with `shared=True`, or a small array / scalar). A tuple
    output becomes a tuple of population values. `compile=False` (loop strategy only): `fn`
    is a Python function over jitted pieces and runs per model as it is, so its pieces stay
    separate programs, run model after model (one model's intermediates alive at a time).
    """
    in_axes = tuple(in_axes)
    if 0 not in in_axes:
      raise UserError('at least one argument must carry the model axis (in_axes 0).')
    if not compile and self.strategy != 'loop':
      raise UserError(f'compile=False runs per model: the loop strategy, not {self.strategy}.')
    if self.strategy == 'loop':
      return self._loop(fn if not compile else jax.jit(fn, donate_argnums=donate_argnums),
                        in_axes)
    if self.strategy == 'vmap':
      local = jax.vmap(fn, in_axes=in_axes)
    else:
      def local(*args):
        n = jax.tree_util.tree_leaves(args[in_axes.index(0)])[0].shape[0]
        outs = [fn(*[jax.tree_util.tree_map(lambda x: x[i], a) if ax == 0 else a
                     for a, ax in zip(args, in_axes)]) for i in range(n)]
        return jax.tree_util.tree_map(lambda *xs: jax.numpy.stack(xs), *outs)
    axis = self.mesh.axis_names[0]
    specs = tuple(P(axis) if ax == 0 else P() for ax in in_axes)
    sharded = jax.shard_map(local, mesh=self.mesh, in_specs=specs, out_specs=P(axis),
                            check_vma=False)
    return jax.jit(sharded, donate_argnums=donate_argnums, out_shardings=self._models)

  def _loop(self, jitted, in_axes):
    def run(*args):
      stacked = args[in_axes.index(0)]
      if not isinstance(stacked, PerModel):
        raise TypeError('the loop strategy takes PerModel values for in_axes 0 (Population.place).')
      outs = []
      for m in range(len(stacked.models)):
        dev = self.device_of(m)
        outs.append(jitted(*[a.models[m] if ax == 0 else
                             (a.copies[dev] if isinstance(a, PerDevice) else a)
                             for a, ax in zip(args, in_axes)]))
      if isinstance(outs[0], tuple):
        return tuple(PerModel([o[i] for o in outs]) for i in range(len(outs[0])))
      return PerModel(outs)
    run.jitted = jitted
    return run


def compiled_count(fn: Callable) -> int:
  """How many programs a `Population.map` function has compiled (tests catch recompiles)."""
  jitted = getattr(fn, 'jitted', fn)
  return jitted._cache_size()


def leading_size(tree: Any) -> int:
  return int(jax.tree_util.tree_leaves(tree)[0].shape[0])
