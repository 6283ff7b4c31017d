r"""Fast singular-value thresholding: a warm-started partial SVD with an exact fallback.

SVT only needs the singular triplets *above* the threshold, and inside the solvers
the matrix changes little from one iteration to the next. :func:`partial_svt_with_spectrum`
therefore runs block subspace iteration on a rank budget of ``k`` columns,
started from the right singular vectors of the previous call (carried in a
:class:`SubspaceState`)::

    for _ in range(power_iters):  V ← orth(Xᵀ orth(X V))      (optional extra steps)
    Q = orth(X V);  W R = qr(Xᵀ Q);  Ũ Σ Ṽᵀ = svd(Rᵀ)  (k × k)
    U = Q Ũ,  V = W Ṽ;  svt ≈ U max(Σ − τ, 0) Vᵀ

The rows of Qᵀ X lie in span(W) exactly (Qᵀ X = Rᵀ Wᵀ), so the k × k SVD of Rᵀ is
the Rayleigh–Ritz SVD of Qᵀ X at a fraction of the cost of a k × n SVD. One call
costs three (m × n) @ (n × k) products, one QR of each of an m × k and an n × k
matrix and a k × k SVD, instead of a full SVD. The answer is
*certified* before it is used: it is accepted only if (a) at least ``guard`` of the
k Ritz values fall below τ (the budget was large enough) and (b) every kept Ritz
pair has a residual ‖X vᵢ − σᵢ uᵢ‖ ≤ ``rtol``·σ₁ (the subspace has converged).
Otherwise the call falls back to the full SVD of :func:`clair_jax.prox.svt_with_spectrum`
and restarts the subspace from it, so the result never silently differs from the
exact path by more than the certified residual.

A budget equal to the short side is the *whole* spectrum: the Rayleigh–Ritz step
is then over the whole space, i.e. the eigendecomposition of the smaller Gram
matrix X Xᵀ, with the same certificate (computed without forming the Gram
matrix). On CPU it takes whole exact solves 1.1–2.1× faster than the full SVD from
16 × 160 to 1024 × 1024 (``benchmarks/bench_svt.py``), less than the rank-k step
where that pays, so ``svt="auto"`` takes it wherever the rank-k step does not.

The fallback is a ``while_loop`` that runs zero times or once: under ``jax.vmap``
a batched ``while_loop`` runs its body only while *some* problem still needs it,
and keeps each problem's own answer, so the full SVD is paid only on iterations
where some problem in the batch failed its certificate, and a problem's result does
not depend on its batch-mates.

**XLA:CPU scheduler.** With jax 0.10.2, data-dependent control flow inside the
solvers' vmapped ``while_loop`` (a ``lax.cond`` or this ``while_loop``) can wedge
the CPU runtime: every thread idle and ``block_until_ready`` never returning
(reproduced with 8–32 stacked 64 × 512 problems). Turning XLA:CPU's
concurrency-optimised scheduler off avoids it (no measurable cost on the full-SVD
path), and the flag only takes effect if it is in ``XLA_FLAGS`` before XLA
compiles anything. Importing :mod:`clair_jax` therefore appends
``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to ``XLA_FLAGS`` when
no JAX backend has been initialised yet; :func:`partial_svt_supported` says
whether the flag is in effect, and ``svt="auto"`` only picks the partial SVT when
it is (or when the default backend is not the CPU).

:func:`choose_svt_budget` is the rule for when the partial SVT pays (measured by
``benchmarks/bench_svt.py``): a rank budget well below the short side of a matrix
that is not tiny.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax._compile import backend_started
from clair_jax.prox import safe_frobenius_norm, thin_svd

__all__ = [
    "SVT_MODES",
    "SubspaceState",
    "choose_svt_budget",
    "init_subspace",
    "partial_svt_supported",
    "partial_svt_with_spectrum",
    "rank_budget",
    "spectral_norm",
    "svt_method",
    "use_partial_svt",
]

#: Values of the ``svt`` option of :func:`clair_jax.decompose` and :func:`clair_jax.clair`.
SVT_MODES = ("auto", "full", "partial")

_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _request_safe_scheduler():
    """Put the scheduler flag in XLA_FLAGS if that can still take effect (see module doc)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
        return "xla_cpu_enable_concurrency_optimized_scheduler=false" in flags
    if backend_started():
        return False
    os.environ["XLA_FLAGS"] = (flags + " " + _SCHEDULER_FLAG).strip()
    return True


_SAFE_SCHEDULER = _request_safe_scheduler()


def partial_svt_supported():
    """Whether the partial SVT can run safely in this process (see the module docstring).

    True off the CPU, or on the CPU when XLA_FLAGS carried
    ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` before XLA started
    (``import clair_jax`` before running any JAX computation arranges that).
    """
    try:
        on_cpu = jax.default_backend() == "cpu"
    except Exception:
        on_cpu = True
    return _SAFE_SCHEDULER or not on_cpu


class SubspaceState(NamedTuple):
    """Warm-start state of the partial SVT for one (m, n) matrix.

    Attributes:
        basis: (n, k) orthonormal estimate of the leading right singular subspace;
            (n, 0) when the budget is the whole short side (the Rayleigh–Ritz step
            is then over the whole space and needs no start).
        fallbacks: int32 count of calls that needed the full SVD (a diagnostic).
    """

    basis: jax.Array
    fallbacks: jax.Array


def rank_budget(shape, expected_rank=None, *, oversample=8):
    """Static number of columns k for a partial SVT of an (m, n) matrix.

    ``1.5·expected_rank + oversample`` (or min(m, n)/8 + oversample when unknown),
    capped at min(m, n). The half rank of slack is where the partial SVT is cheapest
    on the 7B LoRA modules (r = 16: 32 columns solve their λ path 7–11 % faster than
    40, with the same iterations and verdicts; 24 leave too little room and refine
    more often).
    """
    short = min(shape[-2:])
    base = int(expected_rank) + int(expected_rank) // 2 if expected_rank is not None else short // 8
    return int(min(short, max(base + oversample, 2 * oversample)))


def choose_svt_budget(shape, svt="auto", expected_rank=None):
    """Static rank budget for the solvers' SVT of an (m, n) matrix, or None for the full SVD.

    Args:
        shape: the stacked matrix's shape (m, n) (trailing two axes are used).
        svt: ``"full"`` (always the full SVD), ``"partial"`` (always the certified
            partial SVT), or ``"auto"``: partial where :func:`use_partial_svt` says it
            pays, else the whole spectrum from the Gram matrix; both only where
            :func:`partial_svt_supported` says the certified path is safe.
        expected_rank: the rank of L̂ if known (sets the budget, see :func:`rank_budget`).

    Returns:
        None (the full SVD) or an int budget k ≤ min(m, n); k = min(m, n) is the
        whole spectrum, from the certified Gram eigendecomposition.
    """
    if svt not in SVT_MODES:
        raise ValueError(f"svt must be one of {SVT_MODES}, got {svt!r}")
    if svt == "full":
        return None
    short = min(shape[-2:])
    budget = rank_budget(shape, expected_rank)
    if not partial_svt_supported():
        if svt == "partial":
            warnings.warn(
                "svt='partial' needs XLA_FLAGS=" + _SCHEDULER_FLAG + " set before JAX starts "
                "(import clair_jax first, or set it yourself); using the full SVD instead.",
                RuntimeWarning, stacklevel=3)
        return None
    if budget < short and (svt == "partial" or use_partial_svt(shape, budget)):
        return budget
    # Everything else takes the whole spectrum from the Gram matrix: whole solves
    # 1.1–2.1× faster than with the full SVD on CPU (benchmarks/bench_svt.py).
    return short


def svt_method(shape, budget):
    """What a :func:`choose_svt_budget` result means for an (m, n) matrix:
    ``"full"`` (None: the full SVD), ``"gram"`` (the whole short side: the
    certified Gram eigendecomposition) or ``"partial"`` (the rank-k step)."""
    if budget is None:
        return "full"
    return "gram" if int(budget) >= min(shape[-2:]) else "partial"


def use_partial_svt(shape, budget):
    """Whether the partial SVT is expected to beat a full SVD (static rule).

    From ``benchmarks/bench_svt.py`` on CPU: the full SVD of an (m, n) matrix costs
    O(m n min(m, n)) with a large constant, a partial step a handful of O(m n k)
    products plus O(n k²) small factorisations. It pays once the short side is at
    least 64 and the budget is at most a quarter of it.
    """
    short = min(shape[-2:])
    return short >= 64 and 4 * budget <= short


def spectral_norm(x):
    """‖x‖_2 of the trailing (m, n) matrix, from the largest eigenvalue of its smaller Gram matrix.

    The solvers need σ₁ once per problem (to scale it); on CPU this is 3–4× cheaper
    than the singular values of a wide matrix (64 × 512: 0.31 ms vs 1.05 ms for
    ``jnp.linalg.norm(x, ord=2)``) and exact to a few ulps, since λ_max of the Gram
    matrix is. Entries are divided by max |x| first, so squaring cannot overflow.
    """
    peak = jnp.max(jnp.abs(x), axis=(-2, -1))
    unit = _wide(x) / jnp.where(peak > 0, peak, 1.0)[..., None, None]
    top = jnp.linalg.eigvalsh(unit @ jnp.swapaxes(unit, -1, -2))[..., -1]
    return peak * jnp.sqrt(jnp.maximum(top, 0.0))


def init_subspace(shape, budget, dtype=jnp.float32, *, seed=0):
    """A deterministic random orthonormal (n, k) start for an (m, n) matrix
    ((n, 0) when the budget covers the whole short side: nothing to start)."""
    n = shape[-1]
    if svt_method(shape, budget) == "gram":
        return SubspaceState(basis=jnp.zeros((n, 0), dtype), fallbacks=jnp.asarray(0, jnp.int32))
    gauss = jax.random.normal(jax.random.PRNGKey(seed), (n, int(budget)), dtype)
    basis, _ = jnp.linalg.qr(gauss)
    return SubspaceState(basis=basis, fallbacks=jnp.asarray(0, jnp.int32))


def _orth(y):
    q, _ = jnp.linalg.qr(y)
    return q


def _full_branch(x, tau, k):
    """Exact SVT by full SVD + new basis (exact zero when ‖X‖_2 ≤ τ).

    Unlike prox.svt_with_spectrum it does not swap in an anchor matrix at X = 0:
    the solvers' while_loop is not reverse-differentiable, so gradient safety is
    moot here, and that data-dependent swap inside the solver loop's fallback
    wedged XLA:CPU (jax 0.10.2, see the note in partial_svt_with_spectrum).
    """
    u, s, vt = thin_svd(x)
    below = s[0] <= tau  # from σ₁ itself: ‖X‖_F would underflow for tiny entries
    s_shrunk = jnp.where(below, 0.0, jnp.maximum(s - tau, 0.0))
    return (u * s_shrunk[None, :]) @ vt, s_shrunk, jnp.swapaxes(vt[:k], 0, 1)


def _ritz_pairs_certified(residual, kept, sigma_1, rtol, allowed_floor):
    """The certificate of both Rayleigh–Ritz steps: every kept pair's residual
    ‖X vᵢ − σᵢ uᵢ‖ ≤ max(rtol·σ₁, atol)."""
    allowed = jnp.maximum(rtol * jnp.maximum(sigma_1, jnp.finfo(residual.dtype).tiny), allowed_floor)
    return jnp.all(jnp.where(kept, residual, 0.0) <= allowed)


def _wide(x):
    """The trailing (m, n) matrices oriented with m ≤ n (the smaller Gram matrix is x xᵀ)."""
    return x if x.shape[-2] <= x.shape[-1] else jnp.swapaxes(x, -1, -2)


def _whole_space_ritz(x, tau, rtol, allowed_floor):
    """SVT from the eigendecomposition of the smaller Gram matrix, with its certificate.

    The Rayleigh–Ritz step over the whole space: G = X Xᵀ = U Λ Uᵀ (X wide), so
    svt(X, τ) = U diag(max(1 − τ/√λᵢ, 0)) Uᵀ X. Forming G squares the condition
    number, so the answer is only as good as its certificate: each kept pair's Ritz
    residual ‖X vᵢ − σᵢ uᵢ‖ = ‖X (Xᵀ uᵢ) − λᵢ uᵢ‖/σᵢ, computed without G, must be
    ≤ max(rtol·σ₁, atol). Rounding in G puts an error of about c·eps·σ₁²/τ into the
    answer (c ≤ 3.6 on 360 random float32 cases, τ/σ₁ from 1e-3 to 0.3:
    ``benchmarks/investigations/gram_svt_accuracy.py``), so the certificate passes for τ ≳ 1 % of
    σ₁ in float32, which the penalised programs' μ is (1.8–2.6 % at the benchmarks'
    noise) and the exact program's 1/ρ usually is; below that the full SVD takes
    over. Certified answers were within 1.6e-5·σ₁ of the float64 SVT there.
    """
    wide = _wide(x)
    dtype = x.dtype
    # No rescaling (on small problems each extra pass costs as much as its work): an
    # overflowing Gram matrix gives non-finite values, an underflowing one a λ_max
    # below tiny/eps; both fail the certificate and take the full SVD.
    lam, vecs = jnp.linalg.eigh(wide @ wide.T)                # ascending; reordered only at the end
    lam = jnp.maximum(lam, 0.0)
    s = jnp.sqrt(lam)
    coeff = vecs.T @ wide                                     # rows σᵢ vᵢᵀ
    s_shrunk = jnp.maximum(s - tau, 0.0)
    kept = s_shrunk > 0
    shrink = jnp.where(kept, s_shrunk / jnp.where(kept, s, 1.0), 0.0)
    low = (vecs * shrink[None, :]) @ coeff
    ritz = jnp.sqrt(jnp.sum(jnp.square(wide @ coeff.T - vecs * lam[None, :]), axis=0))
    residual = ritz / jnp.where(kept, s, 1.0)
    finfo = jnp.finfo(dtype)
    representable = (lam[-1] >= finfo.tiny / finfo.eps) & jnp.all(jnp.isfinite(lam))
    accurate = _ritz_pairs_certified(residual, kept, s[-1], rtol, allowed_floor) & representable
    return (low if wide.shape == x.shape else low.T), s_shrunk[::-1], accurate


#: How :func:`ritz_svd` takes the k × k SVD when not told: None (by backend), ``"svd"`` or
#: ``"eigh"``. Read when a program is traced (tests set it to try the GPU path on CPU).
RITZ_SVD = None


def ritz_svd(t, method=None):
    """SVD ``(U, s, Vᵀ)`` of a small square matrix ``t`` (the k × k Rayleigh–Ritz step).

    ``method``: ``"svd"`` (LAPACK / cuSolver SVD), ``"eigh"``, or None:
    :data:`RITZ_SVD` when set, else ``"svd"`` on CPU and ``"eigh"`` elsewhere.
    ``"eigh"`` takes U and s² from the symmetric eigendecomposition of t tᵀ and V
    from the QR of tᵀU = V·diag(s) (columns in
    descending s: the leading columns are V's, the trailing ones of negligible s an
    orthonormal completion). Batched small SVDs are latency-bound on GPUs (an
    H200: 40 × 40, batch 128, 120 ms against 0.7 ms for eigh;
    ``benchmarks/results/gpu_diag_h200.log``); squaring costs accuracy in the
    smallest s, which the partial SVT's certificate checks on every kept pair
    (it falls back to the full SVD where they fail). Not timed on a GPU yet.
    """
    if method is None:
        method = RITZ_SVD or ("svd" if jax.default_backend() == "cpu" else "eigh")
    if method == "svd":
        return jnp.linalg.svd(t)
    if method != "eigh":
        raise ValueError(f"method must be 'svd', 'eigh' or None, got {method!r}")
    w, u = jnp.linalg.eigh(t @ t.T)
    w, u = w[::-1], u[:, ::-1]                  # descending
    v, r = jnp.linalg.qr(t.T @ u)               # tᵀ U = V diag(s): R = diag(s) up to signs
    sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(t.dtype)
    return u, jnp.sqrt(jnp.maximum(w, 0.0)), (v * sign[None, :]).T


def partial_svt_with_spectrum(x, tau, state, *, power_iters=0, rtol=None, guard=2, atol=0.0, refine=2,
                              small_svd=None):
    r"""Singular-value soft-thresholding of one (m, n) matrix by warm-started subspace iteration.

    Computes :math:`\operatorname{svt}(X, τ) = U\max(Σ − τ, 0)V^T` like
    :func:`clair_jax.prox.svt_with_spectrum`, from a rank-k partial SVD when it can
    be certified (see the module docstring), else from the full SVD.

    Args:
        x: (m, n) matrix (one problem; vmap for more).
        tau: threshold τ ≥ 0 (scalar).
        state: :class:`SubspaceState` from :func:`init_subspace` or the previous call.
        power_iters: extra subspace-iteration steps per call before the
            Rayleigh–Ritz step (which is itself one step; the warm start
            accumulates them across calls).
        rtol: accepted Ritz residual relative to σ₁; default 1e-3·√eps-ish by dtype
            (3e-5 in float32, 1e-9 in float64).
        guard: how many of the k Ritz values must fall below τ.
        refine: further subspace-iteration steps (each a Rayleigh–Ritz step from the
            last Ritz vectors, a fraction of a full SVD) tried while the budget is
            large enough but the Ritz pairs have not converged, before falling back
            to the full SVD. Where the matrix moved a lot since the last call (a
            solver's first iterations) one or two steps usually certify.
        atol: absolute Ritz residual also accepted (may be traced). The solvers pass
            a tenth of their current primal residual: an inexact proximal step whose
            error shrinks with the residual keeps ALM/FISTA convergent (inexact
            ALM), and at convergence the certificate is back to ``rtol``.
        small_svd: how the k × k Rayleigh–Ritz SVD is taken (:func:`ritz_svd`'s ``method``).

    Returns:
        ``((svt(x, τ), shrunk singular values of shape (min(m, n),)), new_state)``;
        the spectrum is descending and zero-padded beyond k on the fast path.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from clair_jax import linalg
        >>> x = jax.random.normal(jax.random.PRNGKey(0), (64, 5)) @ jax.random.normal(
        ...     jax.random.PRNGKey(1), (5, 80))
        >>> state = linalg.init_subspace(x.shape, 16)
        >>> for _ in range(3):
        ...     (low, s), state = linalg.partial_svt_with_spectrum(x, 1.0, state)
        >>> bool(jnp.sum(s > 0) == 5)
        True
    """
    m, n = x.shape
    short = min(m, n)
    k = state.basis.shape[-1]
    dtype = x.dtype
    tau = jnp.asarray(tau, dtype)
    if rtol is None:
        rtol = 1e-9 if dtype == jnp.float64 else 3e-5
    allowed_floor = jnp.asarray(atol, dtype)
    if k == 0:  # the whole spectrum: Rayleigh–Ritz over the whole space, no subspace to iterate
        # (‖X‖_F ≤ τ needs no special case here: every σᵢ ≤ τ shrinks to an exact 0.)
        low, spec, accurate = _whole_space_ritz(x, tau, rtol, allowed_floor)
        return _fall_back_unless(accurate, x, tau, (low, spec, state.basis.astype(dtype)), state)

    below = safe_frobenius_norm(x) <= tau

    def rayleigh_ritz(basis):
        """One subspace-iteration + Rayleigh–Ritz step from ``basis``, with its certificate."""
        q = _orth(x @ basis)                                   # (m, k)
        w, r = jnp.linalg.qr(x.T @ q)                          # Qᵀ X = Rᵀ Wᵀ: (n, k), (k, k)
        ub, s, vbt = ritz_svd(r.T, small_svd)                  # (k, k), (k,), (k, k)
        u = q @ ub                                             # (m, k)
        vt = vbt @ w.T                                         # (k, n)
        s_shrunk = jnp.maximum(s - tau, 0.0)
        kept = s_shrunk > 0
        # (a) the budget reaches below the threshold, (b) kept Ritz pairs have converged.
        budget_ok = jnp.sum(kept) <= k - guard
        residual = jnp.sqrt(jnp.sum(jnp.square(x @ vt.T - u * s[None, :]), axis=0))
        accurate = _ritz_pairs_certified(residual, kept, s[0], rtol, allowed_floor) & jnp.all(jnp.isfinite(s))
        low = jnp.where(below, 0.0, (u * s_shrunk[None, :]) @ vt)
        spec = jnp.zeros((short,), dtype).at[:k].set(jnp.where(below, 0.0, s_shrunk))
        return (low, spec, jnp.where(below, basis, jnp.swapaxes(vt, 0, 1))), budget_ok, accurate | below

    basis = state.basis.astype(dtype)
    for _ in range(power_iters):
        basis = _orth(x.T @ _orth(x @ basis))
    answer, budget_ok, accurate = rayleigh_ritz(basis)

    # Refinement: while only accuracy is missing, step on from the Ritz vectors (a
    # budget that is too small needs the full SVD whatever we do).
    def needs_refining(carry):
        tries, _, budget_ok, accurate = carry
        return (tries < refine) & budget_ok & ~accurate

    def refine_step(carry):
        tries, answer, _, _ = carry
        return (tries + 1,) + rayleigh_ritz(answer[2])

    _, answer, budget_ok, accurate = jax.lax.while_loop(
        needs_refining, refine_step, (jnp.asarray(0, jnp.int32), answer, budget_ok, accurate))
    return _fall_back_unless((budget_ok & accurate) | below, x, tau, answer, state)


def _fall_back_unless(ok, x, tau, answer, state):
    """``answer`` = (low, spec, basis) where ``ok``, else the full SVD's: a while_loop
    that runs zero times or once (see the module docstring)."""
    k = state.basis.shape[-1]

    def needs_full(carry):
        return ~carry[0]

    def full(carry):
        # Read x through the carry's flag: a body that only uses loop invariants is
        # hoisted out of the loop by XLA (the full SVD would then run every call).
        x_now = jnp.where(carry[0], jnp.zeros_like(x), x)
        return (jnp.asarray(True),) + _full_branch(x_now, tau, k)

    _, low, spec, new_basis = jax.lax.while_loop(needs_full, full, (ok,) + tuple(answer))
    new_state = SubspaceState(basis=new_basis, fallbacks=state.fallbacks + (~ok).astype(jnp.int32))
    return (low, spec), new_state
