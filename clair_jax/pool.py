"""Stage 5: one verdict per client from the evidence of many problems.

A client's update spans several problems (the layers or modules of one model,
or the shape groups of :func:`clair_jax.clair_groups`); each problem gives it a
verdict, a score and a refit statistic. :func:`client_verdict` combines them;
:func:`pool_verdicts` does the same for several :class:`~clair_jax.ClairResult`
objects, so a user can judge clients over results computed separately.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clair_jax._compile import program
from clair_jax.detect import MIN_GAP, split_scores

__all__ = ["BENIGN", "NOISY", "CONTAMINATED", "STATUSES", "ClientVerdict", "client_status", "client_verdict",
           "layer_threshold", "pool_verdicts", "status_names"]

#: Client status codes (``ClairResult.client_status``, ``ClientVerdict.status``):
#: in the collaborative set (Û is fitted on it, it is refined) ...
BENIGN = 0
#: ... honest but noisy: left out of Û, its update the shared signal plus more
#: noise than the others' (:func:`clair_jax.refine.noise_like` in every problem
#: with a shared subspace); refined by projection, not accused ...
NOISY = 1
#: ... or contaminated: evidence off the shared subspace beyond what its own noise
#: explains (or a non-finite or repeated update); it keeps its update.
CONTAMINATED = 2
#: The names of the status codes, indexed by code.
STATUSES = ("benign", "noisy", "contaminated")


def layer_threshold(z_crit: float, n: int) -> float:
    """Threshold on a client's largest per-problem refit z over ``n`` problems: 2·√(z_crit² + 2 ln n).

    Contamination confined to one problem of many (an attacker in one layer of
    six) is plain in that problem (the zoo's class 5: refit z 15–21 there,
    honest clients ≤ 3.4) but averages away in the mean over problems (≤ 3.6).
    So the largest z counts too, against a threshold that grows with ``n``: the
    largest of n roughly Gaussian statistics grows like √(2 ln n), whence
    √(z_crit² + 2 ln n); the factor 2 keeps honest clients clear when their z
    is heavier-tailed than Gaussian (robust units, few clients, heterogeneity).
    z_crit = 5 gives 10.3 for n = 2, 10.7 for n = 6 and 11.8 for n = 128.

    For z_crit = 5 it sits just above :data:`clair_jax.refine.DECISIVE_Z` (10):
    a client above that in a problem is already kept out of that problem's Û;
    above this threshold it is also flagged as a client (it keeps its local
    update in every problem). A client between the two is trusted as a whole but
    not used to fit that one problem's subspace.

    Example:
        >>> round(layer_threshold(5.0, 6), 2)
        10.69
    """
    return 2.0 * math.sqrt(z_crit * z_crit + 2.0 * math.log(n))


class ClientVerdict(NamedTuple):
    """One verdict per client, pooled over problems.

    Attributes:
        benign: (K,) bool, the client-level collaborative set Ŝ: the clients Û is
            fitted on. False does not by itself accuse a client: read ``status``.
        scores: (K,) mean contamination score over problems.
        z: (K,) mean refit statistic over problems.
        nonfinite: (K,) bool, clients whose update holds NaN/Inf in some problem.
        status: (K,) int8, the public verdict: :data:`BENIGN` (in Ŝ), :data:`NOISY`
            (honest but noisier: outside Ŝ, refined by projection, not accused) or
            :data:`CONTAMINATED` (:func:`client_status`; names in :data:`STATUSES`,
            :func:`status_names`). None from :func:`client_verdict`, which sees only
            the detection's evidence: the noise test needs Û, so
            :func:`clair_jax.conclude` and :func:`pool_verdicts` fill it in.
    """

    benign: jax.Array
    scores: jax.Array
    z: jax.Array
    nonfinite: jax.Array
    status: jax.Array | None = None


@program   # one compilation for the handful of small operations
def client_status(benign, noisy, rank) -> jax.Array:
    """(K,) int8 status per client from the verdict and the refinement's per-problem evidence.

    A client of the collaborative set is :data:`BENIGN`. A client outside it is
    :data:`NOISY` (honest but noisy) when, in every problem with a shared subspace
    (r̂ > 0, at least one), its update looks like an honest one under heavier noise
    (``noisy``, :func:`clair_jax.refine.noise_like`: a flat residual spectrum, as
    isotropic noise leaves, and the shared signal inside Û); else it is
    :data:`CONTAMINATED`. Contamination confined to one problem (one layer) is
    structured there, so the client is contaminated. A client repeating another's
    update (``ClairResult.copies``) is outside the set (it would count twice) and
    follows the same rule: copies of an honest update cannot be told from their
    original, so none of them is accused (a copier is a free rider: it gets the
    projection of the update it copied); copies of a contaminated one are not
    noise-like and are.

    Args:
        benign: (K,) bool, the pooled collaborative set.
        noisy: (n, K) bool, per problem: outside the set, finite and noise-like.
        rank: (n,) r̂ per problem.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> noisy = jnp.array([[False, True, False], [False, True, True]])
        >>> s = cj.pool.client_status(jnp.array([True, False, False]), noisy, jnp.array([3, 3]))
        >>> " ".join(cj.pool.status_names(s))
        'benign noisy contaminated'
    """
    noisy = jnp.reshape(jnp.asarray(noisy, bool), (-1, jnp.shape(benign)[-1]))
    has_subspace = jnp.reshape(jnp.asarray(rank), (-1,))[:, None] > 0
    like = jnp.all(noisy | ~has_subspace, axis=0) & jnp.any(has_subspace)
    return jnp.where(benign, BENIGN, jnp.where(like, NOISY, CONTAMINATED)).astype(jnp.int8)


def status_names(status) -> list:
    """The names (:data:`STATUSES`) of a (K,) array of status codes."""
    return [STATUSES[int(s)] for s in jnp.reshape(jnp.asarray(status), (-1,)).tolist()]


def client_verdict(benign, scores, z, usable, *, z_crit=5.0, min_gap=MIN_GAP, threshold=None) -> ClientVerdict:
    """Pool per-problem verdicts (each argument (n, K)) into one per client.

    With one problem its own verdict (refit included) is the client's. With
    several, a client is benign when all three kinds of evidence agree:

    * it is benign in most problems (a majority vote);
    * its mean score over problems does not split off from the others'
      (contamination confined to a few modules shows there), or, with a fixed
      ``threshold``, stays at most the threshold;
    * its mean refit statistic is at most ``z_crit`` (weak but consistent excess
      off-subspace energy adds up over problems);
    * its largest refit statistic over the problems where it is usable is at
      most :func:`layer_threshold` (``z_crit``, n) = 2·√(z_crit² + 2 ln n), 10.7
      for z_crit = 5 and n = 6 (strong contamination confined to one problem,
      e.g. one layer of many, which the mean dilutes). It lies just above
      :data:`clair_jax.refine.DECISIVE_Z` = 10, the per-problem level above which
      a client is left out of that problem's Û whatever the pooled verdict.

    A client whose update is non-finite anywhere is contaminated.

    Example:
        >>> import jax.numpy as jnp, clair_jax as cj
        >>> benign = jnp.array([[True, True, False], [True, True, False]])
        >>> scores = jnp.array([[0.0, 0.0, 0.8], [0.0, 0.1, 0.7]])
        >>> v = cj.pool.client_verdict(benign, scores, jnp.zeros((2, 3)), jnp.ones((2, 3), bool))
        >>> v.benign.tolist()
        [True, True, False]
    """
    return _client_verdict(benign, scores, z, usable, z_crit=float(z_crit), min_gap=float(min_gap),
                           threshold=None if threshold is None else float(threshold))


@program(static_argnames=("z_crit", "min_gap", "threshold"))
def _client_verdict(benign, scores, z, usable, *, z_crit, min_gap, threshold):
    n = benign.shape[0]
    client_usable = jnp.all(usable, axis=0)
    mean_scores = jnp.mean(scores, axis=0)
    mean_z = jnp.mean(z, axis=0)
    if n == 1:
        return ClientVerdict(benign[0] & client_usable, mean_scores, mean_z, ~client_usable)
    by_vote = 2 * jnp.sum(benign, axis=0) > n
    if threshold is not None:
        by_score = mean_scores <= threshold
    else:
        by_score = split_scores(mean_scores, client_usable, min_gap).benign
    by_z = mean_z <= z_crit
    # The largest z over usable problems (n is static: it comes from the shape).
    max_z = jnp.max(jnp.where(usable, z, -jnp.inf), axis=0)
    by_max_z = ~(max_z > layer_threshold(z_crit, n))
    return ClientVerdict(client_usable & by_vote & by_score & by_z & by_max_z, mean_scores, mean_z, ~client_usable)


def pool_verdicts(results: Sequence, *, z_crit=5.0, min_gap=MIN_GAP, threshold=None) -> ClientVerdict:
    """One client verdict from several :class:`~clair_jax.ClairResult` (same K clients, same order).

    Every problem of every result counts once, exactly as if all problems had
    been solved in one :func:`clair_jax.clair` call (use the same ``z_crit``,
    ``min_gap`` and ``threshold`` as there). Results may differ in shapes and in
    their leading (module) axes.

    The pooled ``status`` (:func:`client_status`) reads each result's ``noisy``
    and ``rank``: a client outside the pooled set is honest but noisy
    when it is noise-like in every problem of every result with r̂ > 0.

    Example:
        >>> import clair_jax as cj
        >>> fed = cj.data.make_federation(0, num_clients=12, p=10, q=3, rank=2, contamination=0.25)
        >>> both = [cj.clair(fed.updates), cj.clair(fed.updates[..., :2])]
        >>> bool((cj.pool_verdicts(both).benign == fed.benign).all())
        True
    """
    results = list(results)
    if not results:
        raise ValueError("pool_verdicts needs at least one result")
    ks = {int(r.client_benign.shape[-1]) for r in results}
    if len(ks) != 1:
        raise ValueError(f"results must hold the same clients, got client counts {sorted(ks)}")
    k = ks.pop()

    def stacked(field):
        return jnp.concatenate([jnp.reshape(getattr(r, field), (-1, k)) for r in results])

    usable = jnp.concatenate([jnp.broadcast_to(~r.nonfinite, jnp.reshape(r.benign, (-1, k)).shape) for r in results])
    verdict = client_verdict(stacked("benign"), stacked("scores"), stacked("residual_z"), usable,
                             z_crit=z_crit, min_gap=min_gap, threshold=threshold)
    rank = jnp.concatenate([jnp.reshape(r.rank, (-1,)) for r in results])
    return verdict._replace(status=client_status(verdict.benign, stacked("noisy"), rank))
