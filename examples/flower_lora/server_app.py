"""ServerApp: federated LoRA on the synthetic task with ClairStrategy (or a Flower baseline).

Each round it prints which partitions were flagged; the evaluate rounds report
the honest nodes' error of the adapter each was sent (``benign-error``).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flwr_strategy

from clair_jax.flower import ClairStrategy

try:
    from . import task
except ImportError:  # pragma: no cover
    import task

app = ServerApp()

#: The last run's outcome, for scripts that run the app in this process.
LAST_RUN: dict = {}
#: Run-config defaults (``run_simulation`` passes no run config; run.py sets these).
DEFAULTS: dict = {"strategy": "clair", "num-rounds": 3, "fraction-train": 1.0}


def benign_error(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Mean and max ``error`` over the honest nodes' evaluate replies."""
    errors = [float(m["error"]) for r in records for m in r.metric_records.values() if not m.get("poisoned", 0)]
    if not errors:
        return MetricRecord()
    return MetricRecord({"benign-error": sum(errors) / len(errors), "benign-error-max": max(errors)})


class _Partitions:
    """Mixin: remembers each node id's partition id from its train replies."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.partition_of = getattr(self, "partition_of", {})
        for msg in replies:
            if msg.has_content() and "node" in msg.content.config_records:
                self.partition_of[msg.metadata.src_node_id] = int(msg.content["node"]["partition-id"])
        return super().aggregate_train(server_round, replies)


def make_strategy(name: str, cfg: task.TaskConfig, fraction_train: float = 1.0):
    """A strategy by name: clair, fedavg, fedmedian, fedtrimmedavg, krum, multikrum, bulyan."""
    classes = {"fedavg": flwr_strategy.FedAvg, "fedmedian": flwr_strategy.FedMedian,
               "fedtrimmedavg": flwr_strategy.FedTrimmedAvg, "krum": flwr_strategy.Krum,
               "multikrum": flwr_strategy.MultiKrum, "bulyan": flwr_strategy.Bulyan, "clair": ClairStrategy}
    if name not in classes:
        raise ValueError(f"strategy must be one of {sorted(classes)}, got {name!r}")
    # min_train_nodes: FedAvg samples max(fraction × connected, min_train_nodes) nodes, and under
    # run_simulation none are connected yet when round 1 is configured.
    common = dict(fraction_train=fraction_train, fraction_evaluate=1.0, min_available_nodes=cfg.num_nodes,
                  min_train_nodes=max(2, int(cfg.num_nodes * fraction_train)),
                  evaluate_metrics_aggr_fn=benign_error)
    cls = type(f"{classes[name].__name__}WithPartitions", (_Partitions, classes[name]), {})
    return cls(**_kwargs(name, common, cfg))


def _kwargs(name, common, cfg):
    f = cfg.num_poisoned
    extra = {"fedtrimmedavg": {"beta": 0.2}, "krum": {"num_malicious_nodes": f},
             "multikrum": {"num_malicious_nodes": f, "num_nodes_to_select": max(1, cfg.num_nodes - f)},
             "bulyan": {"num_malicious_nodes": f}}
    return {**common, **extra.get(name, {})}


def run(grid: Grid, name: str, cfg: task.TaskConfig, num_rounds: int = 3, fraction_train: float = 1.0,
        verbose: bool = True) -> dict:
    """Run one strategy for ``num_rounds`` and return what each round flagged and the errors."""
    strategy = make_strategy(name, cfg, fraction_train)
    initial = ArrayRecord({k: Array(v) for k, v in task.initial_adapter(cfg.seed).items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds,
                            train_config=ConfigRecord({"lora-alpha": task.LORA_ALPHA, "lora-r": task.LORA_R}))
    partition_of = getattr(strategy, "partition_of", {})
    flagged = {}
    for node_id, verdicts in getattr(strategy, "history", {}).items():
        for v in verdicts:
            if not v.benign:
                flagged.setdefault(v.server_round, []).append(partition_of.get(node_id, node_id))
    rounds = {r: {"benign-error": float(m["benign-error"]), "benign-error-max": float(m["benign-error-max"]),
                  "flagged-partitions": sorted(flagged.get(r, []))}
              for r, m in result.evaluate_metrics_clientapp.items() if "benign-error" in m}
    if verbose:
        print(f"strategy {name}: poisoned partitions "
              f"{[p for p in range(cfg.num_nodes) if cfg.poisoned(p)]}")
        for r, row in rounds.items():
            print(f"  round {r}: flagged partitions {row['flagged-partitions']}, "
                  f"honest nodes' error {row['benign-error']:.3f} (max {row['benign-error-max']:.3f})")
    return {"strategy": name, "rounds": rounds}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the strategy named by the run config (``strategy``, default clair)."""
    fields = {f: context.run_config[f] for f in task.TaskConfig.__dataclass_fields__ if f in context.run_config}
    cfg = task.TaskConfig(**fields)
    conf = {**DEFAULTS, **context.run_config}
    LAST_RUN.clear()
    LAST_RUN.update(run(grid, str(conf["strategy"]), cfg, int(conf["num-rounds"]), float(conf["fraction-train"])))
