"""Stage 2 of the pipeline: put client updates side by side.

CLAIR works on K blocks Θ̂_k ∈ R^{p×q} of one problem. The *stacked* matrix is
M = [Θ̂_1 … Θ̂_K] ∈ R^{p×Kq}; its column space is the shared subspace. A shared
row space (``side="right"``) is the same problem on the transposed blocks.
Functions here take one problem; callers vmap over leading axes.
"""

from __future__ import annotations

import ctypes
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax._compile import host_lanes, in_lanes, program
from clair_jax.lora import LoRAFactors, reduce_factors
from clair_jax.sharding import join_problems, take_problems

__all__ = ["to_stacked", "from_stacked", "orient", "SIDES", "Problems", "problems", "problem_shape", "split", "concatenate"]

SIDES = ("left", "right")


def to_stacked(blocks):
    """(K, p, q) blocks → (p, K·q) matrix [Θ_1 … Θ_K]."""
    k, p, q = blocks.shape
    return jnp.transpose(blocks, (1, 0, 2)).reshape(p, k * q)


def from_stacked(matrix, num_clients):
    """(p, K·q) matrix → (K, p, q) blocks; inverse of :func:`to_stacked`."""
    p, kq = matrix.shape
    return jnp.transpose(matrix.reshape(p, num_clients, kq // num_clients), (1, 0, 2))


def orient(blocks, side):
    """Blocks whose *column* space is the shared one: Θ_k for "left", Θ_kᵀ for "right".

    The map is its own inverse, so it also brings results back to the user's side.
    """
    return blocks if side == "left" else jnp.swapaxes(blocks, -1, -2)


class Problems(NamedTuple):
    """A user's updates as a flat batch of single (K, p, q) problems.

    Dense input keeps its blocks (oriented so the shared space is the column
    space); LoRA input is reduced exactly (:func:`clair_jax.lora.reduce_factors`)
    and keeps its factors (the user's arrays, not copies) and what maps reduced
    bases back. Non-finite clients are zeroed in what the solvers see and
    marked not ``usable``.
    """

    blocks: jax.Array          # (n, K, d, w): what the solvers see
    usable: jax.Array          # (n, K) bool: the client's update is finite
    dims: tuple                # dense (p, q) of one block: every data-driven rule is read for it
    lead: tuple                # the user's leading (layer / module) axes
    side: str
    factors: object = None     # LoRA input: flat oriented LoRAFactors (n, K, p, r), (n, K, r, q), as given
    right: object = None       # LoRA input: (n, K, r, r') A_k R_k of each reduction (lora.lift)

    @property
    def factored(self) -> bool:
        return self.factors is not None

    @property
    def num_clients(self) -> int:
        return self.blocks.shape[1]

    def unflatten(self, x):
        """(n, ...) per-problem values → the user's (lead..., ...) layout."""
        return x.reshape(self.lead + x.shape[1:])

    def restore(self, refined):
        """Refined blocks (n, K, p, q) or factors → the user's layout and kind."""
        if self.factored:
            out = LoRAFactors(self.unflatten(refined.B), self.unflatten(refined.A))
            return out if self.side == "left" else out.transpose()
        return orient(self.unflatten(refined), self.side)


def problems(updates, side) -> Problems:
    """Stage 2: flatten the leading axes, orient, zero non-finite clients, reduce LoRA exactly.

    Args:
        updates: checked (..., K, p, q) array or :class:`clair_jax.LoRAFactors`.
        side: ``"left"`` or ``"right"``.
    """
    if isinstance(updates, LoRAFactors):
        oriented = updates if side == "left" else updates.transpose()
        lead = oriented.B.shape[:-3]
        b = _flat(oriented.B)
        a = _flat(oriented.A)
        usable, reduced = map_chunks(_reduce_all, (b, a))
        return Problems(reduced.blocks, usable, (b.shape[-2], a.shape[-1]), lead, side,
                        LoRAFactors(b, a), reduced.right)
    oriented = orient(updates, side)
    blocks = oriented.reshape((-1,) + oriented.shape[-3:])
    zeroed, usable = _usable_blocks(blocks)
    return Problems(zeroed, usable, tuple(blocks.shape[-2:]), oriented.shape[:-3], side)


def problem_shape(updates, side):
    """What :func:`problems` will give for checked ``updates``, without computing it:
    ((n, K, d, w) of the blocks, their dtype, the dense (p, q), the LoRA rank or None)."""
    if isinstance(updates, LoRAFactors):
        oriented = updates if side == "left" else updates.transpose()
        b, a = oriented.B, oriented.A
        one = jax.eval_shape(reduce_factors, jax.ShapeDtypeStruct(b.shape[-3:], b.dtype),
                             jax.ShapeDtypeStruct(a.shape[-3:], a.dtype)).blocks
        n = int(np.prod(b.shape[:-3], dtype=int))
        return (n,) + one.shape, one.dtype, (b.shape[-2], a.shape[-1]), b.shape[-1]
    shape = updates.shape if side == "left" else updates.shape[:-2] + updates.shape[:-3:-1]
    return (int(np.prod(shape[:-3], dtype=int)),) + tuple(shape[-3:]), updates.dtype, tuple(shape[-2:]), None


def _finite(x):
    return jnp.all(jnp.isfinite(x), axis=(-2, -1))


def _zero(x, usable):
    return jnp.where(usable[..., None, None], x, 0.0)


@program
def _usable_blocks(blocks):
    """(blocks with every non-finite client's block zeroed, (n, K) finite clients)."""
    usable = _finite(blocks)
    return _zero(blocks, usable), usable


#: LoRA factors held in host (numpy) memory go to the device this many bytes of
#: modules at a time (stage 2 and the refinement), so a model's worth of factors
#: is never copied whole.
CHUNK_BYTES = 32 * 2**20


def map_chunks(fn, arrays, *, host_out=()):
    """``fn`` over consecutive chunks of problems (the leading axis) of ``arrays``.

    Device arrays go in one call. Where any array is a numpy array, chunks of
    about :data:`CHUNK_BYTES` in all are sent to the device one after another, one
    per lane at once on the CPU (the last one padded with zeros to the same size:
    one compilation) and the outputs are
    joined: on the device, or, for the output positions in ``host_out`` (top-level
    indices of ``fn``'s output tuple), in a numpy array filled chunk by chunk.
    """
    leaves = jax.tree_util.tree_leaves(arrays)
    if not any(isinstance(x, np.ndarray) for x in leaves):
        return fn(*arrays)
    release_freed_memory()
    n = leaves[0].shape[0]
    per_problem = sum(x.nbytes for x in leaves) // n
    # On the CPU one chunk per lane runs at once (``_compile.host_lanes``): CHUNK_BYTES in flight in all.
    lanes = host_lanes(jax.default_backend())
    size = max(1, min(n, CHUNK_BYTES // lanes // max(per_problem, 1)))
    size = -(-n // -(-n // size))          # equal chunks: ceil(n / number of chunks)
    host = {}

    def run(start):
        # The last chunk padded with zeros: one compilation. The chunk's host arrays go
        # over in one device_put (jnp.asarray of each is ~3× slower).
        chunk = jax.device_put(take_problems(arrays, start, size, pad="zeros"))
        # Wait for each chunk: dispatched asynchronously, every chunk's copy would be alive at once.
        out = jax.block_until_ready(fn(*chunk))
        del chunk
        keep = min(size, n - start)
        trim = (lambda y: y) if keep == size else (lambda y: y[:keep])
        for i in host_out:   # host outputs go straight into their numpy buffer (disjoint rows per chunk)
            with lock:
                if i not in host:
                    host[i] = np.empty((n,) + out[i].shape[1:], out[i].dtype)
            host[i][start:start + keep] = np.asarray(out[i])[:keep]
        return [jax.tree_util.tree_map(trim, y) if i not in host_out else None for i, y in enumerate(out)]

    lock = threading.Lock()
    device_parts = in_lanes(run, range(0, n, size), lanes)
    on_device = join_problems([[y for i, y in enumerate(part) if i not in host_out] for part in device_parts])
    on_device = iter(on_device)
    joined = [host[i] if i in host_out else next(on_device) for i in range(len(device_parts[0]))]
    return tuple(joined)


def release_freed_memory():
    """Hands memory that is free but still held by glibc's allocator (compilation
    scratch, the previous stage's buffers) back to the system before a host-memory
    stage: the process's peak is the input plus what the stages hold at once.
    A no-op where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _flat(x):
    """(..., K, p, q) → (n, K, p, q); no copy when there is one leading axis already."""
    return x if x.ndim == 4 else x.reshape((-1,) + x.shape[-3:])


@program
def _reduce_all(b, a):
    def one(args):
        b1, a1 = args
        ok = _finite(b1) & _finite(a1)
        return ok, reduce_factors(_zero(b1, ok), _zero(a1, ok))

    # One module at a time: a whole model's (p, K·r) stacks would be its size again.
    return jax.lax.map(one, (b, a))


def split(updates, parts):
    """Flatten the leading axes of checked updates and cut them into ≤ ``parts`` contiguous chunks.

    Every chunk has the same number of problems (the last is padded by repeating
    its last problem, a valid problem), so one compiled program serves them all.

    Returns:
        (chunks, lead, size): non-empty chunks of the same kind as ``updates``, each
        with one leading problem axis, the user's leading shape and the number of
        problems before padding (:func:`concatenate` drops the rest).
    """
    if isinstance(updates, LoRAFactors):
        lead = updates.B.shape[:-3]
        flat = LoRAFactors(updates.B.reshape((-1,) + updates.B.shape[-3:]),
                           updates.A.reshape((-1,) + updates.A.shape[-3:]))
        n = flat.B.shape[0]
    else:
        lead = updates.shape[:-3]
        flat = updates.reshape((-1,) + updates.shape[-3:])
        n = flat.shape[0]
    width = -(-n // parts)
    # Only the last chunk is padded: host factors are never copied whole.
    chunks = [take_problems(flat, start, width, pad="repeat") for start in range(0, n, width)]
    return chunks, lead, n


def concatenate(parts, lead, size, device=None):
    """Problems built chunk by chunk (:func:`split`) → the first ``size`` in one batch in the
    ``lead`` layout, on ``device``."""
    first = parts[0]

    arrays = [(p.blocks, p.usable, p.factors, p.right) for p in parts]
    blocks, usable, factors, right = join_problems(arrays, size, device)
    return Problems(blocks, usable, first.dims, tuple(lead), first.side, factors, right)
