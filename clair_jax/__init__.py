"""clair_jax: CLAIR, robust collaborative low-rank aggregation of client updates, in JAX.

Pipeline: estimators → stack → decompose → detect → refine → report.

>>> import clair_jax as cj
>>> fed = cj.data.make_federation(0, num_clients=16, p=12, q=4, rank=2)
>>> result = cj.clair(fed.updates)
>>> result.client_benign.shape
(16,)
"""

from clair_jax import baselines, centre, data, detect, metrics, pool, prox, refine, solvers, stack, tuning
from clair_jax._compile import keep_compiled_programs
from clair_jax.decompose import Decomposition, decompose
from clair_jax.lora import LoRAFactors
from clair_jax.options import ClairOptions
from clair_jax.pipeline import Screening, clair, clair_groups, conclude, screen
from clair_jax.pool import ClientVerdict, pool_verdicts
from clair_jax.report import ClairResult

__version__ = "0.1.0"

__all__ = [
    "ClairOptions",
    "ClairResult",
    "ClientVerdict",
    "Decomposition",
    "LoRAFactors",
    "Screening",
    "baselines",
    "centre",
    "clair",
    "clair_groups",
    "conclude",
    "data",
    "decompose",
    "keep_compiled_programs",
    "detect",
    "metrics",
    "pool",
    "pool_verdicts",
    "prox",
    "refine",
    "screen",
    "solvers",
    "stack",
    "tuning",
]
