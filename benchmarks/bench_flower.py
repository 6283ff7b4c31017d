"""ClairStrategy over many rounds with few nodes a round, next to Flower's strategies and local training.

    python benchmarks/bench_flower.py [--rounds 20] [--draws 3] [--fractions 0.1 0.2 0.3 1.0]

The example app's ServerApp and ClientApp (examples/flower_lora: NumPy LoRA nodes
of a synthetic task, the last partitions poisoned with one shared off-subspace
backdoor) run through an in-process Grid (the same messages, no Ray): 20 nodes,
4 poisoned, a share of the nodes trains each round, every node is evaluated on
the adapter it is sent after each round. Each draw seeds Flower's node sampling
(``random.seed``) and the node ids; every strategy sees the same draws. The
figure is a node's error ‖s·B·A − ΔW*_k‖_F / ‖ΔW*_k‖_F. Local only: each node
keeps its own adapter and trains it at the rounds it is drawn (the same draws).
Writes ``benchmarks/results/bench_flower.json`` and ``docs/flower_rounds.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples" / "flower_lora")]  # run from anywhere

from benchmarks._common import machine_info, markdown_table  # noqa: E402
from flower_lora import client_app, server_app, task  # noqa: E402
from flower_lora.inprocess import InProcessGrid  # noqa: E402

METHODS = ["clair", "fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum"]
#: (round, backend compiles, compile seconds) of each CLAIR judgement of the current run
#: (``ClairStrategy.compile_seconds`` holds the seconds too; this counts the programs).
COMPILES: list = []


def count_compiles():
    """Record, per CLAIR judgement, how many XLA programs were compiled and for how long."""
    from clair_jax.flower import bank
    from clair_jax.flower.timing import compiling

    judge = bank.judge_with_trust

    def counted(server_round, *args, **kwargs):
        with compiling() as compiled:
            out = judge(server_round, *args, **kwargs)
        COMPILES.append((server_round, compiled.count, compiled.seconds))
        return out

    bank.judge_with_trust = counted


def local_only(cfg: task.TaskConfig, trained: dict[int, list[int]], rounds: int) -> dict[int, list[float]]:
    """Each node's error after every round when it trains its own adapter at the rounds it is drawn."""
    adapters = {p: task.initial_adapter(cfg.seed) for p in range(cfg.num_nodes)}
    out = {}
    for r in range(1, rounds + 1):
        for p in trained.get(r, []):
            adapters[p] = task.local_fit(adapters[p], task.target(cfg, p, r), cfg.local_steps)
        out[r] = [task.adapter_error(adapters[p], cfg, p) for p in range(cfg.num_nodes)]
    return out


def summarise(cfg, errors, trained, personal=None):
    """Per round: honest nodes' mean error (all, and those that trained before) and the worst honest node."""
    honest = [p for p in range(cfg.num_nodes) if not cfg.poisoned(p)]
    seen, rows = set(), {}
    for r in sorted(errors):
        seen |= set(trained.get(r, []))
        e = errors[r]
        row = {"mean": float(np.mean([e[p] for p in honest])), "max": float(max(e[p] for p in honest))}
        trained_honest = [p for p in honest if p in seen]
        row["mean_trained"] = float(np.mean([e[p] for p in trained_honest])) if trained_honest else float("nan")
        row["trained_honest"] = trained_honest
        if personal is not None:
            row["not_personalised"] = [p for p in trained_honest if p not in personal.get(r, [])]
        rows[r] = row
    return rows


def run_one(cfg, method, fraction, draw, rounds):
    COMPILES.clear()
    random.seed(draw)  # flwr samples nodes with random.sample: the same nodes for every method
    grid = InProcessGrid(client_app.app, cfg.num_nodes, {"num-nodes": cfg.num_nodes,
                                                         "num-poisoned": cfg.num_poisoned}, seed=draw)
    t0 = time.perf_counter()
    out = server_app.run(grid, method, cfg, rounds, fraction, verbose=False)
    out["seconds"] = time.perf_counter() - t0
    out["compiles"] = list(COMPILES)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.2, 0.3, 1.0])
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "bench_flower.json"))
    parser.add_argument("--app-draws", type=int, default=20,
                        help="draws of the app's own scenario (10 nodes, 3 poisoned, 3 a round, 6 rounds)")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "flower_rounds.png"))
    parser.add_argument("--replot", action="store_true", help="only draw the plot again from --json")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.json).read_text())
        for key in ("rounds", "draws", "fractions", "methods"):
            setattr(args, key, saved["args"][key])
        for run in saved["runs"]:
            run["summary"] = {int(r): row for r, row in run["summary"].items()}
        return plot(saved["runs"], args)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = task.TaskConfig(num_nodes=20, num_poisoned=4)
    count_compiles()
    runs = []
    for fraction in args.fractions:
        for draw in range(args.draws):
            trained = None
            for method in args.methods:
                out = run_one(cfg, method, fraction, draw, args.rounds)
                rounds = {int(r): row for r, row in out["rounds"].items()}
                this = {r: row["trained"] for r, row in rounds.items()}
                if trained is not None and this != trained:
                    raise RuntimeError(f"{method} drew other nodes than {args.methods[0]} (draw {draw})")
                trained = this
                personal = {r: row["personalised-evaluate"] for r, row in rounds.items()} \
                    if method == "clair" else None
                errors = {r: row["errors"] for r, row in rounds.items()}
                run = {"method": method, "fraction": fraction, "draw": draw, "seconds": out["seconds"],
                       "task_nodes": cfg.num_nodes, "task_poisoned": cfg.num_poisoned,
                       "errors": errors, "trained": trained, "summary": summarise(cfg, errors, trained, personal)}
                if method == "clair":
                    run["clair_seconds"] = {r: row["clair-seconds"] for r, row in rounds.items()}
                    run["compile_seconds"] = {r: row["clair-compile-seconds"] for r, row in rounds.items()}
                    run["flagged"] = {r: row["flagged"] for r, row in rounds.items()}
                    run["check"] = out["check"]
                    run["compiles"] = out["compiles"]
                runs.append(run)
                print(f"{fraction:4.0%} draw {draw} {method:>13}: honest error round {args.rounds} "
                      f"{run['summary'][args.rounds]['mean']:.3f}, {out['seconds']:.1f} s", flush=True)
            local = local_only(cfg, trained, args.rounds)
            runs.append({"method": "local only", "fraction": fraction, "draw": draw, "seconds": 0.0,
                         "task_nodes": cfg.num_nodes, "task_poisoned": cfg.num_poisoned,
                         "errors": local, "trained": trained, "summary": summarise(cfg, local, trained)})
    rows, targets = table(cfg, runs, args), targets_at(cfg, runs, 0.2, 10)
    app = app_scenario(args.app_draws)
    info = machine_info()
    print(f"\n{cfg.num_nodes} nodes, {cfg.num_poisoned} poisoned, {args.rounds} rounds, {args.draws} draws; "
          f"honest nodes' error of the adapter each is sent (mean over draws); load average "
          f"{info.get('loadavg_at_start')}")
    print(markdown_table(rows, [("share", "nodes a round", ""), ("method", "method", ""),
                                ("r5", "round 5", ".3f"), ("r10", "round 10", ".3f"),
                                ("rlast", f"round {args.rounds}", ".3f"),
                                ("trained", f"trained nodes, round {args.rounds}", ".3f"),
                                ("worst", "worst honest node", ".3f"), ("extra", "CLAIR", "")]))
    print("\ntargets at 20 %, rounds 10 on:", targets)
    print(f"\nthe app's scenario (10 nodes, 3 poisoned, 3 a round, 6 rounds), {args.app_draws} draws: "
          f"{app['summary']}")
    payload = dict(benchmark="bench_flower", machine=info, args=vars(args), task=cfg.__dict__, rows=rows,
                   targets=targets, app_scenario=app, runs=compact(runs))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, separators=(",", ":")))
    print("wrote", args.json)
    plot(runs, args)


def compact(runs):
    """Errors rounded to 5 digits; each node's errors kept for ClairStrategy and local only (the targets)."""
    out = []
    for run in runs:
        run = dict(run, summary={r: {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}
                                 for r, row in run["summary"].items()})
        if run["method"] in ("clair", "local only"):
            run["errors"] = {r: [round(e, 5) for e in v] for r, v in run["errors"].items()}
        else:
            run.pop("errors")
        out.append(run)
    return out


def table(cfg, runs, args):
    rows = []
    for fraction in args.fractions:
        for method in [*args.methods, "local only"]:
            group = [r for r in runs if r["fraction"] == fraction and r["method"] == method]
            mean = lambda key, rnd: statistics.fmean(r["summary"][rnd][key] for r in group)  # noqa: E731
            row = {"share": f"{fraction:.0%}", "method": method, "r5": mean("mean", min(5, args.rounds)),
                   "r10": mean("mean", min(10, args.rounds)), "rlast": mean("mean", args.rounds),
                   "trained": mean("mean_trained", args.rounds),
                   "worst": max(r["summary"][args.rounds]["max"] for r in group), "extra": ""}
            if method == "clair":
                later = [s for r in group for rnd, s in r["clair_seconds"].items() if s is not None and rnd >= 2
                         and not any(c[0] == rnd and c[1] for c in r["compiles"])]
                compiled = [(r["draw"], c, r["clair_seconds"][c[0]]) for r in group for c in r["compiles"] if c[1]]
                row["extra"] = (f"rounds without compiling: median {statistics.median(later):.3f} s, "
                                f"max {max(later):.2f} s; compiled: " + (", ".join(
                                    f"draw {d} round {c[0]}: {c[1]} programs, {c[2]:.1f} s compiling of "
                                    f"{total:.1f} s" for d, c, total in compiled) or "nothing"))
            rows.append(row)
    return rows


def targets_at(cfg, runs, fraction, from_round):
    """Issue 31's targets at ``fraction`` from ``from_round`` on, per draw."""
    out = []
    for draw in sorted({r["draw"] for r in runs if r["fraction"] == fraction}):
        group = {r["method"]: r for r in runs if r["fraction"] == fraction and r["draw"] == draw}
        clair, local = group["clair"], group["local only"]
        rounds = [rnd for rnd in clair["summary"] if rnd >= from_round]
        missed = sum(len(clair["summary"][rnd]["not_personalised"]) for rnd in rounds)
        worse = [(rnd, p) for rnd in rounds for p in clair["summary"][rnd]["trained_honest"]
                 if clair["errors"][rnd][p] > local["errors"][rnd][p]]
        below = {m: all(clair["summary"][rnd]["mean"] < g["summary"][rnd]["mean"] for rnd in rounds)
                 for m, g in group.items() if m != "clair"}
        out.append({"draw": draw, "trained honest nodes not personalised": missed,
                    "trained honest nodes worse than local (round, partition)": worse,
                    "honest mean below at every round": below})
    return out


def app_scenario(draws):
    """examples/flower_lora's own scenario over many draws: what its end-of-run check reports."""
    cfg, checks = task.TaskConfig(), []
    for draw in range(draws):
        out = run_one(cfg, "clair", 0.3, 100 + draw, 6)
        first = out["rounds"][1]["trained"]
        checks.append({"draw": 100 + draw, "round 1 drew": first, **out["check"]})
    missed = sum(bool(c["honest-trained-not-personalised"]) for c in checks)
    back = [c for c in checks if c["poisoned-sent-own-upload"]]
    majority = sum(sum(cfg.poisoned(p) for p in c["round 1 drew"]) >= 2 for c in checks)
    summary = (f"an honest node that had trained not personalised in {missed} draws; a poisoned node sent its "
               f"own upload back in {len(back)} draws, round 1 having drawn a poisoned majority in "
               f"{sum(sum(cfg.poisoned(p) for p in c['round 1 drew']) >= 2 for c in back)} of them "
               f"(and in {majority} draws in all)")
    return {"summary": summary, "checks": checks}


def plot(runs, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, axes = plt.subplots(2, (len(args.fractions) + 1) // 2, figsize=(10, 7), sharey=True, squeeze=False)
    axes = axes.ravel()
    for ax, fraction in zip(axes, args.fractions):
        for method in [*args.methods, "local only"]:
            group = [r for r in runs if r["fraction"] == fraction and r["method"] == method]
            rounds = sorted(int(r) for r in group[0]["summary"])
            curve = [statistics.fmean(r["summary"][rnd]["mean"] for r in group) for rnd in rounds]
            style = {"clair": dict(lw=2.6, color="black", label="ClairStrategy"),
                     "local only": dict(ls="--", color="gray", label="local only")}.get(method, dict(label=method))
            ax.plot(rounds, curve, **style)
        ax.set_title(f"{fraction:.0%} of {runs[0]['task_nodes']} nodes a round")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(args.fractions):]:
        ax.axis("off")
    for ax in axes[-2:]:
        ax.set_xlabel("round")
    for ax in axes[::2]:
        ax.set_ylabel("honest nodes' error")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"Error of the adapter each honest node is sent, mean over nodes and {args.draws} draws "
                 f"({runs[0]['task_poisoned']} of {runs[0]['task_nodes']} nodes poisoned)", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print("plot:", args.plot)


if __name__ == "__main__":
    main()
