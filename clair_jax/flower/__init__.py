"""CLAIR as a Flower strategy: a drop-in for ``FedAvg`` in federated LoRA fine-tuning.

:class:`ClairStrategy` subclasses ``flwr.serverapp.strategy.FedAvg`` (Message API,
flwr ≥ 1.22) and keeps its constructor arguments and defaults. Each round it

1. checks every reply (:mod:`~clair_jax.flower.replies`) and flags a node whose
   reply is unusable, with the reason kept in :attr:`ClairStrategy.history`;
2. judges the *pool* with CLAIR (:mod:`~clair_jax.flower.bank`): this round's
   replies and every other node's latest adapter of at most ``max_staleness``
   rounds, padded to a fixed size so one compiled program serves every round;
   each module's ``lora_A`` / ``lora_B`` pair (:mod:`clair_jax.adapters.keys`)
   is one factored problem, one client verdict over all of them;
3. counts each verdict in the node's record (:mod:`~clair_jax.flower.verdicts`):
   a node flagged repeatedly is excluded, one flagged once is not;
4. returns the weighted FedAvg of the pool's benign adapters as the global
   arrays, and from the next ``configure_train`` / ``configure_evaluate`` on
   sends every node whose adapter the server holds and whose benign verdict it
   vouches for its own refined adapter (B̃ = ÛÛᵀB, same A) with this round's Û;
   a node never seen, not vouched for, or flagged, gets the global arrays.

This package imports ``flwr``; ``import clair_jax`` does not import it. Install
with ``pip install "clair-jax[flower]"``. The guide is ``docs/flower.md``.
"""

from clair_jax.flower.bank import Banked
from clair_jax.flower.options import CLAIR_OPTIONS
from clair_jax.flower.strategy import ClairStrategy
from clair_jax.flower.verdicts import NODE_STATUSES, NodeRecord, NodeVerdict

__all__ = ["ClairStrategy", "NodeVerdict", "NodeRecord", "Banked", "NODE_STATUSES", "CLAIR_OPTIONS"]
