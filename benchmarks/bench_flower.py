"""ClairStrategy next to FedAvg and Flower's robust strategies on examples/flower_lora.

    python benchmarks/bench_flower.py [--rounds 3] [--json bench_results/bench_flower.json]

Every strategy runs the example's ServerApp logic and ClientApp (15 NumPy LoRA
nodes, 3 poisoned with one shared off-subspace backdoor) through an in-process
Grid (no Ray; same messages). The figure per method is the honest nodes' error
‖s·B·A − ΔW*_k‖_F / ‖ΔW*_k‖_F of the adapter each is sent after the last round
(the evaluate round's ``benign-error``): the global arrays for Flower's
strategies, each node's own refined adapter for ClairStrategy. Two scenarios:
every node trains each round, and 30% of the nodes (4 replies) per round.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from benchmarks._common import machine_info, markdown_table, write_json
from examples.flower_lora import client_app, server_app, task
from examples.flower_lora.inprocess import InProcessGrid

METHODS = ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "clair"]


def local_only(cfg: task.TaskConfig, rounds: int) -> float:
    """Honest nodes' error when each keeps its own adapter (no federation)."""
    errors = []
    for pid in range(cfg.num_nodes):
        if cfg.poisoned(pid):
            continue
        arrays = task.initial_adapter(cfg.seed)
        for r in range(1, rounds + 1):
            arrays = task.local_fit(arrays, task.target(cfg, pid, r), cfg.local_steps)
        errors.append(task.adapter_error(arrays, cfg, pid))
    return float(np.mean(errors))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench_results/bench_flower.json")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = task.TaskConfig()
    poisoned = [p for p in range(cfg.num_nodes) if cfg.poisoned(p)]
    rows = []
    for scenario, fraction in (("all nodes", 1.0), ("30% of nodes", 0.3)):
        for name in args.methods:
            random.seed(0)  # flwr samples nodes with random.sample: the same nodes for every method
            t0 = time.perf_counter()
            out = server_app.run(InProcessGrid(client_app.app, cfg.num_nodes, seed=1), name, cfg, args.rounds,
                                 fraction, verbose=False)
            seconds = time.perf_counter() - t0
            last = out["rounds"].get(args.rounds)
            flagged = sorted({p for r in out["rounds"].values() for p in r["flagged-partitions"]})
            rows.append({"scenario": scenario, "method": name,
                         "error": last["benign-error"] if last else float("nan"),
                         "error_max": last["benign-error-max"] if last else float("nan"),
                         "flagged": ",".join(map(str, flagged)) if name == "clair" else "-",
                         "seconds": seconds, "rounds": out["rounds"]})
            print(f"{scenario:>13} {name:>13}: honest error {rows[-1]['error']:.3f} "
                  f"(max {rows[-1]['error_max']:.3f}), {seconds:.1f} s", flush=True)
        clean = task.TaskConfig(num_poisoned=0)
        random.seed(0)
        out = server_app.run(InProcessGrid(client_app.app, clean.num_nodes, {"num_poisoned": 0}, seed=1), "fedavg", clean,
                             args.rounds, fraction, verbose=False)
        rows.append({"scenario": scenario, "method": "fedavg, no poisoned nodes (reference)",
                     "error": out["rounds"][args.rounds]["benign-error"],
                     "error_max": out["rounds"][args.rounds]["benign-error-max"], "flagged": "-",
                     "seconds": 0.0, "rounds": out["rounds"]})
        rows.append({"scenario": scenario, "method": "local only (no federation)",
                     "error": local_only(cfg, args.rounds), "error_max": float("nan"), "flagged": "-",
                     "seconds": 0.0, "rounds": {}})
    info = machine_info()
    print(f"\nhonest nodes' error after {args.rounds} rounds; poisoned partitions {poisoned}; "
          f"load average {info.get('loadavg_at_start')}")
    print(markdown_table(rows, [("scenario", "scenario", ""), ("method", "method", ""),
                                ("error", "honest error (mean)", ".3f"), ("error_max", "max", ".3f"),
                                ("flagged", "flagged partitions (any round)", ""),
                                ("seconds", "wall s", ".1f")]))
    write_json(args.json, dict(benchmark="bench_flower", machine=info, args=vars(args),
                               task=cfg.__dict__, poisoned=poisoned, rows=rows))


if __name__ == "__main__":
    main()
