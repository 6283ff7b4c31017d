"""``jax.jit`` for CLAIR's own programs, with the compiler options they want per backend.

CLAIR's programs are while-loop heavy (λ paths, refit rounds, ``lax.map`` over
problems). XLA:CPU's MLIR fusion emitters take 1.4–2× as long to compile them
as the classic emitters, and the compiled programs run about as fast (within
±15 %, bit-identical results; ``benchmarks/bench_compile.py``), so on CPU they
are compiled with the classic ones. Other backends get XLA's defaults. The option is passed per program
(``jax.jit(..., compiler_options=...)``): the user's own programs and
``XLA_FLAGS`` are left alone.
"""

from __future__ import annotations

import functools

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
