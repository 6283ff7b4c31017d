"""A node's verdicts: one per judgement of its adapter, and its standing across rounds."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["NODE_STATUSES", "NodeVerdict", "NodeRecord", "NodeHistory"]

#: The statuses of a :class:`NodeVerdict`.
NODE_STATUSES = ("benign", "noisy", "contaminated", "rejected", "unjudged")


@dataclass(frozen=True)
class NodeVerdict:
    """One verdict on one node's adapter (its reply of a round, or its banked adapter judged anew).

    ``status`` is the verdict to act on: ``"benign"``, ``"noisy"`` (honest but
    noisier than the rest: it gets its refined adapter, stays out of Û and of the
    FedAvg, and is not flagged), ``"contaminated"``, ``"rejected"`` (an unusable
    reply, not judged) or ``"unjudged"`` (too few adapters to judge; averaged).

    Attributes:
        server_round: the round of the judgement.
        benign: True when the node is in the collaborative set (Û and the FedAvg use
            it; unjudged replies too); False for noisy, contaminated and rejected ones.
        judged: True when CLAIR judged the adapter; False when the reply was
            rejected before (``reason`` says why) or the pool was too small to judge.
        reason: ``"clair"`` for a CLAIR verdict on a reply, ``"clair: banked adapter of
            round r"`` for its banked adapter judged anew, else why the reply was
            rejected or not judged.
        score: the pooled contamination score (NaN when not judged).
        z: the pooled refit statistic (NaN when not judged).
        status: see above; by default read from ``benign`` and ``judged``
            (``"benign"``/``"contaminated"`` when judged, ``"unjudged"``/``"rejected"`` when not).
        vouched: True when the verdict clears the node in a pool whose judgement can be
            trusted, so its refined adapter may be sent (``docs/flower.md``); a node
            cleared but not vouched for gets the global arrays.
    """

    server_round: int
    benign: bool
    judged: bool
    reason: str
    score: float = math.nan
    z: float = math.nan
    status: str = ""
    vouched: bool = False

    def __post_init__(self):
        if not self.status:
            status = ("benign" if self.benign else "contaminated") if self.judged else \
                ("unjudged" if self.benign else "rejected")
            object.__setattr__(self, "status", status)
        if self.status not in NODE_STATUSES:
            raise ValueError(f"status must be one of {NODE_STATUSES}, got {self.status!r}")

    @property
    def flagged(self) -> bool:
        """Contaminated, or an unusable reply."""
        return self.status in ("contaminated", "rejected")


@dataclass
class NodeRecord:
    """A node's standing across rounds: its verdicts counted, flagged ones apart.

    Every round the node's latest adapter is judged (as a reply, or from the bank
    while it is at most ``max_staleness`` rounds old) counts once in ``judged``; a
    flagged verdict (contaminated, or a rejected reply) counts in ``flagged`` too.
    A node is *excluded* once it was flagged at least ``strikes`` times and in
    more than half of its judgements: flagged once at a borderline z among
    many benign verdicts, it stays in; flagged again and again, it is out.

    Attributes:
        judged: verdicts counted (judged by CLAIR, or rejected).
        flagged: of which flagged.
        latest: the latest verdict on the node's current adapter, or None.
    """

    judged: int = 0
    flagged: int = 0
    latest: NodeVerdict | None = None

    def add(self, verdict: NodeVerdict) -> None:
        """Count one verdict (unjudged ones are kept as ``latest`` only)."""
        self.latest = verdict
        if verdict.judged or verdict.status == "rejected":
            self.judged += 1
            self.flagged += verdict.flagged

    def excluded(self, strikes: int) -> bool:
        """Flagged at least ``strikes`` times, and in more than half of its verdicts."""
        return self.flagged >= strikes and 2 * self.flagged > self.judged


class NodeHistory:
    """Every node's verdicts and standing (``ClairStrategy`` holds these attributes).

    Attributes:
        history: ``{node: [NodeVerdict, ...]}``: each reply's verdict, and a banked
            adapter's whenever its status changes.
        records: ``{node: NodeRecord}``: verdicts counted across rounds, the latest one.
        exclude_after: strikes that exclude a node (see :class:`NodeRecord`).
    """

    history: dict[int, list[NodeVerdict]]
    records: dict[int, NodeRecord]
    exclude_after: int

    def latest_verdict(self, node_id: int) -> NodeVerdict | None:
        """The latest verdict on the node's adapter, or None if it never replied."""
        record = self.records.get(node_id)
        return record.latest if record else None

    def is_excluded(self, node_id: int) -> bool:
        """Flagged ``exclude_after`` times or more, in more than half of its verdicts."""
        record = self.records.get(node_id)
        return record is not None and record.excluded(self.exclude_after)

    def is_flagged(self, node_id: int) -> bool:
        """Excluded, or its latest verdict flagged it (an honest but noisy node is not flagged)."""
        verdict = self.latest_verdict(node_id)
        return self.is_excluded(node_id) or (verdict is not None and verdict.flagged)

    def is_vouched(self, node_id: int) -> bool:
        """Not flagged, and its latest verdict vouches for it: it may be sent its refined adapter."""
        verdict = self.latest_verdict(node_id)
        return verdict is not None and verdict.vouched and not self.is_flagged(node_id)

    def _record(self, node_id: int, verdict: NodeVerdict, history: bool) -> None:
        """Count the verdict; keep it in the history if asked or if the node's status changed."""
        record = self.records.setdefault(node_id, NodeRecord())
        before = record.latest
        record.add(verdict)
        if history or before is None or before.status != verdict.status:
            self.history.setdefault(node_id, []).append(verdict)
