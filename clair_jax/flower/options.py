"""ClairStrategy's own options, checked at the door (errors name the argument)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["CLAIR_OPTIONS", "check_options", "config_scaling", "module_scaling"]

#: ``cj.clair`` options a user may set through ``clair_options``.
CLAIR_OPTIONS = frozenset({"rank", "lam", "noise", "threshold", "tol", "max_iter", "min_gap", "refit",
                           "z_crit", "svt", "pooling", "centre_rank"})


def check_options(*, lora_scaling, flagged_nodes, max_staleness, exclude_after, min_judged, pad_clients,
                  lora_a_tag, lora_b_tag, clair_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Raise for an invalid option; return the checked ``clair_options``."""
    if flagged_nodes not in ("global", "exclude"):
        raise ValueError(f"flagged_nodes must be 'global' or 'exclude', got {flagged_nodes!r}")
    if isinstance(lora_scaling, (int, float)) and not (math.isfinite(lora_scaling) and lora_scaling > 0):
        raise ValueError(f"lora_scaling must be a finite number > 0, got {lora_scaling}")
    if lora_scaling is not None and not isinstance(lora_scaling, (int, float)) and not callable(lora_scaling):
        raise TypeError(f"lora_scaling must be a number, a function of the module name or None, "
                        f"got {type(lora_scaling).__name__}")
    for name, value, low in (("max_staleness", max_staleness, 0), ("min_judged", min_judged, 2),
                             ("exclude_after", exclude_after, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if pad_clients is not None and (isinstance(pad_clients, bool) or not isinstance(pad_clients, int)
                                    or pad_clients < 1):
        raise ValueError(f"pad_clients must be None or an int >= 1, got {pad_clients!r}")
    if not lora_a_tag or not lora_b_tag or lora_a_tag == lora_b_tag:
        raise ValueError(f"lora_a_tag and lora_b_tag must be two different non-empty strings, "
                         f"got {lora_a_tag!r} and {lora_b_tag!r}")
    options = dict(clair_options or {})
    unknown = set(options) - CLAIR_OPTIONS
    if unknown:
        raise ValueError(f"clair_options: unknown option(s) {sorted(unknown)}; known: {sorted(CLAIR_OPTIONS)}")
    if options.get("pooling", "none") not in ("none", "centre"):
        raise ValueError(f"clair_options: pooling must be 'none' or 'centre' (a node's model has fixed-rank LoRA "
                         f"layers), got {options['pooling']!r}")
    return options


def config_scaling(config: Mapping[str, Any]) -> float:
    """s = alpha / r (alpha / √r with rsLoRA) from a train config's ``lora-alpha`` / ``lora-r``, else 1."""
    alpha = config.get("lora-alpha", config.get("lora_alpha"))
    r = config.get("lora-r", config.get("lora_r"))
    if alpha is None or r is None:
        return 1.0
    rslora = bool(config.get("lora-use-rslora", config.get("use_rslora", False)))
    return float(alpha) / (math.sqrt(float(r)) if rslora else float(r))


def module_scaling(lora_scaling, config: Mapping[str, Any], module: str) -> float:
    """s of a module: ``lora_scaling`` (a number or a function of the module name), else from ``config``."""
    if callable(lora_scaling):
        value = float(lora_scaling(module))
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"lora_scaling({module!r}) must be a finite number > 0, got {value}")
        return value
    return float(lora_scaling) if lora_scaling is not None else config_scaling(config)
