"""Stage 4b: the refit test of a collaborative set (one problem).

Û is fitted on the current set (:mod:`clair_jax.basis`) and every client's
off-subspace energy e_k = ‖(I − ÛÛᵀ)Θ̂_k‖_F² is read against the set's own
population of energies, like with like: a member (in the fit) against the
members' in-sample energies, an outsider (not in the fit) against what the
members' energies would be had each been left out (:func:`held_out_excess`).
Clients out of range leave the set, outsiders in range return, and the test is
repeated on the new set until it keeps its set (:func:`residual_test`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clair_jax.basis import StackSVD, majority_basis, shared_basis, stack_svd
from clair_jax.robust import (ENTRY_CLIP, HEAVY_TAIL_RATIO, heavy_tailed, masked_median, robust_units, scaled_norms,
                              size_exponent, winsorised_energies)

__all__ = ["ResidualTest", "residual_test", "held_out_excess", "coordination_z", "COORDINATION_STEPS",
           "COORDINATED_SHARE", "ENTRY_CLIP", "HEAVY_TAIL_RATIO", "HELD_OUT_WIDTH", "HELD_OUT_MIN_SET"]

#: A member's held-out energy (:func:`held_out_excess`) is computed inside the
#: stack's leading HELD_OUT_WIDTH singular directions (exact where the stack's
#: short side is no longer; leaving one client out moves the top r̂ directions
#: mostly within the top r̂ + q).
HELD_OUT_WIDTH = 64

#: ... and only in a set of at least HELD_OUT_MIN_SET members (leaving one of two
#: out fits the subspace on a single client).
HELD_OUT_MIN_SET = 3


#: The direction outsiders share is found by COORDINATION_STEPS power steps (from
#: their largest residual column), once for each client without its own residual.
COORDINATION_STEPS = 30


#: ... and a client is read as coordinated only when more than COORDINATED_SHARE of its
#: off-subspace energy lies along that direction.
COORDINATED_SHARE = 0.5


def coordination_z(resid, usable, outsiders, columns, rel_floor, z_crit, steps=COORDINATION_STEPS):
    """(K,) how far each client's residual carries the direction the outsiders share.

    Clients that coordinate share a direction of their own; inside the set the
    majority check (:func:`clair_jax.basis.majority_basis`) turns it into
    off-subspace energy, and the refit flags those whose energy is out of range.
    An attacker whose update is small is then out of range along that direction
    but not overall (its whole off-subspace energy is below an honest client's
    noise), and once its partners have left the set the direction is no longer in
    the set's spectrum: read overall it comes back. Here the direction is read
    from the outsiders instead: for each client k, v_k is the leading direction of
    the other outsiders' residuals ((I − ÛÛᵀ)Θ̂_j, j outside the set, j ≠ k; power
    steps from their largest residual column), and k's energy along v_k,
    ‖v_kᵀR_k‖², is compared with every other usable client's energy along it
    (median and MAD, at least the χ² spread of noise over a client's
    ``columns``). The benign clients are a majority of the usable ones, so the
    median is theirs: noise where v_k is a direction only a minority carries (an
    attack), and the shared signal where honest clients were left out of a
    wrong set and v_k is theirs (then nobody stands out along it). A
    coordinated client carries the minority's direction whatever its size. The
    evidence counts only where v_k is shared: at least two other outsiders are
    out of range along it (``z_crit``); one outsider's own direction (a boosted
    attack) is no group, and honest updates with distinctive data carry some of
    it (real LLM roles: up to z 60 along one module's).

    Args:
        resid: (K, p, q) off-subspace residuals, in the units energies are read in.
        usable: (K,) finite clients. outsiders: (K,) usable clients outside the set.
        columns: (K,) noise columns. rel_floor: relative energy that is rounding.
        z_crit: standard deviations above the median read as out of range.
    """
    k, p, q = resid.shape
    dtype = resid.dtype
    out = jnp.where(outsiders[:, None, None], resid, 0.0)
    stacked = jnp.transpose(out, (1, 0, 2)).reshape(p, k * q)                 # (p, K q)
    # Start: the outsiders' largest residual column.
    start = stacked[:, jnp.argmax(jnp.sum(jnp.square(stacked), axis=0))]
    start = start / jnp.maximum(jnp.linalg.norm(start), jnp.finfo(dtype).tiny)

    def step(v, _):
        # (G − R_k R_kᵀ) v_k for every k at once, G = Σ_outsiders R_j R_jᵀ.
        shared = (stacked @ (stacked.T @ v.T)).T                             # (K, p)
        own = jnp.einsum("kpq,kq->kp", out, jnp.einsum("kpq,kp->kq", out, v))
        w = shared - own
        return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), jnp.finfo(dtype).tiny), None

    v, _ = jax.lax.scan(step, jnp.broadcast_to(start, (k, p)), None, length=steps)
    along = jnp.sum(jnp.square(jnp.einsum("dp,jpq->djq", v, resid)), axis=-1)   # (direction k, client j)
    own = jnp.diagonal(along)
    others = usable[None, :] & ~jnp.eye(k, dtype=bool)
    row_median = jax.vmap(masked_median)
    centre = row_median(along, others)
    mad = row_median(jnp.abs(along - centre[:, None]), others)
    typical = jnp.maximum(jnp.median(columns), 1).astype(dtype)
    spread = jnp.maximum(1.4826 * mad, centre * jnp.sqrt(2.0 / typical))
    scores = (along - centre[:, None]) / jnp.maximum(spread, jnp.finfo(dtype).tiny)[:, None]   # (direction k, client j)
    z = jnp.diagonal(scores)
    size2 = jnp.sum(jnp.square(resid), axis=(-2, -1))
    z = jnp.where(own - centre <= rel_floor * jnp.maximum(size2, jnp.finfo(dtype).tiny), jnp.minimum(z, 0.0), z)
    # Evidence only where v_k is shared: at least two other outsiders carry it out of
    # range (one outsider's own direction, or a lone attacker's, says nothing of k).
    carriers = jnp.sum((scores > z_crit) & outsiders[None, :] & ~jnp.eye(k, dtype=bool), axis=-1)
    share = own / jnp.maximum(size2, jnp.finfo(dtype).tiny)
    return jnp.where((carriers >= 2) & (share > COORDINATED_SHARE), z, 0.0)


def held_out_excess(svd, blocks, members, basis, rank, fit_rank, width=HELD_OUT_WIDTH):
    """(K,) off-subspace energy a member's own presence in the fit hides.

    A member of the set helped fit the subspace it is read against, so its
    in-sample energy is smaller than an outsider's would be: by a little for dense
    blocks (r̂ directions fitted on many noise columns), by 5–15× for LoRA
    updates whose shared rank is a third of the set's columns (the real-LLM
    federation). For member k this is the energy of Θ̂_k inside Û less that inside
    the top r̂ directions of the stack without it, both among the directions Û
    was chosen from (the stack's top ``fit_rank`` less those the shared and
    majority filters dropped, which count as off-subspace either way): an
    eigen-downdate of the stack's Gram matrix in the coordinates of its leading
    ``width`` left singular vectors. Zero for non-members. Added to a member's
    energy it reads the set out of sample, as outsiders are read.

    Args:
        svd: :class:`clair_jax.basis.StackSVD` of ``members``' stack with every
            singular vector. blocks: (K, p, q) in the units energies are read in.
        members: (K,) the set. basis: (p, r_max) Û (columns past ``rank`` zero).
        rank: r̂ (Û's columns). fit_rank: the plain fit's rank Û was filtered from.
    """
    k, _, q = blocks.shape
    w = min(int(width), svd.u.shape[-1], svd.vt.shape[0])
    u, s = svd.u[:, :w], svd.s[:w]
    coords = jnp.einsum("pw,kpq->kwq", u, blocks)                          # Θ̂_k in u's coordinates
    own = jnp.moveaxis((s[:, None] * svd.vt[:w]).reshape(w, k, q), 1, 0)   # (K, w, q): k's columns of the stack
    gram = jnp.diag(jnp.square(s))[None] - own @ jnp.swapaxes(own, -1, -2)
    # Keep out the directions the filters dropped: the fit's top fit_rank less Û.
    kept = jnp.swapaxes(u, 0, 1) @ basis                                   # Û in u's coordinates
    dropped = jnp.diag((jnp.arange(w) < fit_rank).astype(u.dtype)) - kept @ jnp.swapaxes(kept, 0, 1)
    allowed = jnp.eye(w, dtype=u.dtype) - dropped
    top = jnp.linalg.eigh(allowed @ gram @ allowed)[1][..., ::-1]          # descending
    lead = (jnp.arange(w) < jnp.minimum(rank, w))[None, :, None]
    fitted = jnp.sum(jnp.square(jnp.einsum("wr,kwq->krq", kept, coords)), axis=(-2, -1))
    left_out = jnp.sum(jnp.where(lead, jnp.square(jnp.einsum("kwj,kwq->kjq", top, coords)), 0.0), axis=(-2, -1))
    return jnp.where(members, jnp.maximum(fitted - left_out, 0.0), 0.0)


class ResidualTest(NamedTuple):
    benign: jax.Array      # (K,) bool
    z: jax.Array           # (K,) standardised excess off-subspace energy
    rank: jax.Array        # r̂ used for the subspace
    stable: jax.Array      # the last round kept its set (then ``svd`` is the final set's)
    rounds: jax.Array      # rounds run
    svd: object            # basis.StackSVD the last round fitted on (its leading vectors)

    @property
    def spectrum(self):
        """Singular values of the stack the last round fitted on, in the input's units."""
        return self.svd.s * self.svd.peak



def residual_test(blocks, benign, usable, rank_fn, *, z_crit, rel_floor, rounds=2, dims=None, columns=None,
                  carry_width=None):
    """Refit check of a collaborative set (stage 4b).

    Û from the current set, then every client's off-subspace energy
    e_k = ‖(I − ÛÛᵀ)Θ̂_k‖_F². Benign energies are one population (noise plus small
    heterogeneity); a client is kept when e_k ≤ m + z_crit·s, with m and s the
    median and MAD-scale of the current set (s at least the χ² spread
    m·√(2/((p − r̂)q)) of isotropic noise) plus ``rel_floor``·‖Θ̂_k‖_F² for
    rounding in noiseless data. Outside dense full-rank sets an outsider (read
    out of sample) is compared with the members' held-out energies instead
    (:func:`held_out_excess`): in-sample, a LoRA member's energy is 5–15× smaller
    than it would be out of sample, and read against those an honest client left
    out of the set would never come back. Squared energies with the noise level removed
    carry far more power than the norm shares of the convex scores when
    contamination hides in noise; the convex decomposition supplies the
    robust starting set the refit needs.

    Robustness: the blocks are first brought to the median client norm
    (:func:`robust_units`, so no energy overflows or underflows in float32 for
    any finite input); Û is fitted on blocks capped at :data:`clair_jax.basis.SUBSPACE_CLIP` ×
    the set's median norm (:func:`clair_jax.basis.capped`: a few aligned huge
    blocks cannot choose Û or r̂); Û keeps only the directions a majority of
    the set carries (:func:`clair_jax.basis.majority_basis`: a coordinated
    minority's own direction becomes off-subspace energy); and for dense full-rank blocks a client is
    flagged only when its energy is also out of range after its residual
    entries are winsorised at :data:`ENTRY_CLIP` robust standard deviations, so
    heavy-tailed noise (a few huge entries) is not read as contamination while
    dense contamination is; where the set's own noise is heavy-tailed (its
    median energy loses more than :data:`HEAVY_TAIL_RATIO` to winsorising) a
    client's median squared residual entry decides (log scale, spread from the
    set's lower half), so a dense attacker cannot hide inside the honest
    clients' wide spread of plain energies.

    Size is not evidence: where the set's updates differ widely in size and their
    off-subspace energy grows with it (e_k ∝ ‖Θ̂_k‖^(2β), :func:`size_exponent`),
    every residual is brought to the set's median size by (m/‖Θ̂_k‖²)^(β/2) before
    the energies above are read. Honest clients 1–100× apart in size with noise
    in proportion are then one population, and a small attacker (all of its
    update off Û) stands out of it; with similar sizes β = 0 and nothing changes.

    Args:
        blocks: (K, p, q) with unusable clients zeroed.
        benign: (K,) starting set. usable: (K,) finite clients.
        rank_fn: (singular values, benign) → r̂.
        z_crit: standard deviations above the median read as contamination.
        rel_floor: relative energy below which a residual is rounding.
        rounds: at most this many refits, each on the previous round's set (a round
            that keeps its set ends the test).
        dims: dense (p, q) when ``blocks`` is an exact LoRA reduction.
        columns: (K,) noise columns per block (:func:`clair_jax.tuning.effective_columns`);
            default q each.
        carry_width: how many singular vectors of the last round's SVD the result's
            ``svd`` keeps (static; default all): the refinement reuses it.
    """
    k, p, q = blocks.shape
    given = blocks
    short = min(p, k * q)
    carry = short if carry_width is None else min(int(carry_width), short)
    entrywise = dims is None or tuple(dims) == (p, q)   # not an exact (LoRA) reduction
    p, q = (p, q) if dims is None else dims
    # Scale first: every energy below is a number near 1 (overflow/underflow safe).
    blocks, unit = robust_units(blocks, usable)
    norms = scaled_norms(blocks)
    norms2 = jnp.square(norms)
    cols = jnp.full((k,), q) if columns is None else columns

    def one_round(state):
        current = state.benign
        # Û from blocks capped at SUBSPACE_CLIP × the set's median norm (basis.capped).
        # The SVD is of the given blocks (the stack divided by its largest entry
        # either way), so the refinement can reuse it as it is.
        svd = stack_svd(given, current)
        r_fit = rank_fn(svd.s * (svd.peak / unit), current)
        basis, r = shared_basis(svd.u, r_fit, blocks, current, spectrum=svd.s)
        # Directions only a coherent minority carries leave Û: their owners' energy
        # along them then counts as off-subspace, where the test sees it.
        basis, r = majority_basis(basis, r, blocks, current, p, cols, rel_floor=rel_floor)
        resid = blocks - basis @ jnp.einsum("pr,kpq->krq", basis, blocks)
        # Outsiders are read against the members' held-out energies (what their own
        # presence in the fit hides added back, held_out_excess), not against their
        # in-sample ones: for LoRA updates, whose few columns Û largely fits by itself,
        # the two differ 5-15x. Dense full-rank blocks (``veto``: their residual entries
        # are one population) spread noise over many columns: there the two differ
        # little and alike for every member, and the K eigendecompositions per round
        # are skipped. A set of two has no one to leave out.
        veto = entrywise & (masked_median(cols, current) >= q)
        hidden = jax.lax.cond(~veto & (jnp.sum(current) >= HELD_OUT_MIN_SET),
                              lambda: held_out_excess(svd, blocks, current, basis, r, r_fit),
                              lambda: jnp.zeros((k,), blocks.dtype))
        # Honest noise may grow with an update's size (more local steps, a larger
        # learning rate): then a client's energy is judged at the set's typical size.
        beta = size_exponent(jnp.sum(jnp.square(resid), axis=(-2, -1)) + hidden, norms2, current)
        resize = jnp.where(norms2 > 0, jnp.power(masked_median(norms2, current) / jnp.where(norms2 > 0, norms2, 1.0),
                                                   beta / 2), 1.0)
        resid = resid * resize[:, None, None]
        hidden = hidden * jnp.square(resize)
        sized = blocks * resize[:, None, None]
        # Two energies: plain, and with residual entries winsorised at ENTRY_CLIP
        # robust sd. Heavy-tailed noise inflates only the plain one, so a client is
        # flagged when both are out of the set's range.
        energy, clipped, limit = winsorised_energies(resid, current)
        dof = jnp.maximum((p - r) * masked_median(cols, current), 1).astype(blocks.dtype)

        def standardise(e, size2):
            # Like with like: a member against the members' in-sample energies, an
            # outsider against their held-out ones (e + hidden).
            def centre_spread(x):
                m = masked_median(x, current)
                mad = masked_median(jnp.abs(x - m), current)
                return m, jnp.maximum(1.4826 * mad, m * jnp.sqrt(2.0 / dof))
            m_in, s_in = centre_spread(e)
            m_out, s_out = centre_spread(e + hidden)
            m, s = jnp.where(current, m_in, m_out), jnp.where(current, s_in, s_out)
            z = (e - m) / jnp.maximum(s, jnp.finfo(blocks.dtype).tiny)
            # An excess within rounding is no evidence (noiseless data: s is rounding too).
            z = jnp.where(e - m <= rel_floor * size2, jnp.minimum(z, 0.0), z)
            return z, e <= m + z_crit * s + rel_floor * size2

        z_plain, ok_plain = standardise(energy, norms2 * jnp.square(resize))
        z_clip, ok_clip = standardise(clipped, jnp.sum(jnp.square(jnp.clip(sized, -limit, limit)), axis=(-2, -1)))
        # The veto only where the residual entries are one population (``veto`` above; a
        # LoRA block's residual lives in a few directions and its entries are not iid).
        # Where the set's own noise is heavy-tailed the plain energies of honest
        # clients spread so widely that a dense attacker of benign norm sits inside
        # their range: the median squared entry below decides. Elsewhere a client is
        # flagged when both are out of range (a few huge entries alone are not enough).
        heavy = veto & heavy_tailed(energy, clipped, current)
        # There even winsorised energies keep a long right tail; a client's median
        # squared residual entry does not, and on a log scale its spread over honest
        # clients is near-symmetric (Student-t, df = 2: honest z at most 3.8 and
        # Gaussian attackers of benign norm at least 7.3, 10 seeds of the zoo's case).
        log_typical = jnp.log(jnp.maximum(jnp.median(jnp.square(resid).reshape(k, -1), axis=-1),
                                          jnp.finfo(blocks.dtype).tiny))
        centre = masked_median(log_typical, current)
        # Spread from the set's lower half: contamination only raises this statistic,
        # and a third of the set raising it would otherwise widen a plain MAD.
        below = current & (log_typical <= centre)
        width = jnp.maximum(1.4826 * masked_median(centre - log_typical, below), jnp.sqrt(2.0 / dof))
        z_med = (log_typical - centre) / width
        ok_med = z_med <= z_crit
        z = jnp.where(heavy, z_med, jnp.where(veto, jnp.minimum(z_plain, z_clip), z_plain))
        keep = usable & jnp.where(heavy, ok_med, ok_plain | (veto & ok_clip))
        # LoRA: a client that carries the direction the outsiders share is one of
        # them, whatever its size (coordination_z). Not in the first round: its
        # outsiders are the convex screen's, which may hold honest clients that the
        # refit itself would readmit. (Dense sets: their coordinated minorities are
        # exposed by the majority check; the step is not even compiled for them.)
        if not entrywise:
            outsiders = usable & ~current
            z_coord = jax.lax.cond((state.rounds >= 1) & (jnp.sum(outsiders) >= 2) &
                                   (jnp.sum(current) >= HELD_OUT_MIN_SET),
                                   lambda: coordination_z(resid, usable, outsiders, cols, rel_floor, z_crit),
                                   lambda: jnp.zeros((k,), blocks.dtype))
            z = jnp.maximum(z, z_coord)
            keep = keep & (z_coord <= z_crit)
        # A refit never hands the majority to the other side.
        keep = jnp.where(2 * jnp.sum(keep) >= jnp.sum(usable), keep, current)
        kept = svd._replace(u=svd.u[:, :carry], vt=svd.vt[:carry])
        return ResidualTest(keep, z, r, jnp.all(keep == current), state.rounds + 1, kept)

    # A round that keeps its set would repeat itself: stop there (one SVD instead
    # of ``rounds`` in the common case).
    def more(state):
        return (state.rounds < rounds) & ~state.stable

    empty = StackSVD(benign, jnp.zeros((blocks.shape[1], carry), blocks.dtype), jnp.zeros((short,), blocks.dtype),
                     jnp.zeros((carry, k * blocks.shape[2]), blocks.dtype), jnp.zeros((k,), blocks.dtype),
                     jnp.ones((), blocks.dtype))
    init = ResidualTest(benign, jnp.zeros((k,), blocks.dtype), jnp.asarray(0, jnp.int32), jnp.asarray(False),
                        jnp.asarray(0, jnp.int32), empty)
    return jax.lax.while_loop(more, one_round, init)
