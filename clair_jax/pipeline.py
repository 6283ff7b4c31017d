"""The CLAIR pipeline: stack → decompose & detect → pool → refine → report.

:func:`clair` is the entry point for one group of updates of one shape;
:func:`clair_groups` takes several groups (modules of different shapes) and
judges every client once over all of them. Each stage lives in the module named
after it and works on a flat batch of single (K, p, q) problems.
"""

from __future__ import annotations

import concurrent.futures
import sys
import warnings
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clair_jax import _checks, centre, detect, pool, refine, report, stack
from clair_jax._compile import host_lanes, in_lanes
from clair_jax.options import ClairOptions
from clair_jax.lora import LoRAFactors

__all__ = ["Screening", "clair", "clair_groups", "conclude", "screen"]


def clair_groups(groups: Sequence, *, devices=None, coordinate_noise=None, update_noise=None, client_sizes=None,
                 centre_rank=None, **options) -> tuple:
    """CLAIR on several groups of updates that share their clients; one verdict per client.

    A model's adapted modules need not share one shape (grouped-query attention:
    q_proj 4096 × 4096 next to k/v_proj 1024 × 4096). Each group is stacked and
    decomposed on its own; the client verdict pools the evidence of every
    problem of every group (:func:`clair_jax.pool.client_verdict`), and each
    group is refined with that one verdict.

    Args:
        groups: a sequence of (..., K, p, q) arrays or :class:`~clair_jax.LoRAFactors`,
            the same K clients in the same order in each; shapes, LoRA ranks and
            leading axes may differ between groups.
        devices: as for :func:`clair`.
        coordinate_noise: None, or one entry per group, each None or a callable as
            for :func:`clair`.
        update_noise: for ``pooling="centre"``, None or one entry per group, each
            as for :func:`clair`.
        client_sizes: as for :func:`clair`.
        centre_rank: as for :func:`clair`.
        **options: as for :func:`clair`.

    Returns:
        A tuple of :class:`~clair_jax.ClairResult`, one per group, whose
        ``client_benign``, ``client_scores`` and ``client_z`` are the same pooled verdict.

    Example:
        >>> import clair_jax as cj
        >>> fed = cj.data.make_federation(0, num_clients=12, p=10, q=3, rank=2, contamination=0.25)
        >>> wide, narrow = cj.clair_groups([fed.updates, fed.updates[..., :2]])
        >>> bool((wide.client_benign == fed.benign).all()), narrow.refined.shape
        (True, (12, 10, 2))
    """
    _check_centre_early(groups, options.get("pooling", "none"), update_noise, client_sizes, centre_rank)
    return conclude(screen(groups, devices=devices, **options), coordinate_noise=coordinate_noise,
                    update_noise=update_noise, client_sizes=client_sizes, centre_rank=centre_rank)


def _check_centre_early(groups, pooling, update_noise, client_sizes, centre_rank):
    """The centre-pooling arguments, checked before any solving (errors name the argument)."""
    if pooling != "centre":
        if update_noise is not None or client_sizes is not None or centre_rank is not None:
            raise ValueError("update_noise=, client_sizes= and centre_rank= belong to centre pooling: pass "
                             f"pooling='centre' (got pooling={pooling!r})")
        return
    if centre_rank is not None:
        _checks.check_int(centre_rank, "centre_rank", low=1)
    try:
        first = groups[0].B if isinstance(groups[0], LoRAFactors) else groups[0]
        k = first.shape[-3]
    except (IndexError, AttributeError, TypeError):
        return   # the stack stage names what is wrong with the updates
    if client_sizes is not None:
        centre._check_per_client(client_sizes, "client_sizes", (), k, positive=True)
    if update_noise is not None:
        if not isinstance(update_noise, (list, tuple)) or len(update_noise) != len(groups):
            raise TypeError(f"update_noise must be a list with one entry per group ({len(groups)}), "
                            f"got {type(update_noise).__name__}")
        for g, nu in zip(groups, update_noise):
            if nu is not None:
                lead = (g.B if isinstance(g, LoRAFactors) else g).shape[:-3]
                centre._check_per_client(nu, "update_noise", tuple(lead), k)


class Screening(NamedTuple):
    """What :func:`screen` found in this process's groups: stages 1–2, before any verdict.

    Attributes:
        problems: one :class:`clair_jax.stack.Problems` per group.
        detections: one :class:`clair_jax.detect.Detection` per group.
        options: the checked :class:`~clair_jax.ClairOptions`.
    """

    problems: tuple
    detections: tuple
    options: ClairOptions

    def evidence(self) -> tuple:
        """(benign, scores, z, usable), each (n, K) over every problem of every group: what
        the client verdict pools. Small: processes that screened their own problems gather
        it (concatenated on the first axis) and pass it to :meth:`verdict`."""
        return tuple(_concat([getattr(d, f) for d in self.detections]) for f in ("benign", "scores", "z", "usable"))

    def verdict(self, evidence=None) -> pool.ClientVerdict:
        """Stage 3, one verdict per client from ``evidence`` (default: :meth:`evidence`),
        with this screening's ``z_crit``, ``min_gap`` and ``threshold``."""
        o = self.options
        return pool.client_verdict(*(self.evidence() if evidence is None else evidence),
                                   z_crit=o.z_crit, min_gap=o.min_gap, threshold=o.threshold)


def screen(groups: Sequence, *, devices=None, **options) -> Screening:
    """Stages 1–2 of :func:`clair_groups`: stack, decompose and screen every problem, no verdict yet.

    ``cj.conclude(cj.screen(groups, **options))`` is ``cj.clair_groups(groups, **options)``.
    Apart, they let several processes (hosts) share one federation's problems: each
    screens its own share, the small evidence is gathered, and each refines its
    share with the one pooled verdict, exactly as one process over every problem::

        s = cj.screen([my_modules], devices=jax.local_devices())
        everyone = [np.concatenate(e) for e in zip(*gather(s.evidence()))]   # e.g. process_allgather
        (mine,) = cj.conclude(s, s.verdict(everyone))

    Args and options: as for :func:`clair_groups`.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> fed = cj.data.make_federation(0, num_clients=12, p=10, q=3, rank=2, contamination=0.25)
        >>> host_a, host_b = cj.screen([fed.updates[..., :2]]), cj.screen([fed.updates])
        >>> pooled = host_a.verdict([jnp.concatenate(e) for e in zip(host_a.evidence(), host_b.evidence())])
        >>> (res,) = cj.conclude(host_b, pooled)
        >>> bool((res.client_benign == fed.benign).all())
        True
    """
    opts = ClairOptions.checked(**options)
    if not isinstance(groups, (list, tuple)) or hasattr(groups, "_fields"):
        raise TypeError("groups must be a list or tuple of update arrays / cj.LoRAFactors "
                        f"(for one group call cj.clair), got {type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups must hold at least one group of updates")
    names = ["updates"] if len(groups) == 1 else [f"groups[{i}]" for i in range(len(groups))]
    groups = [_checks.check_updates(g, name) for g, name in zip(groups, names)]
    devices = _checks.check_devices(devices)
    shapes = {name: _checks.block_shape(g, opts.side) for g, name in zip(groups, names)}
    if len({k for k, _, _ in shapes.values()}) > 1:
        raise ValueError(f"every group must hold the same clients, got client counts "
                         f"{ {name: k for name, (k, _, _) in shapes.items()} }")
    for (k, p, q), name in zip(shapes.values(), names):
        _checks.check_rank(opts.rank, (p, q), k, "rank" if len(names) == 1 else f"rank (for {name})")

    if devices is None:
        problems = [_stack_compiling_ahead(g, opts) for g in groups]
        _check_some_client_finite(problems, names)
        detections = [detect.until_settled(p, opts) for p in problems]
    else:
        problems, detections = zip(*(_detect_on_devices(g, opts, devices) for g in groups))
        _check_some_client_finite(problems, names)
    return Screening(tuple(problems), tuple(detections), opts)


def _stack_compiling_ahead(updates, opts):
    """Stage 2 on one group; while LoRA factors are reduced (seconds for a model's worth
    of modules), the detection's programs compile for the problems to come."""
    if not isinstance(updates, LoRAFactors) or host_lanes(jax.default_backend()) < 2:
        return stack.problems(updates, opts.side)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clair-compile") as ahead:
        compiled = ahead.submit(detect.compile_ahead, *stack.problem_shape(updates, opts.side), opts)
        problems = stack.problems(updates, opts.side)
        compiled.result()   # its errors are the call's
    return problems


def _check_some_client_finite(problems, names):
    """Refuse input where every client's update holds NaN/Inf: there is nothing to judge."""
    k = problems[0].num_clients
    usable = np.all(np.concatenate([np.reshape(p.usable, (-1, k)) for p in problems]), axis=0)   # (host: no compilation)
    if not usable.any():
        where = names[0] if len(names) == 1 else "groups"
        raise ValueError(f"{where}: no client has finite data: every one of the {k} clients' updates holds "
                         "NaN or Inf (a client with any non-finite entry is excluded), so there is nothing "
                         "to aggregate")


def conclude(screening: Screening, verdict: pool.ClientVerdict | None = None, *, coordinate_noise=None,
             update_noise=None, client_sizes=None, centre_rank=None) -> tuple:
    """Stages 3–5 of :func:`clair_groups`: pool the verdict, refine every group, report.

    Args:
        screening: :func:`screen`'s answer.
        verdict: the client verdict to refine with; default ``screening.verdict()``,
            this screening's own evidence. Several processes that screened their own
            share of the problems pass the verdict pooled over everyone's evidence.
            Where its ``status`` is None (as :meth:`Screening.verdict` returns it) the
            status is read from this process's problems (:func:`clair_jax.pool.client_status`);
            processes that share a federation pool their results with
            :func:`clair_jax.pool_verdicts` for one status over every problem.
        coordinate_noise: None, or one entry per group, each None or a callable as
            for :func:`clair` (needs ``pooling="auto"`` and dense updates).
        update_noise: for ``pooling="centre"``, as for :func:`clair_groups`.
        client_sizes: as for :func:`clair`.
        centre_rank: as for :func:`clair`.

    Returns:
        A tuple of :class:`~clair_jax.ClairResult`, one per group.
    """
    if not isinstance(screening, Screening):
        raise TypeError(f"screening must be what cj.screen returns, got {type(screening).__name__}")
    problems, detections, opts = screening
    verdict = screening.verdict() if verdict is None else verdict
    if not isinstance(verdict, pool.ClientVerdict) or verdict.benign.shape != (problems[0].num_clients,):
        raise ValueError(f"verdict must be a cj.ClientVerdict over the {problems[0].num_clients} clients "
                         "(from Screening.verdict or cj.pool.client_verdict)")
    reporters = _check_coordinate_noise(coordinate_noise, problems, opts)
    noises = _check_centre(update_noise, client_sizes, problems, opts)
    inside = "none" if opts.pooling == "centre" else opts.pooling   # centre pooling follows the projection
    refinements = [refine.refine(p, d, verdict.benign, rank=opts.rank, pooling=inside,
                                 noise_given=opts.noise is not None, coordinate_noise=c)
                   for p, d, c in zip(problems, detections, reporters)]

    n_empty = sum(int((np.asarray(r.rank) == 0).sum()) for r in refinements)
    if n_empty:
        n_all = sum(int(r.rank.size) for r in refinements)
        warnings.warn(f"clair: no shared subspace found (r̂ = 0) in {n_empty} of {n_all} problem(s); "
                      "their benign clients keep their local updates", RuntimeWarning, stacklevel=_outside())
    n_crowded = sum(int(np.asarray(r.crowded).sum()) for r in refinements)
    if n_crowded:
        n_all = sum(int(r.rank.size) for r in refinements)
        warnings.warn(f"clair: r̂ reaches a fifth of the benign stack's short side in {n_crowded} of {n_all} "
                      "problem(s): σ̂, read from the stack's median singular value, may hold shared signal there; "
                      "dense blocks read σ̂ and r̂ again from the spectrum's bulk and shrink the shared directions "
                      "(where that bulk is under half the spectrum, and for LoRA factors, the benign clients keep "
                      "their off-subspace part); pass noise= (the per-entry noise std) or rank= where known",
                      RuntimeWarning, stacklevel=_outside())
    if verdict.status is None:
        # The public status: outside Ŝ, honest but noisy where noise-like in every problem
        # with a shared subspace (pool.client_status); over this process's problems.
        status = pool.client_status(verdict.benign, _concat([r.noisy for r in refinements]),
                                    _concat([r.rank for r in refinements]))
        verdict = verdict._replace(status=status)
    results = tuple(report.assemble(p, d, verdict, r) for p, d, r in zip(problems, detections, refinements))
    if opts.pooling == "centre":
        served = verdict.status != pool.CONTAMINATED
        results = tuple(_pool_centre(res, verdict.benign, served, nu, client_sizes, centre_rank)
                        for res, nu in zip(results, noises))
    return results


def _pool_centre(result, members, served, update_noise, client_sizes, rank):
    """Stage 6b (:mod:`clair_jax.centre`) on one group's refined updates."""
    if not bool(jnp.any(members)):
        return result
    out = centre.pool_toward_centre(result.refined, members, served, update_noise=update_noise,
                                    client_sizes=client_sizes, rank=rank)
    return result._replace(refined=out.refined, centre_weight=out.weight)


def _check_centre(update_noise, client_sizes, problems, opts):
    """One update_noise entry (or None) per group; only with pooling="centre"."""
    if opts.pooling != "centre":
        if update_noise is not None or client_sizes is not None:
            raise ValueError("update_noise= and client_sizes= set the noise of centre pooling: pass "
                             f"pooling='centre' (got pooling={opts.pooling!r})")
        return [None] * len(problems)
    if update_noise is None:
        return [None] * len(problems)
    if not isinstance(update_noise, (list, tuple)) or len(update_noise) != len(problems):
        raise TypeError(f"update_noise must be a list with one entry per group ({len(problems)}), "
                        f"got {type(update_noise).__name__}")
    return list(update_noise)




def _check_coordinate_noise(coordinate_noise, problems, opts):
    """One callable (or None) per group, each usable where it is given."""
    if coordinate_noise is None:
        return [None] * len(problems)
    if callable(coordinate_noise) or not isinstance(coordinate_noise, (list, tuple)) \
            or len(coordinate_noise) != len(problems):
        raise TypeError(f"coordinate_noise must be None or a list with one entry per group ({len(problems)}), "
                        f"each None or a callable; got {coordinate_noise!r}")
    for i, (c, p) in enumerate(zip(coordinate_noise, problems)):
        where = "" if len(problems) == 1 else f" (group {i})"
        if c is None:
            continue
        if not callable(c):
            raise TypeError(f"coordinate_noise{where} must be a callable Û → (..., K, r) noise, got {c!r}")
        if opts.pooling != "auto":
            raise ValueError(f"coordinate_noise{where} sets the noise of partial pooling: pass pooling='auto' "
                             f"(got pooling={opts.pooling!r})")
        if p.factored:
            raise ValueError(f"coordinate_noise{where} needs dense updates: LoRA factors keep the projection "
                             "(a pooled update would not have the client's LoRA shape)")
    return list(coordinate_noise)


def _detect_on_devices(updates, opts, devices):
    """Stages 2–4 with the problems cut into one contiguous chunk per device.

    Each chunk runs as its own single-device program on its device, dispatched
    from a thread of its own (JAX releases the GIL while a program runs), so the
    devices work at the same time; results are gathered on ``devices[0]``. CPU
    host devices share one XLA:CPU thread pool, so at most
    ``_compile.host_lanes("cpu")`` of them run at once (more would hang XLA:CPU:
    ``benchmarks/investigations/cpu_concurrency.py``).
    """
    chunks, lead, size = stack.split(updates, len(devices))   # equal chunks: one program

    def one(args):
        chunk, device = args
        with jax.default_device(device):
            problems = stack.problems(jax.device_put(chunk, device), opts.side)
            return problems, detect.until_settled(problems, opts)

    platform = devices[0].platform
    at_once = len(chunks) if platform != "cpu" else host_lanes(platform)
    parts = in_lanes(one, list(zip(chunks, devices)), at_once)
    home = devices[0]
    return (stack.concatenate([p for p, _ in parts], lead, size, home),
            detect.concatenate([d for _, d in parts], size, home))


def _outside():
    """The stacklevel of the first caller outside clair_jax (for warnings.warn from this module)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("clair_jax"):
        frame, level = frame.f_back, level + 1
    return level


def _concat(arrays):
    return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=0)


def clair(
    updates,
    *,
    rank: int | None = None,
    lam=None,
    noise="auto",
    side: str = "left",
    threshold: float | None = None,
    tol: float | None = None,
    max_iter: int = 3000,
    min_gap: float = detect.MIN_GAP,
    refit: bool = True,
    z_crit: float = 5.0,
    svt: str = "auto",
    devices=None,
    pooling: str = "none",
    coordinate_noise=None,
    update_noise=None,
    client_sizes=None,
    centre_rank: int | None = None,
) -> report.ClairResult:
    r"""Find the contaminated clients and refine every benign client's update.

    The stages, each over all problems (leading axes are layers/modules):

    1. **stack** (:func:`clair_jax.stack.problems`): clients whose update holds
       NaN/Inf are flagged and zeroed; LoRA factors are reduced exactly to a small
       problem (never densified);
    2. **decompose and detect** (:func:`clair_jax.detect.until_settled`): blocks
       far above the median norm are scaled down (their column space is kept);
       the penalised decomposition ½‖M − L − C‖² + μ(‖L‖_* + λΣ‖C_k‖_F) is solved
       on a grid of λ at μ = σ̂(√p + √n), σ̂ the robust noise level and n the
       stack's noise columns (the exact program min ‖L‖_* + λΣ‖C_k‖_F s.t.
       L + C = M where μ is negligible); the first λ whose scores
       s_k = ‖Ĉ_k‖_F/‖Θ̂_k‖_F split cleanly gives a collaborative set, which a
       refit test of each client's off-subspace energy confirms or corrects;
       passes repeat (at most 3) while the benign stack's noise level moves μ;
    3. **pool** (:func:`clair_jax.pool.client_verdict`): one verdict per client:
       benign in most problems, a mean score that does not split off, a mean
       refit z at most ``z_crit`` and a largest one at most
       2·√(z_crit² + 2 ln n) over n ≥ 2 problems;
    4. **refine** (:func:`clair_jax.refine.refine`): Û = leading r̂ left singular
       vectors of the stacked benign updates, r̂ from the noise edge of their
       spectrum, at most rank(L̂), and only directions shared by several
       clients and carried by a majority of them; Θ̃_k = Û Ûᵀ Θ̂_k for benign
       k (plus the share α_k of its off-subspace part that is more than noise),
       and for a flagged client whose update looks like an honest one under
       heavier noise (``noisy``); Θ̂_k for the others;
    5. **report** (:class:`~clair_jax.ClairResult`).

    Args:
        updates: (..., K, p, q) array of client updates, or :class:`~clair_jax.LoRAFactors`
            with B (..., K, p, r) and A (..., K, r, q) (reduced exactly, never densified;
            numpy factors stay in host memory and go to the device a chunk of modules at a time).
        rank: r̂, at most min(p, K·q); default chosen from the spectrum.
        lam: λ; default chosen from a grid by the block scores. A float fixes it.
        noise: ``"auto"`` (estimate σ) or σ ≥ 0, the per-entry noise std in the
            input's units (0 means noiseless).
        side: ``"left"`` shares the column space (span of the B's), ``"right"`` the row space.
        threshold: fixed score threshold τ in [0, 1] (Ŝ = {s_k ≤ τ}); default: widest gap.
        tol: the λ path's solver tolerance (default by dtype: 1e-4 in float32, 1e-7 in
            float64; the path is a screen whose scores are read across a gap of at least
            ``min_gap``, see :data:`clair_jax.detect.SCREEN_TOL`).
        max_iter: solver iteration cap.
        min_gap: smallest score gap read as contamination (see :mod:`clair_jax.detect`).
        refit: after the score split, re-test every client by its off-subspace
            energy against the benign population (:func:`clair_jax.detect.residual_test`).
        z_crit: how many robust standard deviations above the benign median the
            refit test allows.
        svt: ``"auto"`` (default), ``"full"`` or ``"partial"``: the solvers' singular-value
            thresholding, as in :func:`clair_jax.decompose` (all agree to the solver tolerance).
        devices: None (the default device), or a list of JAX devices: the problems
            (leading axes) are cut into one contiguous chunk per device and each
            chunk is decomposed and screened on its own device, at the same time (on CPU
            host devices as many at once as ``clair_jax._compile.host_lanes`` allows);
            verdicts and refinement are then computed on
            ``devices[0]``. Same results as one device. With several hosts
            (``jax.distributed``), each process passes its ``jax.local_devices()`` to
            :func:`screen` with its share of the modules and refines with the verdict
            pooled over every host (:func:`conclude`).
        pooling: ``"none"`` (default): Θ̃_k = Û Ûᵀ Θ̂_k; ``"auto"``: each benign client's
            coordinates inside Û shrunk toward the benign centre by an empirical-Bayes Λ
            (homogeneous clients get about the benign FedAvg, heterogeneous ones keep
            theirs); ``"full"``: Λ = 0. Λ is reported as ``shrinkage``. Dense input only
            (LoRA factors keep the projection). See :func:`clair_jax.refine.partial_pool`.
            ``"centre"``: every client not contaminated gets C + λ_k(Θ̃_k − C), C the
            geometric median of the collaborative set's refined updates and
            λ_k = max(½, (1 − ν_k/‖Θ̃_k − C‖²)₊) from its noise ν_k (½ without
            ``update_noise`` or ``client_sizes``), in the whole space (dense or
            LoRA: the refined factors then have rank r + ``centre_rank``); λ_k is
            reported as ``centre_weight``. See :mod:`clair_jax.centre`.
        coordinate_noise: for ``pooling="auto"``, an optional callable the refinement
            asks once Û is known: Û, shaped as ``ClairResult.subspace`` (..., p, r_max),
            → (..., K, r_max), the variance each client's coordinates carry along each
            direction of Û (its row of ÛᵀΘ̂_k, summed over q; ÛᵀΘ̂_kᵀ with ``side="right"``).
            Read from the updates alone, Λ assumes the noise is as large along Û as off
            it; clients that refit on their own data say how large it is
            (:func:`clair_jax.estimators.coordinate_noise`, a jackknife). In a federation
            this is a second round: the server sends Û, each client returns r numbers.
            Calibrated so, the pooling model also tells which clients it cannot
            explain: a benign-judged client whose coordinates inside Û lie far beyond
            its noise (another task inside Û) is set aside (``outlying``), Û is fitted
            again without it (f is asked once more) and it keeps its update.
        update_noise: for ``pooling="centre"``, (..., K) or (K,) ν_k, each client's
            measured noise energy E‖E_k‖²_F per problem (:func:`clair_jax.centre.noise_from_halves`).
        client_sizes: for ``pooling="centre"`` without ``update_noise``: (K,) training
            examples per client; the noise is read as ĉ/n_k from the spread
            (:func:`clair_jax.centre.size_noise`).
        centre_rank: the rank of the centre for LoRA input (default 2 r).

    Returns:
        :class:`~clair_jax.ClairResult`.

    Example:
        >>> import clair_jax as cj
        >>> fed = cj.data.make_federation(0, num_clients=16, p=12, q=4, rank=2, contamination=0.25)
        >>> res = cj.clair(fed.updates)
        >>> bool((res.benign == fed.benign).all())
        True
    """
    return clair_groups([updates], rank=rank, lam=lam, noise=noise, side=side, threshold=threshold, tol=tol,
                        max_iter=max_iter, min_gap=min_gap, refit=refit, z_crit=z_crit, svt=svt, devices=devices,
                        pooling=pooling, coordinate_noise=None if coordinate_noise is None else [coordinate_noise],
                        update_noise=None if update_noise is None else [update_noise], client_sizes=client_sizes,
                        centre_rank=centre_rank)[0]
