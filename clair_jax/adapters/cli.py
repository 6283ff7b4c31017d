"""``clair aggregate CLIENT_DIR ... --out OUT_DIR``: PEFT adapters in, refined adapters out.

Exit status 0 on success, 2 when a client directory cannot be used (one line on
stderr naming it and the reason; nothing is written).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run", "format_table"]


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser):
    parser.add_argument("clients", nargs="+", metavar="CLIENT_DIR",
                        help="PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors), K >= 3")
    parser.add_argument("--out", required=True, metavar="OUT_DIR",
                        help="write OUT_DIR/<client dir name>/ for every client not contaminated (benign or noisy)")
    parser.add_argument("--json", metavar="REPORT", help="also write the report as JSON")
    parser.add_argument("--global-rank", type=_positive_int, metavar="R",
                        help="also write OUT_DIR/global_adapter/: rank-R SVD of the mean refined benign update")
    parser.add_argument("--keep-flagged", metavar="DIR", help="copy each contaminated client's adapter here unchanged")
    parser.add_argument("--rank", type=_positive_int, help="shared rank r̂ (default: chosen from the spectrum)")
    parser.add_argument("--z-crit", type=float, default=5.0,
                        help="refit test: robust standard deviations allowed above the benign median (default 5)")
    parser.add_argument("--chunk-mib", type=float, default=256,
                        help="float32 factors per module group, MiB (default 256): bounds peak memory")
    parser.add_argument("--devices", type=_positive_int, default=1, metavar="N",
                        help="spread each module group's modules over N local accelerators (default 1)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the verdict (needs matplotlib): pooled z per client "
                        "with its status, per-module z heatmap, spectra with r̂ and σ̂")
    parser.add_argument("--pooling", choices=("none", "centre"), default="none",
                        help="none (default): each client's adapter projected onto the shared subspace; centre: also "
                             "pooled toward the benign centre, halfway or less by how much of its distance is "
                             "beyond noise (clair_client.json in every client dir, optional: num_examples or "
                             "update_noise); the refined adapters then have rank r + the centre's rank")
    parser.add_argument("--centre-rank", type=_positive_int, metavar="R",
                        help="rank of the centre with --pooling centre (default 2 × the clients' LoRA rank)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def format_table(report) -> str:
    """The terminal table: client, verdict (its status), score, z, output."""
    rows = [("client", "verdict", "score", "z", "output")]
    for c in report["clients"]:
        status = c.get("status", "benign" if c["benign"] else "contaminated")
        verdict = "contaminated (non-finite)" if c["nonfinite"] else status
        rows.append((c["name"], verdict, f"{c['score']:.3f}", f"{c['z']:.2f}", c["output"] or c["flagged_copy"] or "—"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows)


def _devices(n):
    """The first ``n`` local devices (GPUs/TPUs), or a clear exit."""
    import jax

    local = jax.local_devices()
    if n > len(local):
        raise SystemExit(f"clair aggregate: --devices {n}: only {len(local)} local device(s) "
                         f"({local[0].platform}) available")
    return local[:n]


def run(args) -> int:
    options = dict(z_crit=args.z_crit)
    if args.devices > 1:
        options["devices"] = _devices(args.devices)

    from clair_jax.adapters.aggregate import aggregate
    from clair_jax.adapters.peft_format import AdapterError

    if args.plot:   # before any work: a missing matplotlib is a clear exit, not a lost run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("clair aggregate: --plot needs matplotlib: pip install \"clair-jax[plot]\"", file=sys.stderr)
            return 2

    if args.rank is not None:
        options["rank"] = args.rank
    if args.pooling != "none":
        options["pooling"] = args.pooling
        if args.centre_rank is not None:
            options["centre_rank"] = args.centre_rank
    elif args.centre_rank is not None:
        print("clair aggregate: --centre-rank needs --pooling centre", file=sys.stderr)
        return 2
    try:
        report = aggregate(args.clients, args.out, json_path=args.json, global_rank=args.global_rank,
                           keep_flagged=args.keep_flagged, chunk_bytes=int(args.chunk_mib * 2**20),
                           progress=not args.quiet, **options)
    except AdapterError as exc:
        print(f"clair aggregate: refused: {exc.client}: {exc.reason}", file=sys.stderr)
        return 2
    print(format_table(report))
    written = [c for c in report["clients"] if c["output"]]
    flagged = [c["name"] for c in report["clients"] if c["status"] == "contaminated"]
    noisy = [c["name"] for c in report["clients"] if c["status"] == "noisy"]
    print(f"\n{len(written)} refined adapter(s) written to {report['out_dir']}"
          + (f" (honest but noisy, refined by projection, not used to fit Û: {', '.join(noisy)})" if noisy else "")
          + (f"; contaminated, no output: {', '.join(flagged)}" if flagged else ""))
    if any(c["passthrough"] for c in report["clients"]):
        print("full weights (modules_to_save / lora_bias) were copied through unchanged per client")
    if report["global_adapter"]:
        print(f"global adapter (rank {report['global_adapter']['rank']}): {report['global_adapter']['path']}")
    if args.json:
        print(f"report: {args.json}")
    if args.plot:
        from clair_jax.plotting import report_figure

        report_figure(report, args.plot, z_crit=args.z_crit)
        print(f"verdict plot: {args.plot}")
    return 0
