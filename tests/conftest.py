import os

# XLA's CPU SVD calls OpenBLAS; its threads oversubscribe 2 cores (small SVDs get
# up to 100x slower). Set before jax/numpy load it; notebooks inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# The suite runs in float64 for exactness; float32 tests ask for it explicitly.
jax.config.update("jax_enable_x64", True)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
