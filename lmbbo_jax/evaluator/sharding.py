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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `DATA_AXIS` over `devices` (default: all devices)."""
  devices = list(devices) if devices is not None else jax.devices()
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


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))


def put_sharded(array: Any, mesh: Mesh, axis: int = 0) -> jax.Array:
  """Places `array` split along `axis` (whose size must divide by the mesh size)."""
  if array.shape[axis] % num_shards(mesh):
    raise ValueError(f"dimension {axis} of shape {array.shape} does not divide over "
                     f"{num_shards(mesh)} devices; pad it first (round_up)")
  return jax.device_put(array, sharded_along(mesh, array.ndim, axis))
