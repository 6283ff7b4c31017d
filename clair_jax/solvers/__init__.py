"""Solvers for one low-rank plus block-sparse problem (one file per solver).

* :mod:`clair_jax.solvers.alm`: inexact augmented Lagrangian for the exact program
  min ‖L‖_* + λ Σ_k ‖C_k‖_F  s.t.  L + C = M, and (with μ > 0, a two-block ADMM)
  for the penalised program below.
* :mod:`clair_jax.solvers.apg`: accelerated proximal gradient (FISTA) with
  continuation and adaptive restart for the penalised program
  min ½‖M − L − C‖_F² + μ(‖L‖_* + λ Σ_k ‖C_k‖_F), alone or along a
  warm-started λ path.
* :mod:`clair_jax.solvers.path`: either solver up an ascending λ grid in one
  ``while_loop`` (``solve_penalized_path``, ``solve_alm_path``, ``solve_exact_path``).

Both take a single (K, p, q) problem already scaled to ‖M‖_2 = 1 and return a
:class:`SolverOutput`; :func:`clair_jax.decompose` scales, dispatches and vmaps.
"""

from clair_jax.solvers.common import SolverOutput
from clair_jax.solvers.alm import solve_alm, solve_exact
from clair_jax.solvers.apg import solve_penalized
from clair_jax.solvers.path import solve_alm_path, solve_exact_path, solve_path, solve_penalized_path

__all__ = ["SolverOutput", "solve_alm", "solve_alm_path", "solve_exact", "solve_exact_path", "solve_path", "solve_penalized", "solve_penalized_path"]
