"""ServerApp: federated LoRA on the synthetic task with ClairStrategy (or a Flower baseline).

The run config (pyproject.toml, ``flwr run . --run-config``) names the strategy,
the rounds and the share of nodes a round. Each round it prints the partitions
flagged and personalised and the honest nodes' error of the adapter each was sent;
at the end, for ClairStrategy, whether every honest node that had trained was
sent its own refined adapter at every later round and whether a poisoned node
ever got its own upload back.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flwr_strategy

import clair_jax as cj
from clair_jax.flower import ClairStrategy
from flower_lora import task

app = ServerApp()

STRATEGIES = {"fedavg": flwr_strategy.FedAvg, "fedmedian": flwr_strategy.FedMedian,
              "fedtrimmedavg": flwr_strategy.FedTrimmedAvg, "krum": flwr_strategy.Krum,
              "multikrum": flwr_strategy.MultiKrum, "bulyan": flwr_strategy.Bulyan, "clair": ClairStrategy}


def node_errors(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Each node's ``error`` (``errors[partition]``, -1 where none came) and the honest nodes' mean and max."""
    metrics = [m for r in records for m in r.metric_records.values()]
    errors = [-1.0] * (1 + max(int(m["partition-id"]) for m in metrics))
    for m in metrics:
        errors[int(m["partition-id"])] = float(m["error"])
    honest = [float(m["error"]) for m in metrics if not m.get("poisoned", 0)]
    return MetricRecord({"errors": errors, "benign-error": sum(honest) / max(1, len(honest)),
                         "benign-error-max": max(honest, default=0.0)})


class _Partitions:
    """Mixin: each node id's partition and the partitions that trained each round."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.partition_of = getattr(self, "partition_of", {})
        self.trained = getattr(self, "trained", {})
        for msg in replies:
            if msg.has_content() and "node" in msg.content.config_records:
                self.partition_of[msg.metadata.src_node_id] = int(msg.content["node"]["partition-id"])
        self.trained[server_round] = sorted(self.partition_of.get(m.metadata.src_node_id, -1) for m in replies)
        return super().aggregate_train(server_round, replies)


def make_strategy(name: str, cfg: task.TaskConfig, fraction_train: float = 1.0):
    """A strategy by name: clair, fedavg, fedmedian, fedtrimmedavg, krum, multikrum, bulyan.

    Krum and Multi-Krum are told the true number of poisoned nodes, capped at what
    their rule allows for the sample (n ≥ 2f + 3); FedTrimmedAvg trims 20 %.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    # FedAvg samples max(fraction × connected, min_train_nodes) nodes, and under a simulation
    # runtime few nodes may be connected when round 1 is configured: min_train_nodes fixes the size.
    sample = max(2, int(cfg.num_nodes * fraction_train))
    f = min(cfg.num_poisoned, max(0, (sample - 3) // 2))
    kwargs = dict(fraction_train=fraction_train, fraction_evaluate=1.0, min_available_nodes=cfg.num_nodes,
                  min_train_nodes=sample, evaluate_metrics_aggr_fn=node_errors)
    kwargs.update({"fedtrimmedavg": {"beta": 0.2}, "krum": {"num_malicious_nodes": f},
                   "multikrum": {"num_malicious_nodes": f, "num_nodes_to_select": max(1, sample - f)},
                   "bulyan": {"num_malicious_nodes": cfg.num_poisoned}}.get(name, {}))
    return type(f"{STRATEGIES[name].__name__}WithPartitions", (_Partitions, STRATEGIES[name]), {})(**kwargs)


def run(grid: Grid, name: str, cfg: task.TaskConfig, num_rounds: int, fraction_train: float,
        verbose: bool = True) -> dict:
    """Run one strategy; per round the honest nodes' errors, the partitions flagged, trained, personalised."""
    strategy = make_strategy(name, cfg, fraction_train)
    initial = ArrayRecord({k: Array(v) for k, v in task.initial_adapter(cfg.seed).items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds,
                            train_config=ConfigRecord({"lora-alpha": task.LORA_ALPHA, "lora-r": task.LORA_R}))
    pid = getattr(strategy, "partition_of", {})
    flagged: dict[int, set] = {}
    for node_id, verdicts in getattr(strategy, "history", {}).items():
        for v in verdicts:
            if v.flagged:
                flagged.setdefault(v.server_round, set()).add(pid.get(node_id, -1))
    personal = {key: sorted(pid.get(n, -1) for n in nodes) for key, nodes in getattr(strategy, "personalised",
                                                                                      {}).items()}
    rounds = {}
    for r, m in result.evaluate_metrics_clientapp.items():
        rounds[r] = {"benign-error": float(m["benign-error"]), "benign-error-max": float(m["benign-error-max"]),
                     "errors": [float(e) for e in m["errors"]], "trained": strategy.trained.get(r, []),
                     "flagged": sorted(flagged.get(r, ())), "personalised-train": personal.get((r, "train"), []),
                     "personalised-evaluate": personal.get((r, "evaluate"), []),
                     "clair-seconds": getattr(strategy, "clair_seconds", {}).get(r),
                     "clair-compile-seconds": getattr(strategy, "compile_seconds", {}).get(r)}
    out = {"strategy": name, "fraction-train": fraction_train, "rounds": rounds}
    if name == "clair":
        out["check"] = check(out, cfg)
    if verbose:
        print(f"strategy {name}: poisoned partitions {[p for p in range(cfg.num_nodes) if cfg.poisoned(p)]}")
        for r, row in rounds.items():
            seconds = (f", CLAIR {row['clair-seconds']:.2f} s ({row['clair-compile-seconds']:.2f} s compiling)"
                       if row["clair-seconds"] is not None else "")
            print(f"  round {r}: trained {row['trained']}, flagged {row['flagged']}, personalised "
                  f"{row['personalised-evaluate']}, honest error {row['benign-error']:.3f} "
                  f"(max {row['benign-error-max']:.3f}){seconds}")
        if "check" in out:
            print("check:", json.dumps(out["check"]))
    return out


def check(out: dict, cfg: task.TaskConfig) -> dict:
    """Messages that broke the promise: an honest partition that had trained sent anything but its own
    refined adapter (train messages of later rounds, every evaluate message from its first round on),
    and poisoned partitions ever sent their own refined upload."""
    trained_before: set[int] = set()
    missed, poisoned_back = [], set()
    for r in sorted(out["rounds"]):
        row = out["rounds"][r]
        personal = {"train": set(row["personalised-train"]), "evaluate": set(row["personalised-evaluate"])}
        missed += [(r, "train", p) for p in row["trained"] if p in trained_before and not cfg.poisoned(p)
                   and p not in personal["train"]]
        trained_before |= set(row["trained"])
        missed += [(r, "evaluate", p) for p in sorted(trained_before) if not cfg.poisoned(p)
                   and p not in personal["evaluate"]]
        poisoned_back |= {p for p in personal["train"] | personal["evaluate"] if cfg.poisoned(p)}
    return {"honest-trained-not-personalised": missed, "poisoned-sent-own-upload": sorted(poisoned_back)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the strategy named by the run config (``strategy``, ``num-server-rounds``, ``fraction-train``)."""
    cj.keep_compiled_programs()   # a later `flwr run` loads the programs this one compiles
    conf = context.run_config
    cfg = task.TaskConfig.from_run_config(conf)
    run(grid, str(conf.get("strategy", "clair")), cfg, int(conf.get("num-server-rounds", 6)),
        float(conf.get("fraction-train", 0.3)))
