"""What a user can set on :func:`clair_jax.clair`, checked once at the door.

:class:`ClairOptions` is a small frozen (hashable) object: the stages take it as
a whole instead of a dozen loose arguments, and jitted stages take it as one
static argument.
"""

from __future__ import annotations

import dataclasses

from clair_jax import _checks
from clair_jax.detect import MIN_GAP
from clair_jax.linalg import SVT_MODES
from clair_jax.stack import SIDES

__all__ = ["ClairOptions"]


@dataclasses.dataclass(frozen=True)
class ClairOptions:
    """Options of :func:`clair_jax.clair` (see its docstring for each one).

    ``noise=None`` means "estimate σ from the data" (the user's ``noise="auto"``).

    Example:
        >>> from clair_jax.options import ClairOptions
        >>> ClairOptions.checked(rank=2).rank
        2
    """

    rank: int | None = None
    lam: float | None = None
    noise: float | None = None
    side: str = "left"
    threshold: float | None = None
    tol: float | None = None
    max_iter: int = 3000
    min_gap: float = MIN_GAP
    refit: bool = True
    z_crit: float = 5.0
    svt: str = "auto"
    pooling: str = "none"

    @classmethod
    def checked(cls, *, rank=None, lam=None, noise="auto", side="left", threshold=None, tol=None, max_iter=3000,
                min_gap=MIN_GAP, refit=True, z_crit=5.0, svt="auto", pooling="none") -> "ClairOptions":
        """Validate every option (errors name the argument) and build the options."""
        if not (isinstance(noise, str) and noise == "auto"):
            if isinstance(noise, str) or noise is None:
                raise ValueError(f"noise must be 'auto' or a number >= 0 (the per-entry noise std), got {noise!r}")
            noise = _checks.check_real(noise, "noise", low=0.0, hint=" or 'auto'")
        else:
            noise = None
        if not isinstance(refit, (bool,)):
            raise TypeError(f"refit must be True or False, got {refit!r}")
        return cls(
            rank=_checks.check_int(rank, "rank", low=1, allow_none=True),
            lam=None if lam is None else _checks.check_real(lam, "lam", low=0.0, open_low=True),
            noise=noise,
            side=_checks.check_side(side),
            threshold=None if threshold is None else _checks.check_real(
                threshold, "threshold", low=0.0, high=1.0, hint=" (scores are shares of an update)"),
            tol=None if tol is None else _checks.check_real(tol, "tol", low=0.0, high=1.0, open_low=True,
                                                             open_high=True),
            max_iter=_checks.check_int(max_iter, "max_iter", low=1),
            min_gap=_checks.check_real(min_gap, "min_gap", low=0.0, high=1.0, open_low=True, open_high=True),
            refit=refit,
            z_crit=_checks.check_real(z_crit, "z_crit", low=0.0, open_low=True),
            svt=_checks.check_choice(svt, "svt", SVT_MODES),
            pooling=_checks.check_choice(pooling, "pooling", ("auto", "none", "full", "centre")),
        )
