"""What every solver returns, and the objective both programs share."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax.linalg import init_subspace
from clair_jax.prox import safe_frobenius_norm


class SolverOutput(NamedTuple):
    """Per-problem solution of one decomposition (all in the solver's scaling)."""

    low_rank: jax.Array          # (K, p, q)
    sparse: jax.Array            # (K, p, q)
    singular_values: jax.Array   # (min(p, K q),) of low_rank, descending
    iterations: jax.Array        # int32
    converged: jax.Array         # bool
    primal_residual: jax.Array   # relative: ‖M − L − C‖_F/‖M‖_F (ALM) or prox-gradient step (APG)
    dual_residual: jax.Array     # relative change of the iterates at the last step
    objective: jax.Array
    svt_fallbacks: jax.Array = 0  # int32: partial-SVT calls that fell back to the full SVD
    svt_state: object = None      # the partial SVT's final subspace (a warm start for a neighbouring solve)


def regularizer(singular_values, sparse, lam):
    """‖L‖_* + λ Σ_k ‖C_k‖_F."""
    return jnp.sum(singular_values) + lam * jnp.sum(safe_frobenius_norm(sparse))


def default_tolerance(dtype):
    """Relative stopping tolerance keyed by dtype: tight in float64, realistic in float32."""
    return 1e-9 if jnp.dtype(dtype) == jnp.float64 else 3e-6


def start_subspace(state, shape, budget, dtype):
    """The partial SVT's starting state: ``state``'s subspace (fallback count reset), or a
    fixed random start; None without a budget (full-SVD SVT)."""
    if budget is None:
        return None
    if state is None:
        return init_subspace(shape, budget, dtype)
    return state._replace(basis=state.basis.astype(dtype), fallbacks=jnp.zeros_like(state.fallbacks))
