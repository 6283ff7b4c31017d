"""Stage 1 of the pipeline: preliminary local estimators Θ̂_k, all clients at once.

* :mod:`clair_jax.estimators.regression`: multi-response linear regression
  (OLS / ridge), vmapped over clients, unequal n_k by padding + masks.
* :mod:`clair_jax.estimators.mlp`: a small MLP base model trained with optax;
  per-client LoRA or full-delta fine-tuning of its hidden layers, vmapped over
  clients; the per-layer deltas have the layer axis leading, ready for
  :func:`clair_jax.clair`.
* :mod:`clair_jax.estimators.jackknife`: a client's own estimate of the noise its
  coordinates carry along Û, for partial pooling (``coordinate_noise``).
"""

from clair_jax.estimators.regression import (
    POISON_KINDS,
    RegressionData,
    fit_ols,
    fit_ridge,
    pad_clients,
    prediction_mse,
    simulate_regression,
)
from clair_jax.estimators.jackknife import coordinate_noise
from clair_jax.estimators.mlp import (
    MLPFederation,
    FineTuneResult,
    init_mlp,
    mlp_apply,
    train_base,
    fine_tune,
    make_mlp_federation,
    client_loss,
)

__all__ = [
    "POISON_KINDS",
    "RegressionData",
    "fit_ols",
    "fit_ridge",
    "pad_clients",
    "prediction_mse",
    "simulate_regression",
    "MLPFederation",
    "FineTuneResult",
    "init_mlp",
    "mlp_apply",
    "train_base",
    "fine_tune",
    "make_mlp_federation",
    "client_loss",
    "coordinate_noise",
]
