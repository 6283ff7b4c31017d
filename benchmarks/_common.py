"""Shared helpers for the benchmark scripts: synthetic federations, timing, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python benchmarks/bench_x.py` from anywhere
    sys.path.insert(0, str(ROOT))

# Import clair_jax before any JAX computation: it puts the XLA:CPU scheduler flag the
# partial SVT needs into XLA_FLAGS, which only works before XLA starts (clair_jax.linalg).
import clair_jax  # noqa: E402,F401


def make_blocks(seed, num_clients, p, q, *, rank=4, contaminated=0.25, noise=0.01,
                layers=None, dtype=np.float32):
    """Synthetic federation following DESIGN §1: benign blocks U V_kᵀ + noise, the
    first ⌊contaminated·K⌋ clients replaced by dense Gaussian blocks of comparable norm.

    Returns (blocks of shape (*layers, K, p, q), benign mask (K,)).
    """
    rng = np.random.default_rng(seed)
    lead = () if layers is None else ((layers,) if np.isscalar(layers) else tuple(layers))
    n_bad = int(contaminated * num_clients)
    out = np.empty(lead + (num_clients, p, q), dtype=np.float64)
    for idx in np.ndindex(*lead) if lead else [()]:
        u, _ = np.linalg.qr(rng.standard_normal((p, rank)))
        v = rng.standard_normal((num_clients, q, rank)) / np.sqrt(rank)
        benign = np.einsum("pr,kqr->kpq", u, v)
        scale = np.sqrt(np.mean(np.sum(benign**2, axis=(-2, -1))))
        bad = rng.standard_normal((n_bad, p, q))
        bad *= scale / np.sqrt(np.sum(bad**2, axis=(-2, -1), keepdims=True))
        benign[:n_bad] = bad
        benign += noise * scale / np.sqrt(p * q) * rng.standard_normal(benign.shape)
        out[idx] = benign
    mask = np.arange(num_clients) >= n_bad
    return out.astype(dtype), mask


def time_call(fn, *, repeats=5, warmup=1):
    """Median wall time of ``fn()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def machine_info():
    import jax

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "loadavg_at_start": load,
    }


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format) triples."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            if value is None:
                cells.append("—")
            elif isinstance(value, str):
                cells.append(value)
            else:
                cells.append(format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default))
    print(f"\nwrote {path}")


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.bool_):
        return bool(obj)
    return str(obj)
