"""How CLAIR's programs are compiled and run: ``jax.jit`` with the compiler options they
want per backend, and how many of them may run at once on the CPU.

CLAIR's programs are while-loop heavy (λ paths, refit rounds, ``lax.map`` over
problems). XLA:CPU's MLIR fusion emitters take 1.4–2× as long to compile them
as the classic emitters, and the compiled programs run about as fast (within
±15 %, bit-identical results; ``benchmarks/bench_compile.py``), so on CPU they
are compiled with the classic ones. Other backends get XLA's defaults. The option is passed per program
(``jax.jit(..., compiler_options=...)``): the user's own programs and
``XLA_FLAGS`` are left alone.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import os
import threading

import jax

#: Compiler options of CLAIR's programs on the CPU backend.
CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


class _Program:
    """A jitted function whose compiler options follow the default backend, read at the first call
    (so importing clair_jax initialises no backend). Called on tracers (inside a user's
    ``jit``, ``vmap`` or ``grad``) it is a plain ``jax.jit``: compiler options belong to
    the outermost program, which is the caller's."""

    def __init__(self, fun, jit_kwargs):
        self._fun, self._jit_kwargs = fun, jit_kwargs
        functools.update_wrapper(self, fun)

    @functools.cached_property
    def _jitted(self):
        options = CPU_OPTIONS if jax.default_backend() == "cpu" else None
        return jax.jit(self._fun, compiler_options=options, **self._jit_kwargs)

    @functools.cached_property
    def _traced(self):
        return jax.jit(self._fun, **self._jit_kwargs)

    def __call__(self, *args, **kwargs):
        inside = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs)))
        return (self._traced if inside else self._jitted)(*args, **kwargs)

    def __getattr__(self, name):   # lower, trace, _cache_size, …: the jitted function's
        if name.startswith("__") or name in ("_fun", "_jit_kwargs", "_jitted", "_traced"):
            raise AttributeError(name)
        return getattr(self._jitted, name)


def program(fun=None, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` compiled with :data:`CPU_OPTIONS` on CPU.

    Use as ``@program`` or ``@program(static_argnames=...)``.
    """
    if fun is None:
        return functools.partial(program, **jit_kwargs)
    return _Program(fun, jit_kwargs)


# ------------------------------------------------- compiled programs kept between processes

#: Environment variable naming the directory :func:`keep_compiled_programs` uses
#: ("off" or "" turns it off).
CACHE_ENV = "CLAIR_JAX_CACHE"


def default_cache_dir() -> str:
    """``$CLAIR_JAX_CACHE``, else ``$XDG_CACHE_HOME/clair_jax/xla``, else ``~/.cache/clair_jax/xla``."""
    if os.environ.get(CACHE_ENV) is not None:
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clair_jax", "xla")


def keep_compiled_programs(path=None):
    """Keep compiled programs on disk, so that later processes load them instead of compiling.

    Turns on JAX's persistent compilation cache (for every program of the process,
    the caller's too) at ``path`` (default :func:`default_cache_dir`) and caches
    every program, however short its compilation: CLAIR's stage programs take
    0.2–3 s each to compile, which a cold call pays and a process that finds them
    on disk does not (the demo's cold call: 4.8 s, 1.3 s from the cache on the
    2-core machine; ``docs/performance.md``, Compilation). The programs loaded are
    the ones compiled, so every answer is the same. The ``clair`` command line
    calls it (``--no-compile-cache`` or ``CLAIR_JAX_CACHE=off`` to opt out); a
    script calls it once before its first CLAIR call.

    A directory the caller set already (``jax_compilation_cache_dir``) is kept.

    Returns:
        The directory in use, or None where ``path`` (or ``CLAIR_JAX_CACHE``) is
        ``"off"`` or empty.

    Example:
        >>> import tempfile, clair_jax as cj
        >>> where = cj.keep_compiled_programs(tempfile.mkdtemp())   # doctest: +SKIP
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = default_cache_dir() if path is None else os.fspath(path)
    if path in ("", "off"):
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


# ------------------------------------------------- several programs at once on the CPU

#: XLA:CPU runs the parallel pieces of every program on one intra-op thread pool,
#: of one thread per core unless ``PJRT_NPROC`` (or ``NPROC``) says otherwise when
#: the backend starts. A running program that waits inside a loop holds one of its
#: threads, so as many concurrent programs as threads wait on each other for ever
#: (two 7B-shaped detection passes on a 2-core machine hang; with a pool of 3 they
#: run, and 3 and 4 programs with pools of 4 and 5:
#: ``benchmarks/investigations/cpu_concurrency.py``). Imported before JAX's backend
#: starts, clair_jax asks for a pool of POOL_PER_CORE threads per core (idle threads
#: cost nothing), and runs at most half the pool's size of its programs at once.
POOL_PER_CORE = 2


def _cores():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not on Linux
        return max(1, os.cpu_count() or 1)


def backend_started():
    """Whether a JAX backend has started: settings read at its start (``XLA_FLAGS``, the
    pool's size) can no longer take effect."""
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:   # a private API moved: assume the worst
        return True


def _pool_size():
    """The intra-op pool XLA:CPU starts (or started) with: PJRT_NPROC, else NPROC, else the cores."""
    for name in ("PJRT_NPROC", "NPROC"):
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return _cores()


#: With lanes, every thread that allocates gets its own glibc heap ("arena"), and a
#: buffer one lane frees cannot serve another: the 7B LoRA call peaked at 2.03–2.12×
#: its input and ran 7–10 % slower than with one heap shared by every thread (1.95–1.97×;
#: ``benchmarks/bench_llm_call.py``). So clair_jax, imported before the backend starts,
#: caps glibc at MALLOC_ARENAS heaps (``mallopt(M_ARENA_MAX)``) unless MALLOC_ARENA_MAX is set.
MALLOC_ARENAS = 1


def _share_one_heap():
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(-8, MALLOC_ARENAS)   # M_ARENA_MAX
    except (AttributeError, OSError, TypeError):   # not glibc
        pass


if not backend_started():
    if "PJRT_NPROC" not in os.environ and "NPROC" not in os.environ:
        os.environ["PJRT_NPROC"] = str(POOL_PER_CORE * _cores())
    _share_one_heap()
#: The pool's size as the CPU backend sees it (read when clair_jax is imported).
_POOL = _pool_size()


def host_lanes(platform: str) -> int:
    """How many of CLAIR's programs run at once on ``platform``: on the CPU one per core, at
    most half the intra-op pool (see :data:`POOL_PER_CORE`); 1 elsewhere (an accelerator
    batches problems inside one program instead)."""
    if platform != "cpu":
        return 1
    return max(1, min(_cores(), _POOL // 2))


def in_lanes(fn, items, lanes: int) -> list:
    """``[fn(x) for x in items]``, up to ``lanes`` at once (threads: JAX releases the GIL
    while a program runs); in order; an exception in any call is raised here."""
    items = list(items)
    # Inside a lane everything runs in that lane: lanes of lanes could outnumber the pool.
    if lanes <= 1 or len(items) <= 1 or getattr(_lane, "inside", False):
        return [fn(x) for x in items]

    def in_lane(x):
        _lane.inside = True
        return fn(x)

    with concurrent.futures.ThreadPoolExecutor(min(lanes, len(items)), thread_name_prefix="clair-lane") as workers:
        return list(workers.map(in_lane, items))


_lane = threading.local()
