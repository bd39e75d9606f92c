"""Several processes (hosts, or one process per GPU) as one JAX system.

Every process runs the same program (multi-controller JAX). After `initialize`, `jax.devices()`
lists the devices of all processes; a `Mesh` over them and `NamedSharding` split the model axis
of a population, and `place` builds a global array from host data so that each process only
transfers its own shards ("each host feeds its own shard"). Results are read back with
`to_host` (an all-gather where arrays span processes); only the primary process writes files.

Launch (one process per host, or per GPU with --num_cpu_devices / CUDA_VISIBLE_DEVICES):
  python -m experiments.train_population ... --coordinator_address=HOST0:12345 \
      --num_processes=N --process_id=i        # i = 0..N-1, HOST0 runs process 0
or, under SLURM / Open MPI / TPU pods, --distributed=auto (the cluster's auto-detection).
"""
from __future__ import annotations

import socket
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from lps_jax.common.errors import UserError


class DistributedError(UserError, RuntimeError):
  """A multi-process setup that cannot start; the message says what to do."""


def _reachable(address: str, timeout_s: float) -> bool:
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return True
    except OSError:
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.25)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = False,
               timeout_s: int = 120) -> bool:
  """Starts the distributed system; returns whether several processes now take part.

  Without a coordinator and without `auto` it does nothing (a single process). Any process
  but 0 first waits up to `timeout_s` for the coordinator's port, so a wrong address fails in
  bounded time with a clear message instead of hanging.
  """
  if not coordinator_address and not auto:
    if num_processes not in (None, 0, 1) or process_id not in (None, 0):
      raise DistributedError('--num_processes / --process_id need --coordinator_address '
                             '(host:port of process 0) or --distributed=auto.')
    return False
  if coordinator_address:
    if ':' not in coordinator_address:
      raise DistributedError(f'coordinator address {coordinator_address!r} must be host:port.')
    if num_processes is None or process_id is None:
      raise DistributedError('with --coordinator_address give --num_processes and --process_id '
                             '(0 on the coordinator host).')
    if not 0 <= process_id < num_processes:
      raise DistributedError(f'process_id {process_id} is not in [0, {num_processes}).')
    if process_id != 0 and not _reachable(coordinator_address, timeout_s):
      raise DistributedError(
          f'cannot reach the coordinator at {coordinator_address} within {timeout_s} s: start '
          'process 0 there first, and check the host name, port and firewall.')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(timeout_s))
  except Exception as e:  # jax raises RuntimeError / XlaRuntimeError variants here.
    raise DistributedError(
        f'jax.distributed.initialize failed ({type(e).__name__}: {str(e)[:300]}); check that '
        f'all {num_processes or "the"} processes were started with the same coordinator '
        'address and distinct --process_id values.') from e
  return jax.process_count() > 1


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def place(tree, sharding: NamedSharding):
  """Global arrays with `sharding` from host values every process holds in full.

  Each process transfers only the shards its own devices hold.
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree_util.tree_map(one, tree)


def to_host(tree):
  """numpy copies of (possibly cross-process) arrays, identical on every process."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(one, tree)
