"""A synthetic federated LoRA task in NumPy: shared-subspace clients and a poisoned minority.

Every node fine-tunes the same LoRA modules (peft's key layout). Node k's true
update of module m is ΔW*_k = U_m (G_m + h·H_{k,m}): one column space U_m that all
honest nodes share, a common part G_m and a node-specific part. A node only sees
Y_k = ΔW*_k + σ·noise (its "data") and fits its adapter to it by gradient descent
on ‖s·B·A − Y_k‖², starting from the adapter it was sent. A poisoned node adds
the same off-subspace direction (a backdoor) to its target, at the honest
update's scale. The error a node cares about is ‖s·B·A − ΔW*_k‖_F / ‖ΔW*_k‖_F
of the adapter it is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: module name -> (out, in) of the frozen weight; peft keys are built from these.
MODULES = {
    "base_model.model.layers.0.self_attn.q_proj": (32, 24),
    "base_model.model.layers.0.self_attn.v_proj": (32, 24),
    "base_model.model.layers.0.mlp.down_proj": (24, 40),
}
LORA_R = 4
LORA_ALPHA = 8
SCALING = LORA_ALPHA / LORA_R
SHARED_RANK = 2


@dataclass(frozen=True)
class TaskConfig:
    """The federation: how many nodes, how many poisoned, noise and heterogeneity."""

    num_nodes: int = 10
    num_poisoned: int = 3
    noise: float = 0.1          # σ per entry of a node's target, relative to ΔW*'s entry scale
    heterogeneity: float = 0.5  # h: node-specific share of the coefficients
    attack_scale: float = 1.0   # backdoor norm / honest update norm
    local_steps: int = 60
    seed: int = 0

    def poisoned(self, partition_id: int) -> bool:
        """The last ``num_poisoned`` partitions are poisoned."""
        return partition_id >= self.num_nodes - self.num_poisoned

    @classmethod
    def from_run_config(cls, run_config) -> "TaskConfig":
        """The fields found in a Flower run config (``num-nodes``, ``num-poisoned``, ``noise``, ...)."""
        fields = {f: run_config[f.replace("_", "-")] for f in cls.__dataclass_fields__
                  if f.replace("_", "-") in run_config}
        return cls(**fields)


def lora_keys(module: str) -> tuple[str, str]:
    """peft's (lora_A, lora_B) keys of a module."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def initial_adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """peft's initialisation: A small random (r × in), B zero (out × r)."""
    rng = np.random.default_rng(seed + 10_000)
    out = {}
    for module, (p, q) in MODULES.items():
        a_key, b_key = lora_keys(module)
        out[a_key] = (rng.normal(size=(LORA_R, q)) / np.sqrt(q)).astype(np.float32)
        out[b_key] = np.zeros((p, LORA_R), np.float32)
    return out


def truth(cfg: TaskConfig, partition_id: int) -> dict[str, np.ndarray]:
    """ΔW*_k per module (the honest update; a poisoned node's true update too)."""
    shared = np.random.default_rng(cfg.seed)
    own = np.random.default_rng([cfg.seed, partition_id])
    out = {}
    for module, (p, q) in MODULES.items():
        u = np.linalg.qr(shared.normal(size=(p, SHARED_RANK)))[0]
        g = shared.normal(size=(SHARED_RANK, q))
        h = own.normal(size=(SHARED_RANK, q))
        out[module] = u @ (g + cfg.heterogeneity * h) / np.sqrt(q)
    return out


def target(cfg: TaskConfig, partition_id: int, server_round: int) -> dict[str, np.ndarray]:
    """What node ``partition_id`` fits in this round: its truth + noise (+ the backdoor)."""
    rng = np.random.default_rng([cfg.seed, partition_id, server_round, 1])
    attack = np.random.default_rng(cfg.seed + 1)
    out = {}
    for module, w in truth(cfg, partition_id).items():
        p, q = w.shape
        y = w + cfg.noise * rng.normal(size=w.shape) / np.sqrt(q)
        # One backdoor direction per module, the same for every poisoned node, outside span(U).
        v = attack.normal(size=(p, 1)) @ attack.normal(size=(1, q))
        if cfg.poisoned(partition_id):
            y = y + cfg.attack_scale * np.linalg.norm(w) * v / np.linalg.norm(v)
        out[module] = y
    return out


def local_fit(arrays: dict[str, np.ndarray], targets: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """Gradient descent on ‖s·B·A − Y‖² per module, from the received adapter."""
    out = dict(arrays)
    for module, y in targets.items():
        a_key, b_key = lora_keys(module)
        a, b = arrays[a_key].astype(np.float64), arrays[b_key].astype(np.float64)
        lr = 0.3 / SCALING**2
        for _ in range(steps):
            r = SCALING * b @ a - y
            grad_b = SCALING * r @ a.T
            grad_a = SCALING * b.T @ r
            b, a = b - lr * grad_b, a - lr * grad_a
        out[a_key], out[b_key] = a.astype(np.float32), b.astype(np.float32)
    return out


def adapter_error(arrays: dict[str, np.ndarray], cfg: TaskConfig, partition_id: int) -> float:
    """‖s·B·A − ΔW*‖_F / ‖ΔW*‖_F over all modules."""
    num = den = 0.0
    for module, w in truth(cfg, partition_id).items():
        a_key, b_key = lora_keys(module)
        delta = SCALING * arrays[b_key].astype(np.float64) @ arrays[a_key].astype(np.float64)
        num += float(np.sum((delta - w) ** 2))
        den += float(np.sum(w**2))
    return float(np.sqrt(num / den))
