import atexit
import os
import shutil
import tempfile

# XLA's CPU SVD calls OpenBLAS; its threads oversubscribe 2 cores (small SVDs get
# up to 100x slower). Set before jax/numpy load it; notebooks inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The suite compiles far more than it runs (each test meets new shapes): XLA's CPU
# backend at optimisation level 0 compiles about a third faster (tests/test_clair.py:
# 59 s -> 39 s on 2 cores) and gives the same answers (no fast-math either way).
# Speed is measured by benchmarks/, never here. Subprocesses and notebooks inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# One XLA compilation cache for the run, shared with the notebook kernels and the
# subprocesses (they inherit the environment): compiling dominates the suite, and a
# program that two of them build (or that this process's in-memory cache has
# dropped) is then compiled once. A fresh directory each run, removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="clair_jax-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

# The suite runs in float64 for exactness; float32 tests ask for it explicitly.
jax.config.update("jax_enable_x64", True)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def _selects_slow(config):
    """``-m slow`` (the slow tier's command, README) asks for the slow tests by marker."""
    words = (config.getoption("markexpr") or "").replace("(", " ").replace(")", " ").split()
    return any(w == "slow" and (i == 0 or words[i - 1] != "not") for i, w in enumerate(words))


def pytest_collection_modifyitems(config, items):
    """Two tiers: ``-m "not slow"`` (what CI runs) and ``-m slow`` (end-to-end,
    notebook, multi-process and benchmark runs that are long by nature); a plain run
    skips the slow tests unless ``--runslow``."""
    if config.getoption("--runslow") or _selects_slow(config):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
