"""Spread independent problems (the layer axis) over several devices.

Every layer / module is an independent decomposition, so the natural split is
the leading (problem) axis. :func:`map_over_layers` wraps a *batched* function
``fn(x[B, ...]) -> pytree of [B, ...]`` (typically ``jax.vmap`` of a
single-problem solver) with ``jax.shard_map`` over a 1-D :class:`jax.sharding.Mesh`:

* the batch is padded to a multiple of the device count (by repeating the last
  problem, which is always a valid problem) and placed with a
  ``NamedSharding(mesh, P(axis))``;
* each device runs its own shard's ``while_loop`` to its own convergence — no
  collective and no host round-trip inside the loop, so devices never wait for
  each other's iterations and the same code runs on CPU, GPU and TPU;
* results are sliced back to the original batch size (XLA decides their final
  placement; the solve itself ran sharded).

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX
is imported) gives N host devices to try this on.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from clair_jax import sharding
    >>> f = sharding.map_over_layers(jax.vmap(lambda a: jnp.linalg.norm(a, ord=2)))
    >>> f(jnp.ones((3, 4, 5))).shape
    (3,)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["layer_mesh", "layer_sharding", "pad_layers", "map_over_layers"]

AXIS = "layers"


def layer_mesh(devices=None, axis_name=AXIS):
    """A 1-D mesh over ``devices`` (default: all devices of the default backend)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def layer_sharding(mesh, ndim, axis_name=AXIS):
    """NamedSharding that splits axis 0 of an ``ndim``-dimensional array over the mesh."""
    return NamedSharding(mesh, PartitionSpec(axis_name, *([None] * (ndim - 1))))


def pad_layers(x, multiple):
    """Pad axis 0 of ``x`` to a multiple of ``multiple`` by repeating its last entry."""
    extra = (-x.shape[0]) % multiple
    if extra == 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0)


def map_over_layers(fn, mesh=None, axis_name=AXIS):
    """Shard a batched function over the leading (layer) axis of its arguments.

    Args:
        fn: ``fn(*arrays) -> pytree``; every argument and every output leaf has the
            problem axis first, and problems are independent (e.g. ``jax.vmap(solve)``).
        mesh: a 1-D :class:`Mesh` (default :func:`layer_mesh` over all devices).
        axis_name: the mesh axis name.

    Returns:
        A jitted function with the same signature; outputs are sharded over the mesh.
        With a single device it is just ``jax.jit(fn)``.
    """
    mesh = layer_mesh(axis_name=axis_name) if mesh is None else mesh
    n_dev = mesh.devices.size
    if n_dev == 1:
        return jax.jit(fn)
    spec = PartitionSpec(axis_name)
    # check_vma=False: the wrapped function is free to use while_loop/cond on
    # per-shard data (each device converges on its own).
    local = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)

    @jax.jit
    def padded(*arrays):
        size = arrays[0].shape[0]
        arrays = [jax.lax.with_sharding_constraint(pad_layers(a, n_dev), layer_sharding(mesh, a.ndim, axis_name))
                  for a in arrays]
        out = local(*arrays)
        return jax.tree_util.tree_map(lambda leaf: leaf[:size], out)

    return padded
