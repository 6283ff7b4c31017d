"""CLAIR as a Flower strategy: a drop-in for ``FedAvg`` in federated LoRA fine-tuning.

:class:`ClairStrategy` subclasses ``flwr.serverapp.strategy.FedAvg`` (Message API,
flwr ≥ 1.22) and keeps its constructor arguments and defaults. Each round it

1. checks every reply (error, record layout, keys, shapes, finite values, the
   ``num-examples`` weight) and flags a node whose reply is unusable, with the
   reason logged and kept in :attr:`ClairStrategy.history`;
2. pairs each module's ``lora_A`` / ``lora_B`` arrays by key, folds the LoRA
   scaling s into B (ΔW = s·B·A), groups the modules by shape and runs CLAIR
   over all groups with one client verdict, judging the round's replies together
   with the other nodes' latest adapters (the *bank*, limited in staleness), so a
   round of a few replies is judged against the whole federation;
3. returns the benign repliers' weighted FedAvg (``weighted_by_key``) as the
   global arrays, with metrics that include ``clair-flagged`` (nodes flagged this
   round: contaminated or an unusable reply) and ``clair-noisy`` (honest but
   noisy nodes: left out of Û and of the FedAvg, not flagged);
4. in the next ``configure_train`` / ``configure_evaluate``, sends each benign or
   noisy node its own refined adapter (B̃ = ÛÛᵀB, same A), a node with none the
   global arrays, and a flagged node the global arrays or nothing (``flagged_nodes``).

This module imports ``flwr``; ``import clair_jax`` does not import it. Install
with ``pip install "clair-jax[flower]"``. The guide is ``docs/flower.md``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

import clair_jax as cj

__all__ = ["ClairStrategy", "NodeVerdict"]

#: ``cj.clair`` options a user may set through ``clair_options``.
CLAIR_OPTIONS = frozenset({"rank", "lam", "noise", "threshold", "tol", "max_iter", "min_gap", "refit",
                           "z_crit", "svt"})


@dataclass(frozen=True)
class NodeVerdict:
    """One round's verdict on one node's reply.

    ``status`` is the verdict to act on: ``"benign"``, ``"noisy"`` (honest but
    noisier than the rest: it gets its refined adapter, stays out of Û and of the
    FedAvg, and is not flagged), ``"contaminated"``, ``"rejected"`` (an unusable
    reply, not judged) or ``"unjudged"`` (too few adapters to judge; averaged).

    Attributes:
        server_round: the round the reply belongs to.
        benign: True when the node is in the collaborative set (Û and the FedAvg use
            it; unjudged replies too); False for noisy, contaminated and rejected ones.
        judged: True when CLAIR judged the adapter; False when the reply was
            rejected before (``reason`` says why) or the pool was too small to judge.
        reason: ``"clair"`` for a CLAIR verdict, else why the reply was rejected or
            not judged.
        score: the pooled contamination score (NaN when not judged).
        z: the pooled refit statistic (NaN when not judged).
        status: see above; by default read from ``benign`` and ``judged``
            (``"benign"``/``"contaminated"`` when judged, ``"unjudged"``/``"rejected"`` when not).
    """

    server_round: int
    benign: bool
    judged: bool
    reason: str
    score: float = math.nan
    z: float = math.nan
    status: str = ""

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


#: The statuses of a :class:`NodeVerdict`.
NODE_STATUSES = ("benign", "noisy", "contaminated", "rejected", "unjudged")


@dataclass(frozen=True)
class _Banked:
    """A node's latest valid adapter, as received, with its weight and verdict."""

    server_round: int
    arrays: dict[str, np.ndarray]
    weight: float
    benign: bool


@dataclass(frozen=True)
class _Module:
    """One LoRA module: ΔW = s · arrays[b_key] @ arrays[a_key]."""

    name: str
    a_key: str
    b_key: str


class _Rejected(Exception):
    """A reply that cannot be used; the message is the reason."""


class ClairStrategy(FedAvg):
    """Federated LoRA aggregation with CLAIR: flag contaminated adapters, refine the rest.

    The first ten arguments are ``FedAvg``'s, with its defaults (see
    ``flwr.serverapp.strategy.FedAvg``). The rest are CLAIR's and keyword-only.

    Args:
        lora_scaling: s in ΔW = s·B·A: a float, or a function of the module name
            (e.g. for peft's ``alpha_pattern``). ``None`` (default) reads
            ``lora-alpha`` and ``lora-r`` (and ``lora-use-rslora``: s = alpha/√r)
            from the train config when it holds them, else s = 1. A scaling common
            to all modules changes no verdict; it matters when modules differ.
        personalise: send each benign or noisy node its own refined adapter (default True);
            False sends everyone the global arrays, as FedAvg.
        flagged_nodes: ``"global"`` (default) sends a node whose latest verdict is
            flagged the global arrays; ``"exclude"`` leaves it out of the round.
        max_staleness: a banked adapter older than this many rounds no longer
            joins the judging pool, and a personal adapter older than this is
            replaced by the global arrays (default 5).
        min_judged: fewest adapters (replies plus banked) CLAIR judges; with fewer,
            the valid replies are aggregated unjudged and a warning is logged
            (default 4).
        pad_clients: the judging pool is padded with non-finite placeholder
            clients (which CLAIR excludes from everything) to a multiple of this,
            so that a changing pool size does not recompile CLAIR every round.
            ``None`` or 1 turns padding off (default 8).
        lora_a_tag, lora_b_tag: the key parts that mark A and B (peft's
            ``"lora_A"`` / ``"lora_B"``); ``...lora_A...`` and the key with
            ``lora_B`` in its place form one module. Other arrays (biases, heads)
            are averaged over the benign nodes like FedAvg.
        clair_options: keyword arguments for CLAIR (``rank``, ``lam``, ``noise``,
            ``z_crit``, ``side``-free: the shared space is the span of the B's).

    Attributes:
        history: ``dict[node_id, list[NodeVerdict]]``, every verdict per node.
        bank: ``dict[node_id, ...]``, each node's latest valid adapter.

    Example (in a ServerApp; see ``docs/flower.md``)::

        strategy = ClairStrategy(fraction_train=0.2, lora_scaling=2.0)
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)
        strategy.history[node_id][-1].benign
    """

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        *,
        lora_scaling: float | Callable[[str], float] | None = None,
        personalise: bool = True,
        flagged_nodes: str = "global",
        max_staleness: int = 5,
        min_judged: int = 4,
        pad_clients: int | None = 8,
        lora_a_tag: str = "lora_A",
        lora_b_tag: str = "lora_B",
        clair_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if flagged_nodes not in ("global", "exclude"):
            raise ValueError(f"flagged_nodes must be 'global' or 'exclude', got {flagged_nodes!r}")
        if isinstance(lora_scaling, (int, float)) and not (math.isfinite(lora_scaling) and lora_scaling > 0):
            raise ValueError(f"lora_scaling must be a finite number > 0, got {lora_scaling}")
        if lora_scaling is not None and not isinstance(lora_scaling, (int, float)) and not callable(lora_scaling):
            raise TypeError(f"lora_scaling must be a number, a function of the module name or None, "
                            f"got {type(lora_scaling).__name__}")
        for name, value, low in (("max_staleness", max_staleness, 0), ("min_judged", min_judged, 2)):
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
        self.lora_scaling = lora_scaling
        self.personalise = personalise
        self.flagged_nodes = flagged_nodes
        self.max_staleness = max_staleness
        self.min_judged = min_judged
        self.pad_clients = pad_clients
        self.lora_a_tag = lora_a_tag
        self.lora_b_tag = lora_b_tag
        self.clair_options = options
        self.history: dict[int, list[NodeVerdict]] = {}
        self.bank: dict[int, _Banked] = {}
        self._personal: dict[int, tuple[int, dict[str, np.ndarray]]] = {}
        self._template: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None
        self._train_config: dict[str, Any] = {}
        self._round = 0

    # ------------------------------------------------------------------ reading

    def summary(self) -> None:
        """Log the FedAvg summary and CLAIR's options."""
        super().summary()
        log(INFO, "\t└──> CLAIR:")
        log(INFO, "\t\t├── personalise: %s | flagged nodes: %s", self.personalise, self.flagged_nodes)
        log(INFO, "\t\t├── bank staleness limit: %d rounds | min judged: %d", self.max_staleness, self.min_judged)
        log(INFO, "\t\t└── options: %s", self.clair_options or "(defaults)")

    def latest_verdict(self, node_id: int) -> NodeVerdict | None:
        """The node's latest verdict, or None if it never replied."""
        verdicts = self.history.get(node_id)
        return verdicts[-1] if verdicts else None

    def is_flagged(self, node_id: int) -> bool:
        """Whether the node's latest verdict flagged it (contaminated or an unusable reply;
        an honest but noisy node is not flagged)."""
        verdict = self.latest_verdict(node_id)
        return verdict is not None and verdict.flagged

    def personal_arrays(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """What the node is sent next: its refined adapter inside ``arrays``, or ``arrays``.

        Args:
            node_id: the node.
            arrays: the global arrays (the node's refined LoRA arrays replace theirs).
        """
        own = self._personal.get(node_id)
        if not self.personalise or own is None or self.is_flagged(node_id):
            return arrays
        server_round, refined = own
        if self._round - server_round > self.max_staleness:
            return arrays
        if any(k not in arrays or tuple(arrays[k].shape) != v.shape for k, v in refined.items()):
            log(WARNING, "clair: node %d's refined adapter no longer matches the global arrays; "
                "it is sent the global arrays", node_id)
            return arrays
        record = ArrayRecord({k: (Array(np.ascontiguousarray(refined[k])) if k in refined else v)
                              for k, v in arrays.items()})
        return record

    # ---------------------------------------------------------------- configure

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes as FedAvg does and send each its own payload (see the class)."""
        if self.fraction_train == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        sample_size = max(num_nodes, self.min_train_nodes)
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes, sample_size)
        log(INFO, "configure_train: Sampled %s nodes (out of %s)", len(node_ids), len(all_nodes))
        config["server-round"] = self._round = server_round
        self._template = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}
        self._train_config = dict(config)
        return self._messages(node_ids, arrays, config, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample nodes as FedAvg does and send each its own payload (see the class)."""
        if self.fraction_evaluate == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_evaluate)
        sample_size = max(num_nodes, self.min_evaluate_nodes)
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes, sample_size)
        log(INFO, "configure_evaluate: Sampled %s nodes (out of %s)", len(node_ids), len(all_nodes))
        config["server-round"] = self._round = server_round
        return self._messages(node_ids, arrays, config, MessageType.EVALUATE)

    def _messages(self, node_ids, arrays, config, message_type):
        messages, personal, left_out = [], 0, []
        for node_id in node_ids:
            if self.flagged_nodes == "exclude" and self.is_flagged(node_id):
                left_out.append(node_id)
                continue
            payload = self.personal_arrays(node_id, arrays)
            personal += payload is not arrays
            record = RecordDict({self.arrayrecord_key: payload, self.configrecord_key: config})
            messages.append(Message(content=record, dst_node_id=node_id, message_type=message_type))
        log(INFO, "\t> clair: %d of %d nodes get their own refined adapter%s", personal, len(messages),
            f"; flagged nodes left out: {left_out}" if left_out else "")
        return messages

    # ---------------------------------------------------------------- aggregate

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, judge them with CLAIR, refine, and return the benign FedAvg.

        Returns:
            (global arrays, metrics): the benign repliers' weighted FedAvg (None when
            no reply is benign) and the aggregated train metrics plus
            ``clair-flagged`` (nodes flagged this round), ``clair-noisy`` (honest but
            noisy nodes: refined, not flagged), ``clair-invalid``
            (replies rejected before judging), ``clair-replies`` and
            ``clair-judged`` (adapters CLAIR judged, banked ones included).
        """
        replies = list(replies)
        self._round = server_round
        valid, rejected = self._check_replies(server_round, replies)
        for node_id, reason in rejected.items():
            self._record(node_id, NodeVerdict(server_round, benign=False, judged=False, reason=reason))
            self.bank.pop(node_id, None)
            self._personal.pop(node_id, None)
        # Stale or flagged adapters leave the judging pool; a banked node may also have left the grid.
        self.bank = {n: b for n, b in self.bank.items() if server_round - b.server_round <= self.max_staleness}
        reference = {n: b for n, b in self.bank.items() if n not in valid and n not in rejected and b.benign
                     and self._matches_layout(b.arrays, valid)}
        verdicts, refined, judged = self._judge(server_round, valid, reference)
        for node_id, banked in reference.items():
            # A banked adapter judged anew: one now flagged stops serving as a reference.
            verdict = verdicts.get(node_id)
            if verdict is not None and not verdict.benign:
                self.bank[node_id] = _Banked(banked.server_round, banked.arrays, banked.weight, False)
                if verdict.flagged:
                    self._personal.pop(node_id, None)
                self._record(node_id, NodeVerdict(
                    server_round, False, True, f"its banked adapter of round {banked.server_round} was "
                    f"{'flagged' if verdict.flagged else 'found noisy'} against this round's pool",
                    verdict.score, verdict.z, verdict.status))
        for node_id, (arrays, weight, _) in valid.items():
            verdict = verdicts[node_id]
            self._record(node_id, verdict)
            self.bank[node_id] = _Banked(server_round, arrays, weight, verdict.benign)
            if not verdict.flagged and node_id in refined:
                self._personal[node_id] = (server_round, refined[node_id])
            else:
                self._personal.pop(node_id, None)
        benign = [n for n in valid if verdicts[n].benign]
        flagged = sorted(rejected) + [n for n in valid if verdicts[n].flagged]
        noisy = [n for n in valid if verdicts[n].status == "noisy"]
        log(INFO, "aggregate_train: clair flagged %d of %d replies%s", len(flagged), len(replies),
            f": {flagged}" if flagged else "")
        if noisy:
            log(INFO, "\t> honest but noisy (refined, not used for Û or the FedAvg): %s", noisy)
        for node_id in flagged:
            log(INFO, "\t> node %d flagged: %s", node_id, self.history[node_id][-1].reason)

        arrays = self._fedavg([valid[n][0] for n in benign], [valid[n][1] for n in benign]) if benign else None
        metrics = MetricRecord()
        if benign:
            try:
                metrics = self.train_metrics_aggr_fn([valid[n][2] for n in benign], self.weighted_by_key)
            except Exception as err:  # noqa: BLE001  (a user's metrics must not sink the round)
                log(WARNING, "aggregate_train: train metrics could not be aggregated (%s); CLAIR's only", err)
                metrics = MetricRecord()
        metrics["clair-flagged"] = len(flagged)
        metrics["clair-noisy"] = len(noisy)
        metrics["clair-invalid"] = len(rejected)
        metrics["clair-replies"] = len(replies)
        metrics["clair-judged"] = judged
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate the evaluate metrics of the replies that carry a usable weight.

        Error replies and replies without a valid ``weighted_by_key`` are left out
        and logged, instead of failing the round as FedAvg's validation does.
        """
        contents = []
        for msg in replies:
            node_id = msg.metadata.src_node_id
            try:
                if msg.has_error():
                    raise _Rejected(f"error reply: {msg.error.reason}")
                self._weight(msg.content)
                contents.append(msg.content)
            except _Rejected as why:
                log(INFO, "aggregate_evaluate: reply of node %d left out: %s", node_id, why)
        if not contents:
            return None
        try:
            return self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as err:  # noqa: BLE001
            log(WARNING, "aggregate_evaluate: metrics could not be aggregated (%s)", err)
            return None

    # ------------------------------------------------------------------ helpers

    def _record(self, node_id: int, verdict: NodeVerdict) -> None:
        self.history.setdefault(node_id, []).append(verdict)

    def _weight(self, content: RecordDict) -> float:
        metric_records = list(content.metric_records.values())
        if len(metric_records) != 1:
            raise _Rejected(f"expected one MetricRecord, got {len(metric_records)}")
        value = metric_records[0].get(self.weighted_by_key)
        if value is None:
            raise _Rejected(f"MetricRecord has no {self.weighted_by_key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Rejected(f"{self.weighted_by_key!r} must be one number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise _Rejected(f"{self.weighted_by_key!r} must be finite and > 0, got {value!r}")
        return float(value)

    def _arrays(self, content: RecordDict) -> dict[str, np.ndarray]:
        records = content.array_records
        if self.arrayrecord_key in records:
            record = records[self.arrayrecord_key]
        elif len(records) == 1:
            record = next(iter(records.values()))
        else:
            raise _Rejected(f"expected one ArrayRecord (or one named {self.arrayrecord_key!r}), "
                            f"got {len(records)}: {sorted(records)}")
        out = {}
        for key, value in record.items():
            try:
                arr = value.numpy()
            except Exception as err:  # noqa: BLE001  (a foreign serialisation)
                raise _Rejected(f"array {key!r} could not be read ({err})") from None
            if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                raise _Rejected(f"array {key!r} has dtype {arr.dtype}, not a real number type")
            if not np.all(np.isfinite(arr)):
                raise _Rejected(f"array {key!r} holds NaN or Inf")
            out[key] = arr
        if not out:
            raise _Rejected("the ArrayRecord is empty")
        return out

    def _check_replies(self, server_round, replies):
        """Split the replies into valid ``{node: (arrays, weight, content)}`` and ``{node: reason}``."""
        parsed, rejected = {}, {}
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if node_id in parsed or node_id in rejected:
                log(WARNING, "aggregate_train: a second reply from node %d is ignored", node_id)
                continue
            try:
                if msg.has_error():
                    raise _Rejected(f"error reply: {msg.error.reason}")
                if not msg.has_content():
                    raise _Rejected("reply has no content")
                weight = self._weight(msg.content)
                parsed[node_id] = (self._arrays(msg.content), weight, msg.content)
            except _Rejected as why:
                rejected[node_id] = str(why)
        # The layout to match: what was sent, else the majority's.
        if self._template is not None:
            layout = {k: shape for k, (shape, _) in self._template.items()}
            source = "what was sent"
        else:
            layout = self._majority_layout([a for a, _, _ in parsed.values()])
            source = "the majority's"
        for node_id, (arrays, _, _) in list(parsed.items()):
            missing = sorted(set(layout) - set(arrays))
            extra = sorted(set(arrays) - set(layout))
            wrong = [f"{k} {arrays[k].shape} (expected {layout[k]})" for k in sorted(set(layout) & set(arrays))
                     if tuple(arrays[k].shape) != tuple(layout[k])]
            problems = ([f"missing keys {_short(missing)}"] if missing else []) + \
                ([f"extra keys {_short(extra)}"] if extra else []) + \
                ([f"shapes unlike {source}: {_short(wrong)}"] if wrong else [])
            if problems:
                rejected[node_id] = "; ".join(problems)
                del parsed[node_id]
        return parsed, rejected

    @staticmethod
    def _majority_layout(all_arrays):
        if not all_arrays:
            return {}
        layouts = Counter(tuple(sorted((k, tuple(v.shape)) for k, v in a.items())) for a in all_arrays)
        return dict(layouts.most_common(1)[0][0])

    @staticmethod
    def _matches_layout(arrays, valid):
        if not valid:
            return False
        first = next(iter(valid.values()))[0]
        return set(arrays) == set(first) and all(arrays[k].shape == first[k].shape for k in first)

    def _modules(self, arrays: Mapping[str, np.ndarray]) -> list[_Module]:
        """The LoRA modules: each ``…lora_A…`` key with its ``…lora_B…`` partner, 2-D and r-compatible."""
        modules = []
        for a_key in sorted(arrays):
            if self.lora_a_tag not in a_key:
                continue
            head, _, tail = a_key.rpartition(self.lora_a_tag)
            b_key = head + self.lora_b_tag + tail
            a, b = arrays[a_key], arrays.get(b_key)
            if b is None or a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
                continue  # not a linear LoRA pair: averaged like any other array
            name = re.sub(r"\.$", "", head) or a_key
            modules.append(_Module(name, a_key, b_key))
        return modules

    def _scaling(self, module: str) -> float:
        if callable(self.lora_scaling):
            value = float(self.lora_scaling(module))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"lora_scaling({module!r}) must be a finite number > 0, got {value}")
            return value
        if self.lora_scaling is not None:
            return float(self.lora_scaling)
        config = self._train_config
        alpha = config.get("lora-alpha", config.get("lora_alpha"))
        r = config.get("lora-r", config.get("lora_r"))
        if alpha is None or r is None:
            return 1.0
        rslora = bool(config.get("lora-use-rslora", config.get("use_rslora", False)))
        return float(alpha) / (math.sqrt(float(r)) if rslora else float(r))

    def _judge(self, server_round, valid, reference):
        """CLAIR over the replies and the banked adapters: verdicts and refined LoRA arrays."""
        if not valid:
            return {}, {}, 0
        nodes = list(valid) + list(reference)
        adapters = [valid[n][0] for n in valid] + [reference[n].arrays for n in reference]
        modules = self._modules(adapters[0])
        if not modules or len(nodes) < self.min_judged:
            why = "no lora_A/lora_B pairs in the arrays" if not modules else \
                f"only {len(nodes)} adapters to judge (min_judged={self.min_judged})"
            log(WARNING, "aggregate_train: round %d not judged by CLAIR: %s; the valid replies are averaged",
                server_round, why)
            return {n: NodeVerdict(server_round, True, False, f"unjudged: {why}") for n in valid}, {}, 0

        k = len(nodes)
        pad = 0 if not self.pad_clients else -k % self.pad_clients
        dtype = np.float64 if _x64() else np.float32
        scales = {m.name: self._scaling(m.name) for m in modules}
        groups: dict[tuple[int, int, int], list[_Module]] = {}
        for m in modules:
            p, r = adapters[0][m.b_key].shape
            groups.setdefault((p, r, adapters[0][m.a_key].shape[1]), []).append(m)
        problems = []
        for (p, r, q), members in groups.items():
            b = np.full((len(members), k + pad, p, r), np.nan, dtype)
            a = np.full((len(members), k + pad, r, q), np.nan, dtype)
            for i, m in enumerate(members):
                for j, arrays in enumerate(adapters):
                    b[i, j] = scales[m.name] * arrays[m.b_key]
                    a[i, j] = arrays[m.a_key]
            problems.append(cj.LoRAFactors(b, a))
        results, verdict = _clair_groups(problems, self.clair_options)
        benign = np.asarray(verdict.benign)[:k]
        scores = np.asarray(verdict.scores)[:k]
        zs = np.asarray(verdict.z)[:k]
        status = np.asarray(verdict.status)[:k]
        verdicts = {n: NodeVerdict(server_round, bool(benign[j]), True, "clair", float(scores[j]), float(zs[j]),
                                   cj.pool.STATUSES[int(status[j])])
                    for j, n in enumerate(nodes)}
        refined = {}
        for j, node_id in enumerate(valid):
            if status[j] == cj.pool.CONTAMINATED:
                continue
            own = {}
            for (shape, members), result in zip(groups.items(), results):
                refined_b = np.asarray(result.refined.B)
                for i, m in enumerate(members):
                    src = valid[node_id][0][m.b_key]
                    own[m.b_key] = (refined_b[i, j] / scales[m.name]).astype(src.dtype)
                    own[m.a_key] = valid[node_id][0][m.a_key]
            refined[node_id] = own
        return verdicts, refined, k

    @staticmethod
    def _fedavg(all_arrays, weights):
        total = float(sum(weights))
        out = {}
        for arrays, w in zip(all_arrays, weights):
            for key, value in arrays.items():
                term = value.astype(np.float64) * (w / total)
                out[key] = out[key] + term if key in out else term
        return ArrayRecord({k: Array(np.ascontiguousarray(v.astype(all_arrays[0][k].dtype)))
                            for k, v in out.items()})


def _x64() -> bool:
    import jax

    return bool(jax.config.jax_enable_x64)


def _short(items, limit=3):
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _clair_groups(problems, options):
    """One CLAIR verdict over all groups: ``(results, verdict)``, verdict with benign/scores/z (K,)."""
    results = cj.clair_groups(problems, **options)
    first = results[0]  # every result carries the same pooled verdict
    return results, _Verdict(np.asarray(first.client_benign), np.asarray(first.client_scores),
                             np.asarray(first.client_z), np.asarray(first.client_status))


@dataclass(frozen=True)
class _Verdict:
    benign: np.ndarray
    scores: np.ndarray
    z: np.ndarray
    status: np.ndarray
