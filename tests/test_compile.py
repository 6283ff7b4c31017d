"""clair_jax._compile.program: jax.jit with CLAIR's per-backend compiler options."""

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax import _compile


@_compile.program(static_argnames=("power",))
def _raised(x, *, power):
    """x ** power, summed."""
    return jnp.sum(x ** power)


@_compile.program
def _twice(x):
    return 2 * x


def test_program_behaves_as_jit_and_keeps_the_function_s_face():
    x = jnp.arange(4.0)
    assert float(_raised(x, power=2)) == 14.0
    assert float(_raised(x, power=3)) == 36.0
    np.testing.assert_array_equal(_twice(x), 2 * np.arange(4.0))
    assert _raised.__name__ == "_raised" and "summed" in _raised.__doc__
    # The jitted function's own interface is there: one compilation per static value.
    assert _raised._cache_size() == 2
    assert "stablehlo" in _raised.lower(x, power=2).as_text()
    # Inside a user's jit, vmap or grad it is an ordinary call (the options are the outer program's).
    np.testing.assert_array_equal(jax.jit(lambda y: _twice(y) + 1)(x), 2 * np.arange(4.0) + 1)
    np.testing.assert_array_equal(jax.vmap(_twice)(x), 2 * np.arange(4.0))
    assert float(jax.grad(lambda y: _raised(y, power=2))(jnp.float32(3.0))) == 6.0


def test_cpu_options_are_given_on_the_cpu_backend_only(monkeypatch):
    prog = _compile.program(lambda x: x + 1)
    seen = {}
    real_jit = jax.jit

    def spy(fun, **kwargs):
        seen.update(kwargs)
        return real_jit(fun, **kwargs)

    monkeypatch.setattr(_compile.jax, "jit", spy)
    assert float(prog(jnp.float32(1.0))) == 2.0
    expected = _compile.CPU_OPTIONS if jax.default_backend() == "cpu" else None
    assert seen["compiler_options"] == expected
