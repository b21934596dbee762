"""The device mesh every sharded step runs over: one ``data`` axis.

Train and eval steps are ``jax.shard_map`` functions over it; reductions over
``AXIS`` (``lax.pmean`` / ``psum``) make results global over devices and
processes, so they do not depend on the device count.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'data'


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """1-D mesh over ``devices`` (default: all). Auto axes: all computation happens
  inside shard_map, which states its own in/out partitioning, so nothing relies
  on sharding-in-types; arrays are still placed with explicit NamedShardings."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicate(tree, mesh):
  """``tree`` placed whole on every device of ``mesh``."""
  return jax.device_put(tree, NamedSharding(mesh, P()))
