"""The solvers with the partial-SVT option (``svt_budget=``, ``svt_slack=``).

The hook now lives in :mod:`clair_jax.solvers` itself (off by default); this
module stays as the one place benchmarks and tests get the solvers from.
"""

from __future__ import annotations


def fast_solvers():
    """(solve_exact, solve_penalized), both accepting ``svt_budget`` and ``svt_slack``."""
    from clair_jax import solvers

    return solvers.solve_exact, solvers.solve_penalized
