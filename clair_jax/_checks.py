"""Errors at the door: validate shapes, dtypes and options before anything is traced."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def as_float_array(x, name, *, min_ndim):
    """``x`` as a floating JAX array with at least ``min_ndim`` axes, or a clear error."""
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32 or float64), got {x.dtype}; "
            f"convert it first, e.g. {name}.astype(jnp.float32)"
        )
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} axes, got shape {tuple(x.shape)}")
    if x.dtype not in (jnp.float32, jnp.float64):
        x = x.astype(jnp.float32)  # float16/bfloat16: SVDs need at least single precision
    return jnp.asarray(x)


def check_blocks(blocks, name="blocks"):
    """Validate a (..., K, p, q) stack of client blocks."""
    blocks = as_float_array(blocks, name, min_ndim=3)
    k, p, q = blocks.shape[-3:]
    if k < 2:
        raise ValueError(f"{name} must hold at least 2 clients (axis -3), got K = {k}")
    if p < 1 or q < 1:
        raise ValueError(f"{name} blocks must be non-empty, got p × q = {p} × {q}")
    return blocks


def check_side(side):
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' (shared column space) or 'right' (shared row space), got {side!r}")
    return side


def check_positive(value, name, *, allow_none=False, allow=()):
    """A positive finite scalar (or array of them), None, or one of the strings in ``allow``."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if value in allow:
            return value
        raise ValueError(f"{name} must be a positive number{' or one of ' + repr(allow) if allow else ''}, got {value!r}")
    if isinstance(value, jax.core.Tracer):
        return value
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def check_int(value, name, *, low=None, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_matching_leading(a, b, name_a, name_b, axes):
    """Shapes of a and b must agree on ``axes`` (negative indices)."""
    for ax in axes:
        if a.shape[ax] != b.shape[ax]:
            raise ValueError(
                f"{name_a} and {name_b} disagree on axis {ax}: {tuple(a.shape)} vs {tuple(b.shape)}"
            )
