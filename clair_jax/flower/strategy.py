"""ClairStrategy: FedAvg's sampling and messages, CLAIR's judgement and a refined adapter per node."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from clair_jax.flower import bank as banking
from clair_jax.flower.options import check_options, module_scaling
from clair_jax.flower.replies import check_replies, fedavg, same_layout, usable_contents
from clair_jax.flower.verdicts import NodeHistory, NodeRecord, NodeVerdict

__all__ = ["ClairStrategy"]


class ClairStrategy(NodeHistory, FedAvg):
    """Federated LoRA aggregation with CLAIR: flag contaminated adapters, refine the rest.

    The first ten arguments are ``FedAvg``'s, with its defaults; CLAIR's are
    keyword-only (``docs/flower.md`` has the table):

    Args:
        lora_scaling: s in ΔW = s·B·A; a number, a function of the module name, or
            None to read ``lora-alpha`` / ``lora-r`` (``lora-use-rslora``) from the train config.
        personalise: send each node its own refined adapter (False: the global arrays).
        flagged_nodes: ``"global"`` sends a flagged node the global arrays; ``"exclude"``
            leaves it out of the round.
        max_staleness: rounds a banked adapter stays in the judged pool (and shapes Û);
            older, it is still refined with the pool's Û and sent to its node.
        exclude_after: a node flagged this many times, in more than half of its
            verdicts, is excluded: its adapter leaves the pool, it is never personalised.
        min_judged: fewest adapters CLAIR judges; below it the replies are averaged unjudged.
        pad_clients: the pool is padded to a multiple of this, at least the grid's
            node count, so one compiled CLAIR program serves every round (None: no padding).
        lora_a_tag, lora_b_tag: the key parts that pair a module's A and B.
        clair_options: keyword arguments for CLAIR (``rank``, ``lam``, ``noise``, ``z_crit``, ...).

    Attributes:
        history: ``{node: [NodeVerdict, ...]}``: each reply's verdict, and a banked
            adapter's whenever its status changes.
        records: ``{node: NodeRecord}``: verdicts counted across rounds, the latest one.
        bank: ``{node: Banked}``: each node's latest valid adapter.
        clair_seconds: ``{round: seconds}`` of the CLAIR call (compiling included).
        compile_seconds: ``{round: seconds}`` of that call spent compiling: a run's first
            judged round compiles CLAIR's programs, later rounds reuse them (0).
        personalised: ``{(round, "train" | "evaluate"): [node, ...]}`` sent their own adapter.

    Example (in a ServerApp; see ``docs/flower.md``)::

        strategy = ClairStrategy(fraction_train=0.2, lora_scaling=2.0)
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)
        strategy.history[node_id][-1].status
    """

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def __init__(self, fraction_train: float = 1.0, fraction_evaluate: float = 1.0, min_train_nodes: int = 2,
                 min_evaluate_nodes: int = 2, min_available_nodes: int = 2, weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config",
                 train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
                 evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None, *,
                 lora_scaling: float | Callable[[str], float] | None = None, personalise: bool = True,
                 flagged_nodes: str = "global", max_staleness: int = 10, exclude_after: int = 3,
                 min_judged: int = 3, pad_clients: int | None = 8, lora_a_tag: str = "lora_A",
                 lora_b_tag: str = "lora_B", clair_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
                         min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
                         train_metrics_aggr_fn, evaluate_metrics_aggr_fn)
        self.clair_options = check_options(
            lora_scaling=lora_scaling, flagged_nodes=flagged_nodes, max_staleness=max_staleness,
            exclude_after=exclude_after, min_judged=min_judged, pad_clients=pad_clients, lora_a_tag=lora_a_tag,
            lora_b_tag=lora_b_tag, clair_options=clair_options)
        self.lora_scaling, self.personalise, self.flagged_nodes = lora_scaling, personalise, flagged_nodes
        self.max_staleness, self.exclude_after, self.min_judged = max_staleness, exclude_after, min_judged
        self.pad_clients, self.lora_a_tag, self.lora_b_tag = pad_clients, lora_a_tag, lora_b_tag
        self.history: dict[int, list[NodeVerdict]] = {}
        self.records: dict[int, NodeRecord] = {}
        self.bank: dict[int, banking.Banked] = {}
        self.clair_seconds: dict[int, float] = {}
        self.compile_seconds: dict[int, float] = {}
        self.personalised: dict[tuple[int, str], list[int]] = {}
        self._personal: dict[int, dict[str, np.ndarray]] = {}
        self._template: dict[str, tuple[int, ...]] | None = None
        self._train_config: dict[str, Any] = {}
        self._capacity = 0

    def summary(self) -> None:
        """Log the FedAvg summary and CLAIR's options."""
        super().summary()
        log(INFO, "\t└──> CLAIR: personalise %s | flagged nodes: %s | pool staleness %d rounds | excluded after "
            "%d flags | min judged %d | options %s", self.personalise, self.flagged_nodes, self.max_staleness,
            self.exclude_after, self.min_judged, self.clair_options or "(defaults)")

    def personal_arrays(self, node_id: int, arrays: ArrayRecord) -> ArrayRecord:
        """What the node is sent next: its refined adapter inside ``arrays``, or ``arrays`` itself."""
        own = self._personal.get(node_id)
        if not self.personalise or own is None or self.is_flagged(node_id):
            return arrays
        if any(k not in arrays or tuple(arrays[k].shape) != v.shape for k, v in own.items()):
            log(WARNING, "clair: node %d's refined adapter no longer fits the global arrays; it gets them", node_id)
            return arrays
        return ArrayRecord({k: Array(np.ascontiguousarray(own[k])) if k in own else v for k, v in arrays.items()})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes as FedAvg does and send each its own payload."""
        self._template = {k: tuple(v.shape) for k, v in arrays.items()}
        self._train_config = dict(config)
        return self._configure(server_round, arrays, config, grid, self.fraction_train, self.min_train_nodes,
                               MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample nodes as FedAvg does and send each its own payload."""
        return self._configure(server_round, arrays, config, grid, self.fraction_evaluate,
                               self.min_evaluate_nodes, MessageType.EVALUATE)

    def _configure(self, server_round, arrays, config, grid, fraction, min_nodes, message_type):
        if fraction == 0.0:
            return []
        connected = list(grid.get_node_ids())
        self._capacity = max(self._capacity, len(connected))
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes,
                                           max(int(len(connected) * fraction), min_nodes))
        log(INFO, "configure_%s: Sampled %s nodes (out of %s)", message_type, len(node_ids), len(all_nodes))
        config["server-round"] = server_round
        messages, personal, left_out = [], [], []
        for node_id in node_ids:
            if self.flagged_nodes == "exclude" and self.is_flagged(node_id):
                left_out.append(node_id)
                continue
            payload = self.personal_arrays(node_id, arrays)
            if payload is not arrays:
                personal.append(node_id)
            record = RecordDict({self.arrayrecord_key: payload, self.configrecord_key: config})
            messages.append(Message(content=record, dst_node_id=node_id, message_type=message_type))
        self.personalised[(server_round, message_type)] = sorted(personal)
        log(INFO, "\t> clair: %d of %d nodes get their own refined adapter%s", len(personal), len(messages),
            f"; flagged nodes left out: {left_out}" if left_out else "")
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, judge them with the bank, refine every banked node, return the benign FedAvg.

        Returns:
            (global arrays, metrics): the weighted FedAvg of every adapter of the pool
            judged benign (None when there is none), the benign repliers' train metrics
            plus ``clair-flagged``, ``clair-noisy``, ``clair-invalid``, ``clair-replies``,
            ``clair-judged`` (the pool's size), ``clair-personal`` and ``clair-excluded``.
        """
        replies = list(replies)
        valid, rejected = check_replies(replies, self.weighted_by_key, self.arrayrecord_key, self._template)
        for node_id, reason in rejected.items():
            self._record(node_id, NodeVerdict(server_round, False, False, reason), history=True)
            self.bank.pop(node_id, None)
            self._personal.pop(node_id, None)
        for node_id, (arrays, weight, _) in valid.items():
            self.bank[node_id] = banking.Banked(server_round, arrays, weight, True)
        reference = next(iter(valid.values()))[0] if valid else None
        pool = {**{n: valid[n][0] for n in valid}, **{  # the replies, then the bank's fresh adapters
            n: b.arrays for n, b in sorted(self.bank.items()) if n not in valid and not self.is_excluded(n)
            and server_round - b.server_round <= self.max_staleness and same_layout(b.arrays, reference)}}
        modules = banking.lora_modules(reference, self.lora_a_tag, self.lora_b_tag) if valid else []
        if valid and (not modules or len(pool) < self.min_judged):
            why = "no lora_A/lora_B pairs in the arrays" if not modules else \
                f"only {len(pool)} adapters to judge (min_judged={self.min_judged})"
            log(WARNING, "aggregate_train: round %d not judged by CLAIR: %s; the replies are averaged",
                server_round, why)
            for node_id in valid:
                self._record(node_id, NodeVerdict(server_round, True, False, f"unjudged: {why}"), history=True)
            benign = [n for n in valid if not self.is_excluded(n)]
        elif valid:
            benign = self._judge(server_round, valid, pool, modules, reference)
        else:
            benign = []
        arrays = fedavg([self.bank[n].arrays for n in benign], [self.bank[n].weight for n in benign]) \
            if benign else None
        return arrays, self._train_metrics(server_round, replies, valid, rejected, benign, len(pool))

    def _judge(self, server_round, valid, pool, modules, reference):
        """Judge the pool, keep each node's verdict and refined adapter; the benign members."""
        reasons = {n: "clair" if n in valid else f"clair: banked adapter of round {self.bank[n].server_round}"
                   for n in pool}
        size = banking.pool_size(len(pool), self._capacity, self.pad_clients)
        trusted = {n for n in pool if (v := self.latest_verdict(n)) is not None and v.judged and v.vouched
                   and not v.flagged and v.server_round < server_round}
        judgement = banking.judge_with_trust(server_round, pool, modules, self._scaling, self.clair_options, size,
                                             reasons, trusted)
        self.clair_seconds[server_round] = judgement.seconds
        self.compile_seconds[server_round] = judgement.compile_seconds
        for node_id, verdict in judgement.verdicts.items():
            self._record(node_id, verdict, history=node_id in valid)
            self.bank[node_id] = replace(self.bank[node_id], benign=verdict.benign)
            if not self.is_vouched(node_id) or node_id not in judgement.refined:
                self._personal.pop(node_id, None)
            else:
                self._personal[node_id] = judgement.refined[node_id]
        for node_id, banked in self.bank.items():  # out of the pool by age: refined with this round's Û
            if node_id not in pool and self.is_vouched(node_id) and same_layout(banked.arrays, reference):
                self._personal[node_id] = banking.project(banked.arrays, modules, judgement.subspaces)
        benign = [n for n, v in judgement.verdicts.items() if v.status == "benign" and not self.is_excluded(n)]
        return [n for n in benign if judgement.verdicts[n].vouched] or benign  # the vouched ones, if any

    def _train_metrics(self, server_round, replies, valid, rejected, benign, judged):
        flagged = sorted(rejected) + [n for n in valid if self.is_flagged(n)]
        noisy = [n for n in valid if self.history[n][-1].status == "noisy"]
        log(INFO, "aggregate_train: clair flagged %d of %d replies%s", len(flagged), len(replies),
            f": {flagged}" if flagged else "")
        for node_id in flagged:
            log(INFO, "\t> node %d flagged: %s", node_id, self.history[node_id][-1].reason)
        metrics = MetricRecord()
        repliers = [valid[n][2] for n in valid if n in benign]
        if repliers:
            try:
                metrics = self.train_metrics_aggr_fn(repliers, self.weighted_by_key)
            except Exception as err:  # noqa: BLE001  (a user's metrics must not sink the round)
                log(WARNING, "aggregate_train: train metrics could not be aggregated (%s); CLAIR's only", err)
                metrics = MetricRecord()
        for key, value in (("flagged", len(flagged)), ("noisy", len(noisy)), ("invalid", len(rejected)),
                           ("replies", len(replies)), ("judged", judged if server_round in self.clair_seconds
                                                       else 0), ("personal", len(self._personal)),
                           ("excluded", sum(self.is_excluded(n) for n in self.records))):
            metrics[f"clair-{key}"] = value
        return metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate the evaluate metrics of the replies that carry a usable weight (others are logged)."""
        contents = usable_contents(replies, self.weighted_by_key)
        if not contents:
            return None
        try:
            return self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as err:  # noqa: BLE001
            log(WARNING, "aggregate_evaluate: metrics could not be aggregated (%s)", err)
            return None

    def _scaling(self, module: str) -> float:
        return module_scaling(self.lora_scaling, self._train_config, module)
