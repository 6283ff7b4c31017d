"""Run the example: ``python -m examples.flower_lora.run [--strategy clair] [--backend ray]``.

``--backend ray`` (default) runs the ServerApp and ClientApp with Flower's
``run_simulation`` (needs ``flwr[simulation]``); ``--backend inprocess`` drives the
same ClientApp through an in-process Grid (no Ray; for tests and benchmarks).
It prints the partitions flagged each round and the honest nodes' error.
"""

from __future__ import annotations

import argparse
import json

from . import client_app, server_app, task


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="clair",
                        choices=["clair", "fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
    parser.add_argument("--backend", default="ray", choices=["ray", "inprocess"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction-train", type=float, default=1.0)
    args = parser.parse_args(argv)
    cfg = task.TaskConfig()
    if args.backend == "inprocess":
        from .inprocess import InProcessGrid

        out = server_app.run(InProcessGrid(client_app.app, cfg.num_nodes), args.strategy, cfg,
                             args.rounds, args.fraction_train)
    else:
        from flwr.simulation import run_simulation

        server_app.DEFAULTS.update({"strategy": args.strategy, "num-rounds": args.rounds,
                                    "fraction-train": args.fraction_train})
        run_simulation(server_app=server_app.app, client_app=client_app.app, num_supernodes=cfg.num_nodes,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2, "include_dashboard": False}})
        out = dict(server_app.LAST_RUN)
    print(json.dumps(out["rounds"], indent=1))
    return out


if __name__ == "__main__":
    main()
