"""The bank of adapters the server holds, and one CLAIR judgement of the pool.

Every round the *pool* is judged together: this round's replies and each other
node's latest adapter at most ``max_staleness`` rounds old. CLAIR sees the
pool padded with non-finite placeholder clients to a fixed size (the number of
nodes on the grid, rounded up to a multiple of ``pad_clients``), which it
excludes from everything, so one compiled program serves every round of a run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

import clair_jax as cj
from clair_jax.adapters.keys import pair_lora_keys
from clair_jax.flower.timing import counting_compile_seconds
from clair_jax.flower.verdicts import NodeVerdict

__all__ = ["Banked", "Module", "Judgement", "lora_modules", "pool_size", "judge", "judge_with_trust",
           "held_by_the_others", "project"]

#: A node holds a direction of Û when its update's singular value there is at least this share of its largest.
HELD = 0.25
#: Without two trusted adapters in the pool, a node is vouched for when every other cleared node holds at
#: least this share of its update within Û (:func:`held_by_the_others`).
AGREED = 0.9


@dataclass(frozen=True)
class Banked:
    """A node's latest valid adapter, as received, with its weight and its latest verdict.

    Attributes:
        server_round: the round it was received.
        arrays: every array of the reply.
        weight: its ``num-examples``.
        benign: whether its latest verdict kept it in the collaborative set.
    """

    server_round: int
    arrays: dict[str, np.ndarray]
    weight: float
    benign: bool


@dataclass(frozen=True)
class Module:
    """One LoRA module: ΔW = s · arrays[b_key] @ arrays[a_key]."""

    name: str
    a_key: str
    b_key: str


class Judgement(NamedTuple):
    """CLAIR's verdicts on a pool and what they give each node.

    Attributes:
        verdicts: ``{node: NodeVerdict}`` for every pool member.
        refined: ``{node: {key: array}}``, the refined LoRA arrays of every member
            that is not contaminated (B̃ from CLAIR, its own A), in its own dtype.
        subspaces: ``{module: Û}`` (p × r̂, r̂ ≥ 0) for adapters outside the pool.
        seconds: wall time of the CLAIR call.
        compile_seconds: the part of it XLA spent compiling programs (0 once the
            programs of the pool's shapes are compiled).
    """

    verdicts: dict[int, NodeVerdict]
    refined: dict[int, dict[str, np.ndarray]]
    subspaces: dict[str, np.ndarray]
    seconds: float
    compile_seconds: float = 0.0


def lora_modules(arrays: Mapping[str, np.ndarray], a_tag: str, b_tag: str) -> list[Module]:
    """Each A key with its B partner, both 2-D with B's columns = A's rows; other arrays are not modules."""
    modules = []
    for name, (a_key, b_key) in pair_lora_keys(arrays, a_tag, b_tag).items():
        a, b = arrays[a_key], arrays[b_key]
        if a.ndim == 2 and b.ndim == 2 and b.shape[1] == a.shape[0]:
            modules.append(Module(name, a_key, b_key))
    return modules


def pool_size(k: int, capacity: int, pad: int | None) -> int:
    """The padded pool: ``k`` with no padding, else a multiple of ``pad`` ≥ max(k, capacity)."""
    if not pad:
        return k
    return pad * math.ceil(max(k, capacity) / pad)


def judge(server_round: int, pool: Mapping[int, Mapping[str, np.ndarray]], modules: list[Module],
          scaling: Callable[[str], float], options: Mapping[str, Any], size: int,
          reasons: Mapping[int, str]) -> Judgement:
    """CLAIR over the pool's adapters (padded to ``size`` clients), one verdict per node.

    ``reasons`` gives each member's verdict reason (a reply, or a banked adapter).
    """
    nodes = list(pool)
    adapters = [pool[n] for n in nodes]
    dtype = np.float64 if _x64() else np.float32
    scales = {m.name: float(scaling(m.name)) for m in modules}
    groups: dict[tuple[int, int, int], list[Module]] = {}
    for m in modules:
        (p, r), q = adapters[0][m.b_key].shape, adapters[0][m.a_key].shape[1]
        groups.setdefault((p, r, q), []).append(m)
    problems = []
    for (p, r, q), members in groups.items():
        b = np.full((len(members), size, p, r), np.nan, dtype)
        a = np.full((len(members), size, r, q), np.nan, dtype)
        for i, m in enumerate(members):
            for j, arrays in enumerate(adapters):
                b[i, j] = scales[m.name] * arrays[m.b_key]
                a[i, j] = arrays[m.a_key]
        problems.append(cj.LoRAFactors(b, a))
    start = time.perf_counter()
    results = cj.clair_groups(problems, **options)
    first = results[0]  # every result carries the same pooled verdict
    status = np.asarray(first.client_status)
    seconds = time.perf_counter() - start
    benign, scores, zs = (np.asarray(x) for x in (first.client_benign, first.client_scores, first.client_z))
    verdicts = {n: NodeVerdict(server_round, bool(benign[j]), True, reasons[n], float(scores[j]), float(zs[j]),
                               cj.pool.STATUSES[int(status[j])]) for j, n in enumerate(nodes)}
    refined, subspaces = {n: {} for j, n in enumerate(nodes) if status[j] != cj.pool.CONTAMINATED}, {}
    for members, result in zip(groups.values(), results):
        refined_b, basis, rank = (np.asarray(x) for x in (result.refined.B, result.subspace, result.rank))
        pooled_a = np.asarray(result.refined.A) if result.centre_weight is not None else None
        for i, m in enumerate(members):
            subspaces[m.name] = basis[i][:, : int(rank[i])]
            for j, node in enumerate(nodes):
                if node in refined:
                    own = pool[node]
                    b = refined_b[i, j]
                    if pooled_a is not None:
                        # Centre pooling gives rank r + r_c; the node's model holds rank r: send the
                        # pooled ΔW in the row space of its own A, B̃ = B_p A_p A⁺ (exact there).
                        b = b @ (pooled_a[i, j] @ np.linalg.pinv(own[m.a_key].astype(b.dtype)))
                    refined[node][m.b_key] = (b / scales[m.name]).astype(own[m.b_key].dtype)
                    refined[node][m.a_key] = own[m.a_key]
    return Judgement(verdicts, refined, subspaces, seconds)


@counting_compile_seconds
def judge_with_trust(server_round, pool, modules, scaling, options, size, reasons, trusted) -> Judgement:
    """:func:`judge`, where a pool may not clear an untrusted node that the trusted nodes alone would flag,
    and vouches for a node's benign verdict only where it can be trusted.

    A small pool can hold more contaminated adapters than honest ones (three
    attackers replying in one round of five adapters), and then their shared
    direction looks shared. ``trusted`` nodes are those whose latest verdict, in
    an earlier round, was benign and vouched for. Each node the whole pool clears
    that is not trusted (a newcomer, or one flagged at its latest verdict) is judged
    again in a pool of the trusted adapters and itself alone, when there are at
    least two trusted adapters; flagged there, it is flagged, and the pool is judged
    again without it, so Û and the refined adapters do not hold its direction.

    A verdict that does not flag the node is *vouched* for (``NodeVerdict.vouched``:
    its refined adapter may be sent) when the node is trusted, when it was cleared
    against at least two trusted adapters, or, in a pool with fewer, when every
    other cleared node holds at least ``AGREED`` of its update within Û
    (:func:`held_by_the_others`): two attackers and one honest node in a pool of
    three all look benign, but the honest node lacks the attackers' shared direction.
    """
    start = time.perf_counter()
    first = judge(server_round, pool, modules, scaling, options, size, reasons)
    trusted = [n for n in pool if n in trusted]
    cleared = [n for n, v in first.verdicts.items() if not v.flagged and n not in trusted]
    overruled = {}
    for node in cleared if len(trusted) >= 2 else ():
        alone = judge(server_round, {n: pool[n] for n in (*trusted, node)}, modules, scaling, options, size,
                      reasons).verdicts[node]
        if alone.flagged:
            overruled[node] = replace(alone, reason=f"{alone.reason}: flagged against the trusted nodes alone")
    out = first if not overruled else judge(server_round, {n: a for n, a in pool.items() if n not in overruled},
                                            modules, scaling, options, size, reasons)
    served = [n for n, v in out.verdicts.items() if not v.flagged]
    shares = {} if len(trusted) >= 2 else held_by_the_others(  # cleared against the trusted: vouched for
        pool, modules, scaling, out.subspaces, [n for n in served if n not in trusted],
        [n for n in served if out.verdicts[n].status == "benign"])
    verdicts = dict(out.verdicts)
    for node in served:
        share = shares.get(node, 1.0)
        verdicts[node] = replace(verdicts[node], vouched=True) if share >= AGREED else replace(
            verdicts[node], reason=f"{verdicts[node].reason}; not vouched for: another cleared node holds "
                                   f"{share:.0%} of its update within Û")
    return Judgement({**verdicts, **overruled}, out.refined, out.subspaces, time.perf_counter() - start)


def held_by_the_others(pool: Mapping[int, Mapping[str, np.ndarray]], modules: list[Module],
                       scaling: Callable[[str], float], subspaces: Mapping[str, np.ndarray],
                       members: list[int], others: list[int]) -> dict[int, float]:
    """For each of ``members``, the least share of its update within Û that one of ``others`` holds.

    Node k's update within Û is C_k = Ûᵀ s B_k A_k (r̂ × q) per module; node j *holds*
    the span of C_j's left singular vectors whose singular value is at least ``HELD``
    times its largest. The share of k held by j is Σ_m ‖Π_j C_k‖² / Σ_m ‖C_k‖²; the
    result is its minimum over the others j ≠ k (1 when there is none, or k has
    nothing within Û). Two attackers sharing a backdoor hold what an honest node
    holds (U), the honest node does not hold their backdoor: their share is about ½.
    """
    within = {n: [] for n in {*members, *others}}
    for m in modules:
        basis = subspaces.get(m.name)
        if basis is None or basis.shape[1] == 0:
            continue
        for n in within:
            b, a = (pool[n][k].astype(basis.dtype) for k in (m.b_key, m.a_key))
            within[n].append(float(scaling(m.name)) * (basis.T @ b) @ a)
    held = {}
    for n, blocks in within.items():
        projectors = []
        for c in blocks:
            u, s, _ = np.linalg.svd(c, full_matrices=False)
            keep = u[:, s >= HELD * s[0]] if s.size and s[0] > 0 else u[:, :0]
            projectors.append(keep @ keep.T)
        held[n] = projectors
    shares = {}
    for k in members:
        total = sum(float(np.sum(c**2)) for c in within[k])
        shares[k] = min((sum(float(np.sum((pj @ c) ** 2)) for pj, c in zip(held[j], within[k])) / total
                         for j in others if j != k), default=1.0) if total > 0 else 1.0
    return shares


def project(arrays: Mapping[str, np.ndarray], modules: list[Module],
            subspaces: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An adapter outside the pool refined with the pool's Û: B̃ = ÛÛᵀB, its own A.

    A module where the pool found no shared direction (r̂ = 0) keeps its own B.
    """
    out = {}
    for m in modules:
        basis, b = subspaces.get(m.name), arrays[m.b_key]
        if basis is not None and basis.shape[1] > 0 and basis.shape[0] == b.shape[0]:
            b = (basis @ (basis.T @ b.astype(basis.dtype))).astype(b.dtype)
        out[m.b_key], out[m.a_key] = b, arrays[m.a_key]
    return out


def _x64() -> bool:
    import jax

    return bool(jax.config.jax_enable_x64)
