"""Doctest collection over clair_jax/: modules behind an optional extra are skipped
where their library is missing (their tests skip the same way)."""

import importlib.util

collect_ignore = []
for module, needs in [("clair_jax/flower.py", "flwr"), ("clair_jax/experiments/digits.py", "sklearn")]:
    if importlib.util.find_spec(needs) is None:
        collect_ignore.append(module)


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each module.

    Every XLA:CPU executable keeps its own memory mappings; one process that
    compiles the whole suite's programs passes the kernel's limit (vm.max_map_count,
    65530 by default) and XLA's compiler segfaults on the next mmap it cannot get.
    Clearing the caches returns the mappings (measured: they plateau per module).
    """
    yield
    import jax

    jax.clear_caches()
    gc.collect()
