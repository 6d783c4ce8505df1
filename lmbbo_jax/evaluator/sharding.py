"""Device-mesh helpers for the evaluator: one data axis over all devices.

The evaluator is data parallel only: image batches and scoring rows are split
over one mesh axis (`DATA_AXIS`); weights are replicated. On a CPU there is one
device and every helper degenerates to plain placement.

The mesh axis is created with an explicit `AxisType.Auto`: the Flax towers rely
on the compiler propagating shardings through reshapes and gathers, which the
`Explicit` (sharding-in-types) mode would require us to spell out op by op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `DATA_AXIS` over `devices` (default: all devices)."""
  devices = list(devices) if devices is not None else jax.devices()
  if jax.process_count() > 1:  # Each process's rows contiguous (`process_rows`).
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def num_shards(mesh: Mesh) -> int:
  return int(mesh.shape[DATA_AXIS])


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (weights, small inputs)."""
  return NamedSharding(mesh, P())


def sharded_along(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
  """Split dimension `axis` of an `ndim`-D array over the data axis."""
  spec = [None] * ndim
  spec[axis] = DATA_AXIS
  return NamedSharding(mesh, P(*spec))


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _put(value: Any, target: NamedSharding) -> jax.Array:
  if target.is_fully_addressable:
    return jax.device_put(value, target)
  # Several processes: each places its own devices' part of a value they all hold.
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  target = replicated(mesh)
  if target.is_fully_addressable:
    return jax.device_put(tree, target)
  return jax.tree.map(lambda leaf: _put(leaf, target), tree)


def put_sharded(array: Any, mesh: Mesh, axis: int = 0) -> jax.Array:
  """Places `array` split along `axis` (whose size must divide by the mesh size)."""
  if array.shape[axis] % num_shards(mesh):
    raise ValueError(f"dimension {axis} of shape {array.shape} does not divide over "
                     f"{num_shards(mesh)} devices; pad it first (round_up)")
  return _put(array, sharded_along(mesh, array.ndim, axis))


def put_process_rows(local: np.ndarray, mesh: Mesh, global_rows: int) -> jax.Array:
  """A [global_rows, ...] array split over the data axis from each process's own rows
  (`process_rows`); on one process, `put_sharded`."""
  target = sharded_along(mesh, local.ndim)
  if target.is_fully_addressable:
    return jax.device_put(local, target)
  return jax.make_array_from_process_local_data(target, local,
                                                (global_rows, *local.shape[1:]))


def process_rows(mesh: Mesh, rows: int) -> tuple[int, int]:
  """The rows [start, stop) of a [rows, ...] array split over the data axis that this
  process's devices hold (all of them on one process)."""
  spans = {(s[0].start or 0, rows if s[0].stop is None else s[0].stop)
           for s in sharded_along(mesh, 1).addressable_devices_indices_map((rows,)).values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if stop - start != sum(b - a for a, b in spans):
    raise ValueError("this process's devices hold rows that are not contiguous on the mesh; "
                     "build it with `make_mesh`, which orders devices by process")
  return start, stop


def to_host(array: Any) -> np.ndarray:
  """The whole value of a (possibly several-process) array on this host.

  Collective when the array spans processes and is not replicated: every process
  must call it, in the same order.
  """
  if not isinstance(array, jax.Array) or array.is_fully_addressable:
    return np.asarray(array)
  if array.sharding.is_fully_replicated:
    return np.asarray(array.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))
