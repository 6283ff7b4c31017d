"""Spread independent problems (the layer axis) over several devices.

Every layer / module is an independent decomposition, so the natural split is
the leading (problem) axis. :func:`map_over_layers` takes a *single-problem*
function ``fn(x[...]) -> pytree`` and runs it over ``x[B, ...]`` with
``jax.shard_map`` over a 1-D :class:`jax.sharding.Mesh`:

* the batch is padded to a multiple of the device count (by repeating the last
  problem, which is always a valid problem) and placed with a
  ``NamedSharding(mesh, P(axis))``;
* each device runs its own problems to their own convergence — no collective
  and no host round-trip inside the loop, so devices never wait for each other's
  iterations and the same code runs on CPU, GPU and TPU;
* within a device the problems are batched with ``jax.vmap`` (GPU/TPU: one
  batched SVD per iteration) or, on CPU, run one after another with
  ``jax.lax.map``: with several host devices, a vmapped ``while_loop`` holding
  an SVD was found to hang XLA:CPU (jax 0.10.2; a fixed-trip loop or a
  sequential map does not), and batching buys nothing on CPU anyway;
* results are sliced back to the original batch size.

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX
is imported) gives N host devices to try this on.

:func:`clair_jax.clair` does not use this module: with several host devices a
sharded program holding its nested λ-path and solver loops hung XLA:CPU
(jax 0.10.2). ``cj.clair(..., devices=...)`` instead runs one single-device
program per device on its own chunk of problems (concurrently on accelerators,
one after another on CPU host devices, where concurrent programs hung too).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from clair_jax import sharding
    >>> f = sharding.map_over_layers(lambda a: jnp.linalg.norm(a, ord=2))
    >>> f(jnp.ones((3, 4, 5))).shape
    (3,)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clair_jax._compile import program

__all__ = ["layer_mesh", "layer_sharding", "pad_layers", "take_problems", "join_problems", "map_over_layers", "over_problems", "shard_problems"]


def over_problems(fn, how="auto", *, batch=None, platform=None, mesh=None, axis_name=None):
    """Run a single-problem ``fn(*xs)`` over the leading axis of its arguments (pytrees).

    ``how``: ``"vmap"`` (one batched computation: what accelerators want),
    ``"map"`` (``jax.lax.map``, one problem after another), ``"chunks"``
    (``jax.lax.map(..., batch_size=batch)``: consecutive chunks of ``batch``
    problems, each chunk one ``vmap``), or ``"auto"``: ``"map"`` on CPU, ``"vmap"`` elsewhere. A vmapped
    ``while_loop`` runs until its slowest member has converged (finished members
    are carried unchanged, so every member's answer is its own), and the partial
    SVT's fallback SVD is paid by the whole batch whenever one member needs it;
    in exchange every kernel works on ``batch`` problems at once, so per-kernel
    overheads are paid once per chunk and the kernels are large enough for
    XLA:CPU's thread pool to use several cores.

    ``batch``: chunk size for ``"chunks"`` (required there, ≥ 1): ``jax.lax.map``'s
    ``batch_size`` (a remainder of fewer problems is one more vmapped chunk);
    ``batch=1`` is ``"map"``.

    ``mesh``: a 1-D :class:`Mesh` splits the problems over its devices first
    (:func:`shard_problems`); each device then runs its share as above.
    Values ``fn`` closes over are replicated on every device.

    Example:
        >>> import jax.numpy as jnp
        >>> from clair_jax import sharding
        >>> f = sharding.over_problems(lambda a: jnp.sum(a * a), "chunks", batch=2)
        >>> f(jnp.arange(5.0)).tolist()
        [0.0, 1.0, 4.0, 9.0, 16.0]
    """
    if how not in ("auto", "vmap", "map", "chunks"):
        raise ValueError(f"how must be 'auto', 'vmap', 'map' or 'chunks', got {how!r}")
    if how == "chunks" and (batch is None or int(batch) != batch or batch < 1):
        raise ValueError(f"how='chunks' needs an integer batch >= 1, got batch={batch!r}")
    if mesh is not None:
        local = over_problems(fn, how, batch=batch, platform=mesh.devices.flat[0].platform)
        return shard_problems(local, mesh, axis_name or mesh.axis_names[0])
    if how == "auto":
        platform = platform or jax.default_backend()
        how = "map" if platform == "cpu" else "vmap"
    if how == "vmap":
        return jax.vmap(fn)
    if how == "chunks" and batch > 1:
        # jax.lax.map's batch_size: consecutive chunks, each one vmap, the remainder vmapped after.
        return _without_empty(lambda g, xs: jax.lax.map(lambda a: g(*a), xs, batch_size=int(batch)), fn)
    return lambda *xs: jax.lax.map(lambda a: fn(*a), xs)


def _without_empty(mapper, fn):
    """``mapper(g, xs)`` over the leaves that hold data: empty inputs and outputs (a
    zero-width basis, say) are rebuilt as zeros around it, since jax.lax.map's
    ``batch_size`` cannot reshape an array of size 0 (its -1 axis divides by zero)."""
    def run(*xs):
        leaves, tree = jax.tree_util.tree_flatten(xs)
        n = leaves[0].shape[0]
        empty = [leaf.size == 0 for leaf in leaves]
        specs = [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype) for leaf in leaves]

        def one(*kept):
            kept = iter(kept)
            rebuilt = [jnp.zeros(spec.shape, spec.dtype) if e else next(kept) for spec, e in zip(specs, empty)]
            return fn(*jax.tree_util.tree_unflatten(tree, rebuilt))

        full = [leaf for leaf, e in zip(leaves, empty) if not e]
        outs, out_tree = jax.tree_util.tree_flatten(jax.eval_shape(one, *[specs[i] for i, e in enumerate(empty)
                                                                         if not e]))
        out_empty = [math.prod(o.shape) == 0 for o in outs]

        def g(*kept):
            return tuple(o for o, e in zip(jax.tree_util.tree_leaves(one(*kept)), out_empty) if not e)

        mapped = iter(mapper(g, tuple(full)))
        return jax.tree_util.tree_unflatten(out_tree, [jnp.zeros((n,) + o.shape, o.dtype) if e else next(mapped)
                                                       for o, e in zip(outs, out_empty)])
    return run


def shard_problems(batched, mesh, axis_name):
    """``batched(*xs)`` (problems on the leading axis of every leaf) split over ``mesh``.

    The problem axis is padded to a multiple of the device count by repeating the
    last problem (always a valid problem), each device runs ``batched`` on its
    share to its own convergence (no collective, no host round-trip), and the
    results are sliced back.
    """
    n_dev = mesh.devices.size
    spec = PartitionSpec(axis_name)
    # check_vma=False: the wrapped function is free to use while_loop/cond on
    # per-shard data (each device converges on its own).
    local = jax.shard_map(batched, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)

    def run(*xs):
        size = jax.tree_util.tree_leaves(xs)[0].shape[0]
        place = lambda a: jax.lax.with_sharding_constraint(  # noqa: E731
            pad_layers(a, n_dev), layer_sharding(mesh, a.ndim, axis_name))
        out = local(*jax.tree_util.tree_map(place, xs))
        return jax.tree_util.tree_map(lambda leaf: leaf[:size], out)

    return run


AXIS = "layers"


def layer_mesh(devices=None, axis_name=AXIS):
    """A 1-D mesh over ``devices`` (default: all devices of the default backend)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def layer_sharding(mesh, ndim, axis_name=AXIS):
    """NamedSharding that splits axis 0 of an ``ndim``-dimensional array over the mesh."""
    return NamedSharding(mesh, PartitionSpec(axis_name, *([None] * (ndim - 1))))


def pad_layers(x, multiple):
    """Pad axis 0 of ``x`` to a multiple of ``multiple`` by repeating its last entry
    (a numpy array stays a numpy array, on the host)."""
    extra = (-x.shape[0]) % multiple
    if extra == 0:
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)


def take_problems(tree, start, size, *, pad):
    """Problems ``start:start + size`` (axis 0) of every leaf of ``tree``, the chunk past the
    end padded to ``size`` (``pad="zeros"``, or ``"repeat"`` of the last problem).

    Host (numpy) leaves are cut on the host, device leaves on the device, and neither is
    copied whole. A whole chunk's device leaves are cut in one program whose start is an
    argument, so every chunk of a call shares one compilation (eager slicing compiles
    one program per leaf's shape).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    n = leaves[0].shape[0]
    on_device = [i for i, x in enumerate(leaves) if not isinstance(x, np.ndarray)]
    if start + size <= n and on_device:
        for i, x in zip(on_device, _rows([leaves[i] for i in on_device], start, size=size)):
            leaves[i] = x
        on_device = []

    def cut(x):
        part = x[start:start + size]
        if pad == "repeat" or part.shape[0] == size:
            return pad_layers(part, size)
        xp = jnp if isinstance(x, jax.Array) else np
        return xp.concatenate([part, xp.zeros((size - part.shape[0],) + part.shape[1:], part.dtype)])

    leaves = [cut(x) if i in on_device or isinstance(x, np.ndarray) else x for i, x in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@program(static_argnames=("size",))
def _rows(leaves, start, *, size):
    return [jax.lax.dynamic_slice_in_dim(x, start, size) for x in leaves]


def join_problems(parts, size=None, device=None):
    """Pytrees of consecutive chunks of problems → one pytree of the first ``size`` problems
    (all of them by default), on ``device``, every leaf joined on its first axis in one program."""
    parts = [jax.device_put(part, device) for part in parts] if device is not None else list(parts)
    return _join(parts, size)


@program(static_argnames=("size",))
def _join(parts, size):
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0)[:size], *parts)


def map_over_layers(fn, mesh=None, axis_name=AXIS, *, per_device="auto"):
    """Run a single-problem function over the leading (layer) axis, sharded over devices.

    Args:
        fn: ``fn(*arrays) -> pytree`` for ONE problem (e.g. a solver); problems are
            independent.
        mesh: a 1-D :class:`Mesh` (default :func:`layer_mesh` over all devices).
        axis_name: the mesh axis name.
        per_device: how a device runs its share: ``"vmap"`` (batched), ``"map"``
            (one after another) or ``"auto"``: ``"map"`` on CPU meshes of several
            devices (see the module doc), ``"vmap"`` otherwise.

    Returns:
        A jitted function of arrays with the problem axis first; outputs are
        sharded over the mesh. With a single device it is ``jax.jit(jax.vmap(fn))``.
    """
    if per_device not in ("auto", "vmap", "map"):
        raise ValueError(f"per_device must be 'auto', 'vmap' or 'map', got {per_device!r}")
    mesh = layer_mesh(axis_name=axis_name) if mesh is None else mesh
    if mesh.devices.size == 1:
        return program(jax.vmap(fn))
    return program(over_problems(fn, per_device, mesh=mesh, axis_name=axis_name))
