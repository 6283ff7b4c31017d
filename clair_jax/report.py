"""Stage 7: what CLAIR found, in the user's layout — :class:`ClairResult`."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import numpy as np

from clair_jax.decompose import Decomposition
from clair_jax.lora import LoRAFactors
from clair_jax.pool import CONTAMINATED, NOISY, status_names
from clair_jax.stack import orient

__all__ = ["ClairResult", "assemble"]


class ClairResult(NamedTuple):
    """What CLAIR found. ``...`` are the input's leading (layer / module) axes.

    The public verdict is ``client_status`` (names: :meth:`statuses`): every
    client is ``"benign"`` (in the collaborative set Ŝ; Û is fitted on it),
    ``"noisy"`` (honest but noisier than the rest: kept out of Û, refined by
    projection, not accused) or ``"contaminated"`` (keeps its update). Integrations
    serve a refined update to every client that is not contaminated.
    ``client_benign`` is Ŝ, the set Û is fitted on: False there does not by
    itself accuse a client.

    Attributes:
        benign: (..., K) bool, the collaborative set of each problem.
        scores: (..., K) contamination scores ‖Ĉ_k‖_F/‖Θ̂_k‖_F in [0, 1].
        client_benign: (K,) bool, the collaborative set Ŝ pooled over all problems
            (the clients Û is fitted on); see :func:`clair_jax.pool.client_verdict`.
            A client outside it may be honest but noisy: read ``client_status``.
        client_scores: (K,) mean score over problems.
        client_z: (K,) mean refit statistic over problems (the pooled verdict
            flags a client whose mean exceeds ``z_crit``, or whose largest one
            exceeds :func:`clair_jax.pool.layer_threshold`).
        residual_z: (..., K) refit statistic: off-subspace energy above the benign
            median, in robust standard deviations (0 when ``refit=False``).
        nonfinite: (K,) bool, clients whose update holds NaN/Inf (always contaminated).
        subspace: (..., p, r_max) Û, orthonormal columns; columns ≥ ``rank`` are 0.
        rank: (...,) r̂; 0 where no shared direction was found (the benign updates of
            that problem are then returned unrefined, and a ``RuntimeWarning`` says so).
        refined: refined updates, the same kind as the input (array or LoRAFactors).
            LoRA factors given as numpy arrays come back in host memory: B̃ a numpy
            array, A the caller's own (a model's worth is never copied to the device whole).
        decomposition: :class:`~clair_jax.Decomposition` at the chosen λ (for LoRA
            input, of the reduced problem).
        lam: (...,) λ chosen.
        noise_level: (...,) σ̂ per entry, in the input's units.
        converged: (...,) bool, whether the chosen decomposition converged (False
            where any of its numbers is non-finite).
        shrinkage: (..., K, r_max) Λ used inside the subspace per client and
            direction: 1 keeps the client's own coordinate, 0 takes the benign
            centre's (all 1 with ``pooling="none"``; see :func:`clair_jax.refine.partial_pool`).
        local_share: (..., K) α_k in [0, 1], the share of its off-subspace part each
            refined client kept (:func:`clair_jax.refine.local_share`): 0 is the plain
            projection ÛÛᵀΘ̂_k; above 0 the client carried more outside Û than noise
            would, and its update was moved only part of the way (1 = its local update).
        noisy: (..., K) bool, per problem, clients outside Ŝ whose update looks like an
            honest one under heavier noise (a flat residual spectrum, the shared signal
            inside Û: :func:`clair_jax.refine.noise_like`). They stay out of Û, and their
            refined update there is the projection ÛÛᵀΘ̂_k. Noise-like in every problem
            with r̂ > 0 makes the client's status ``"noisy"``.
        copies: (..., K) bool, clients whose update repeats a lower-numbered client's
            (:func:`clair_jax.detect.repeated`): a repeated update counts once, so
            they are flagged and left out of Û (refined like any flagged client:
            projected when noise-like, else kept).
        crowded: (...,) bool, problems where r̂ reached a fifth of the benign stack's
            short side while σ̂ was estimated (:func:`clair_jax.refine.crowded`): σ̂ may
            hold shared signal there, and a ``RuntimeWarning`` says so. Dense blocks
            read σ̂ and r̂ again from the spectrum's bulk and shrink Û's directions
            (:func:`clair_jax.refine.bulk_shrinkage`); where that bulk would be under
            half the spectrum, and for LoRA factors, nothing is removed off Û (α = 1
            for every refined client). Pass ``noise=`` or ``rank=`` where known.
        outlying: (..., K) bool, clients the verdict calls benign whose coordinates
            inside Û lie farther from the benign centre than the noise they reported
            and the spread between clients explain (``coordinate_noise``,
            :func:`clair_jax.refine.pool_members`): Û was fitted again without them and
            they keep their update. All False without ``coordinate_noise``.
        client_status: (K,) int8, the public verdict per client:
            :data:`clair_jax.pool.BENIGN` (0), :data:`~clair_jax.pool.NOISY` (1) or
            :data:`~clair_jax.pool.CONTAMINATED` (2) (:func:`clair_jax.pool.client_status`;
            :meth:`statuses` gives the names).
        spectrum: (..., s) singular values of each problem's stacked benign updates (the
            detection's final set, capped), descending, in the input's units: what r̂ and
            σ̂ are read from (:meth:`plot` draws them).
        centre_weight: with ``pooling="centre"``, (..., K) λ_k, the weight each client's
            own refined update keeps beside the benign centre (1: its own; 0: the centre;
            :mod:`clair_jax.centre`); None otherwise.
    """

    benign: jax.Array
    scores: jax.Array
    client_benign: jax.Array
    client_scores: jax.Array
    client_z: jax.Array
    residual_z: jax.Array
    nonfinite: jax.Array
    subspace: jax.Array
    rank: jax.Array
    refined: Union[jax.Array, LoRAFactors]
    decomposition: Decomposition
    lam: jax.Array
    noise_level: jax.Array
    converged: jax.Array
    shrinkage: jax.Array
    local_share: jax.Array
    noisy: jax.Array
    copies: jax.Array
    crowded: jax.Array
    outlying: jax.Array
    client_status: jax.Array
    spectrum: jax.Array
    centre_weight: Optional[jax.Array] = None

    def plot(self, path=None, *, z_crit: float = 5.0, client_names=None, max_spectra: int = 6):
        """A picture of the verdict (needs matplotlib; imported only here).

        Three panels: each client's pooled refit z against ``z_crit`` (use the value
        the result was computed with), coloured by its status; a clients × problems
        heatmap of the per-problem refit z; up to ``max_spectra`` problems' stacked
        benign spectra with r̂ (circled) and the noise edge σ̂(√p + √n) (dotted).

        Args:
            path: also save the figure there (PNG, PDF or SVG by extension).
            client_names: K labels (default "client 0", ...).

        Returns:
            The matplotlib ``Figure``.

        Raises:
            ImportError: matplotlib is not installed.
        """
        from clair_jax.plotting import result_figure

        return result_figure(self, path, z_crit=z_crit, client_names=client_names, max_spectra=max_spectra)

    def statuses(self) -> list:
        """Each client's status by name: ``"benign"``, ``"noisy"`` or ``"contaminated"``.

        Example:
            >>> import clair_jax as cj
            >>> fed = cj.data.make_federation(0, num_clients=12, p=10, q=3, rank=2, contamination=0.25)
            >>> " ".join(cj.clair(fed.updates).statuses()[5:9])
            'benign contaminated contaminated contaminated'
        """
        return status_names(self.client_status)

    def contaminated(self) -> np.ndarray:
        """(K,) bool, the clients reported contaminated (status ``"contaminated"``)."""
        return np.asarray(self.client_status) == CONTAMINATED

    def summary(self) -> str:
        """A short human-readable report, one finding per line.

        Example:
            >>> import clair_jax as cj
            >>> fed = cj.data.make_federation(0, num_clients=12, p=10, q=3, rank=2, contamination=0.25)
            >>> print(cj.clair(fed.updates).summary().splitlines()[0])
            clients: 12, flagged contaminated: 3 [6, 7, 8]
        """
        flagged = np.flatnonzero(self.contaminated())
        honest_noisy = np.flatnonzero(np.asarray(self.client_status) == NOISY)
        rank = np.asarray(self.rank)
        converged = np.asarray(self.converged)
        lines = [
            f"clients: {self.client_benign.shape[-1]}, flagged contaminated: {len(flagged)} {flagged.tolist()}",
            f"shared rank r̂ (per problem): {_span(rank, '{:d}')}",
            f"λ chosen (sparsity weight):    {_span(np.asarray(self.lam), '{:.3g}')}",
            f"noise level σ̂ (per entry):     {_span(np.asarray(self.noise_level), '{:.3g}')}",
            f"solver converged: {int(converged.sum())}/{converged.size} problems",
        ]
        if honest_noisy.size:
            lines.append(f"honest but noisy (not contaminated: left out of Û, refined by projection): "
                         f"{honest_noisy.tolist()}")
        if not converged.all():
            overflow = ~converged & ~np.isfinite(np.asarray(self.decomposition.objective, np.float64)) \
                & np.all(np.isfinite(np.asarray(self.decomposition.block_norms, np.float64)), axis=-1)
            if overflow.any():
                lines.append(f"  {int(overflow.sum())} problem(s) flagged not converged because the objective "
                             "(∝ scale²) overflows the dtype at this input scale: divide the updates by a "
                             "common factor or use float64")
            if (~converged & ~overflow).any():
                lines.append("  not converged: raise max_iter or loosen tol; verdicts of those problems are provisional")
        if np.any(rank == 0):
            lines.append(f"no shared subspace (r̂ = 0) in {int(np.sum(rank == 0))} problem(s): "
                         "benign updates there are left as they were")
        if np.any(self.crowded):
            lines.append(f"r̂ near half the stack in {int(np.sum(self.crowded))} problem(s): σ̂ may hold shared "
                         "signal; dense blocks there read σ̂ and r̂ from the spectrum's bulk and shrink the shared "
                         "directions, LoRA factors keep their off-subspace part (pass noise= or rank=)")
        kept = self._in_any_problem(np.asarray(self.local_share) > 0.5)
        if kept.size:
            lines.append(f"refined only part of the way (> half their off-subspace part kept, weak evidence "
                         f"that it is noise): {kept.tolist()}")
        noisy = np.setdiff1d(self._in_any_problem(self.noisy), honest_noisy)
        if noisy.size:
            lines.append(f"contaminated, but noise-like in some problems (refined by projection there): "
                         f"{noisy.tolist()}")
        outlying = self._in_any_problem(self.outlying)
        if outlying.size:
            lines.append(f"benign but not explained inside Û by their reported noise (left out of Û and the "
                         f"pooled centre, keep their update): {outlying.tolist()}")
        copies = self._in_any_problem(self.copies)
        if copies.size:
            lines.append(f"repeat another client's update (counted once, left out of Û): {copies.tolist()}")
        if np.any(self.nonfinite):
            lines.append(f"non-finite updates (flagged, excluded): {np.flatnonzero(np.asarray(self.nonfinite)).tolist()}")
        return "\n".join(lines)

    def _in_any_problem(self, flags):
        """Clients flagged by a per-problem (..., K) field in any problem."""
        return np.flatnonzero(np.any(np.reshape(np.asarray(flags), (-1, self.client_benign.shape[-1])), axis=0))


def _span(values, fmt):
    """One value, or 'min – max' over problems, formatted."""
    values = np.ravel(values)
    if values.dtype.kind in "iub":
        values = values.astype(int)
        lo, hi = int(values.min()), int(values.max())
    else:
        lo, hi = float(values.min()), float(values.max())
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)} – {fmt.format(hi)}"


def assemble(problems, detection, verdict, refinement) -> ClairResult:
    """Put one group's stages together in the user's layout."""
    unflatten = problems.unflatten
    dec = jax.tree_util.tree_map(unflatten, detection.decomposition)
    if not problems.factored:
        dec = dec._replace(low_rank=orient(dec.low_rank, problems.side), sparse=orient(dec.sparse, problems.side))
    return ClairResult(
        benign=unflatten(detection.benign),
        scores=unflatten(detection.scores),
        client_benign=verdict.benign,
        client_scores=verdict.scores,
        client_z=verdict.z,
        residual_z=unflatten(detection.z),
        nonfinite=verdict.nonfinite,
        subspace=unflatten(refinement.subspace),
        rank=unflatten(refinement.rank),
        refined=problems.restore(refinement.refined),
        decomposition=dec,
        lam=dec.lam,
        noise_level=unflatten(detection.noise_level),
        converged=dec.converged,
        shrinkage=unflatten(refinement.shrinkage),
        local_share=unflatten(refinement.local_share),
        noisy=unflatten(refinement.noisy),
        copies=unflatten(detection.copies),
        crowded=unflatten(refinement.crowded),
        outlying=unflatten(refinement.outlying),
        client_status=verdict.status,
        spectrum=unflatten(detection.svd.s * detection.svd.peak[..., None]),
    )
