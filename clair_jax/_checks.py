"""Errors at the door: validate shapes, dtypes and options before anything is traced."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def as_float_array(x, name, *, min_ndim, host=False):
    """``x`` as a floating JAX array with at least ``min_ndim`` axes, or a clear error.

    With ``host``, a numpy array stays a numpy array (float32/float64 as JAX would
    hold it): a model's worth of LoRA factors is sent to the device a chunk of
    modules at a time, never copied whole.
    """
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
    if host and isinstance(x, np.ndarray):
        return np.asarray(x, jax.dtypes.canonicalize_dtype(x.dtype))
    return jnp.asarray(x)


def check_blocks(blocks, name="blocks"):
    """Validate a (..., K, p, q) stack of client blocks."""
    blocks = as_float_array(blocks, name, min_ndim=3)
    _check_sizes(blocks.shape, name)
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


def check_real(value, name, *, low=None, high=None, open_low=False, open_high=False, hint=""):
    """A finite real scalar in [low, high] (ends open where asked), as a float, or a clear error."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        if not (hasattr(value, "shape") and np.shape(value) == () and np.issubdtype(np.asarray(value).dtype, np.number)):
            raise TypeError(f"{name} must be a single real number{hint}, got {value!r}")
    value = float(value)
    lo = "(" if open_low else "["
    hi = ")" if open_high else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    bad_low = low is not None and (value <= low if open_low else value < low)
    bad_high = high is not None and (value >= high if open_high else value > high)
    if not np.isfinite(value) or bad_low or bad_high:
        raise ValueError(f"{name} must be a finite number in {interval}{hint}, got {value}")
    return value


def check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_updates(updates, name="updates"):
    """A (..., K, p, q) array or :class:`clair_jax.LoRAFactors`, checked; the same kind back."""
    from clair_jax.lora import LoRAFactors

    if isinstance(updates, tuple) and not isinstance(updates, LoRAFactors):
        raise TypeError(f"{name} is a plain {type(updates).__name__}: pass LoRA factors as "
                        f"cj.LoRAFactors(B, A), or dense updates as one (..., K, p, q) array")
    if isinstance(updates, LoRAFactors):
        b = as_float_array(updates.B, f"{name}.B", min_ndim=3, host=True)
        a = as_float_array(updates.A, f"{name}.A", min_ndim=3, host=True)
        if b.shape[:-2] != a.shape[:-2]:
            raise ValueError(f"{name}.B and {name}.A must share leading (…, K) axes, got {b.shape} and {a.shape}")
        if b.shape[-1] != a.shape[-2]:
            raise ValueError(f"LoRA rank mismatch: {name}.B is (…, p, {b.shape[-1]}) "
                             f"but {name}.A is (…, {a.shape[-2]}, q)")
        if b.dtype != a.dtype:
            raise TypeError(f"{name}.B and {name}.A must have the same dtype, got {b.dtype} and {a.dtype}")
        if b.shape[-1] == 0:
            raise ValueError(f"{name} has LoRA rank 0 (B is {b.shape}): there is no update to aggregate")
        _check_sizes(b.shape[:-2] + (b.shape[-2], a.shape[-1]), name)
        return LoRAFactors(b, a)
    return check_blocks(updates, name)


def _check_sizes(shape, name):
    *lead, k, p, q = shape
    if k < 2:
        raise ValueError(f"{name} must hold at least 2 clients (axis -3), got K = {k}")
    if p < 1 or q < 1:
        raise ValueError(f"{name} blocks must be non-empty, got p × q = {p} × {q}")
    if any(n == 0 for n in lead):
        raise ValueError(f"{name} has an empty leading (layer) axis: shape {tuple(shape)} holds no problem")


def check_rank(rank, dims, num_clients, name="rank"):
    """A user-given r̂ must fit the stacked problem: 1 ≤ r ≤ min(p, K·q)."""
    if rank is None:
        return None
    p, q = dims
    most = min(p, num_clients * q)
    if rank > most:
        raise ValueError(f"{name} = {rank} is larger than the stacked updates allow: min(p, K·q) = "
                         f"min({p}, {num_clients}·{q}) = {most}")
    return rank


def block_shape(updates, side):
    """(K, p, q) of one oriented block of checked updates (dense or LoRA)."""
    from clair_jax.lora import LoRAFactors

    if isinstance(updates, LoRAFactors):
        k, p, _ = updates.B.shape[-3:]
        q = updates.A.shape[-1]
    else:
        k, p, q = updates.shape[-3:]
    return (k, p, q) if side == "left" else (k, q, p)


def check_devices(devices):
    """None, or a non-empty list of distinct JAX devices of one platform."""
    if devices is None:
        return None
    if isinstance(devices, jax.Device):
        devices = [devices]
    try:
        devices = list(devices)
    except TypeError:
        raise TypeError(f"devices must be a list of JAX devices (e.g. jax.devices()), got {devices!r}") from None
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must be a non-empty list of JAX devices (e.g. jax.devices()), got {devices!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got {devices}")
    return devices
