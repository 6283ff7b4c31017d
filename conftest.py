"""Doctest collection over clair_jax/: modules behind an optional extra are skipped
where their library is missing (their tests skip the same way)."""

import importlib.util

collect_ignore = []
for module, needs in [("clair_jax/flower", "flwr"), ("clair_jax/experiments/digits.py", "sklearn"),
                      ("clair_jax/llm", "gguf"), ("clair_jax/llm", "tokenizers"),
                      ("clair_jax/experiments/shakespeare.py", "gguf")]:
    if importlib.util.find_spec(needs) is None and module not in collect_ignore:
        collect_ignore.append(module)


import gc  # noqa: E402

import pytest  # noqa: E402


#: Above this many memory mappings JAX's compiled programs are dropped (the
#: kernel's default vm.max_map_count is 65530; one test module adds at most ~10k).
MAPPINGS_BEFORE_CLEARING = 25000


def _mappings():
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:   # not Linux: clear after every module
        return MAPPINGS_BEFORE_CLEARING


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs when the process holds too many mappings.

    Every XLA:CPU executable keeps its own memory mappings; one process that
    compiles the whole suite's programs passes the kernel's limit (vm.max_map_count,
    65530 by default) and XLA's compiler segfaults on the next mmap it cannot get.
    Clearing the caches returns the mappings (measured: they plateau); doing it
    only past a threshold keeps programs shared between modules compiled once.
    """
    yield
    if _mappings() >= MAPPINGS_BEFORE_CLEARING:
        import jax

        jax.clear_caches()
        gc.collect()


#: Doctests that run a study end to end (the experiments' entry points): slow tier.
SLOW_DOCTESTS = ("clair_jax/experiments/",)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the doctests of :data:`SLOW_DOCTESTS` slow, before ``-m`` selects."""
    for item in items:
        path = str(getattr(item, "path", item.fspath)).replace("\\", "/")
        if isinstance(item, pytest.DoctestItem) and any(p in path for p in SLOW_DOCTESTS):
            item.add_marker(pytest.mark.slow)
