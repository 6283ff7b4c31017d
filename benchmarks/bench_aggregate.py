"""``clair aggregate`` end to end on a synthetic 7B-shaped PEFT federation on disk.

Workload (issue 12): 32 clients, each a PEFT LoRA adapter directory of a 7B decoder:
32 layers × {q, k, v, o}_proj at 4096 × 4096 (``--gqa``: k/v at 1024 × 4096),
r = 16, lora_alpha = 32, bfloat16, 20 % contaminated. Benign clients share each
module's column space (s·B_k = U_m W_k plus ``--noise`` of its norm in its own
directions), A_k arbitrary; contaminated clients send random B_k of the same norm.

The federation is written with safetensors (about 1 GiB), then ``clair aggregate``
runs in a fresh process (read, CLAIR, write; import and compilation included);
its wall time and peak RSS (``resource.getrusage`` of the child) are reported
with the report's read / solve / write split. The federation is deleted afterwards.

Usage::

    python benchmarks/bench_aggregate.py [--quick] [--gqa] [--json PATH] [--keep]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_info, markdown_table, write_json  # noqa: E402


def write_federation(root, *, clients, layers, d, kv, rank, alpha, contaminated, noise, seed=0):
    """Write ``clients`` PEFT adapter directories under ``root``; returns (dirs, benign mask, bytes)."""
    rng = np.random.default_rng(seed)
    kinds = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d)}
    n_bad = int(round(contaminated * clients))
    scale = alpha / rank
    config = dict(peft_type="LORA", r=rank, lora_alpha=alpha, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=list(kinds), base_model_name_or_path="synthetic/7b", task_type="CAUSAL_LM",
                  fan_in_fan_out=False, use_dora=False, bias="none", lora_dropout=0.0)
    shared = max(rank // 2, 1)
    bases = {}
    dirs, total = [], 0
    for k in range(clients):
        tensors = {}
        for layer in range(layers):
            for kind, (p, q) in kinds.items():
                name = f"base_model.model.model.layers.{layer}.self_attn.{kind}"
                if (layer, kind) not in bases:
                    bases[(layer, kind)] = np.linalg.qr(rng.standard_normal((p, shared), dtype=np.float32))[0]
                a = rng.standard_normal((rank, q), dtype=np.float32) / np.float32(np.sqrt(q))
                if k < n_bad:
                    b = rng.standard_normal((p, rank), dtype=np.float32) * np.float32(np.sqrt(shared / p))
                else:
                    b = bases[(layer, kind)] @ rng.standard_normal((shared, rank), dtype=np.float32)
                    if noise:
                        b += noise * np.linalg.norm(b) / np.sqrt(b.size) * rng.standard_normal(b.shape, dtype=np.float32)
                tensors[name + ".lora_A.weight"] = a.astype(ml_dtypes.bfloat16)
                tensors[name + ".lora_B.weight"] = (b / scale).astype(ml_dtypes.bfloat16)
        path = os.path.join(root, f"client{k:02d}")
        os.makedirs(path)
        with open(os.path.join(path, "adapter_config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
        total += os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
        dirs.append(path)
    return dirs, np.arange(clients) >= n_bad, total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--gqa", action="store_true", help="k/v_proj at 1024 x 4096 (grouped-query attention)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--chunk-mib", type=float, default=256)
    parser.add_argument("--dir", help="where to write the federation (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the federation and outputs")
    parser.add_argument("--devices", type=int, default=1, help="clair aggregate --devices N (accelerators)")
    parser.add_argument("--json", metavar="PATH", default="bench_results/bench_aggregate.json")
    args = parser.parse_args(argv)
    d, kv = (4096, 1024 if args.gqa else 4096)
    if args.quick:
        args.clients, args.layers, args.rank, d, kv = 6, 2, 4, 64, (16 if args.gqa else 64)

    root = tempfile.mkdtemp(prefix="bench_aggregate_", dir=args.dir)
    try:
        t = time.perf_counter()
        dirs, benign, size = write_federation(os.path.join(root, "in"), clients=args.clients, layers=args.layers, d=d,
                                              kv=kv, rank=args.rank, alpha=2 * args.rank, contaminated=0.2,
                                              noise=args.noise)
        t_make = time.perf_counter() - t
        print(f"federation: {args.clients} clients x {args.layers * 4} modules, {size / 2**30:.2f} GiB on disk "
              f"(written in {t_make:.1f} s)", file=sys.stderr)
        report_path = os.path.join(root, "report.json")
        # A cold run: it compiles (no programs kept from an earlier run).
        cmd = [sys.executable, "-m", "clair_jax", "--no-compile-cache", "aggregate", *dirs, "--out", os.path.join(root, "out"),
               "--json", report_path, "--chunk-mib", str(args.chunk_mib), "--devices", str(args.devices)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True)
        wall = time.perf_counter() - t
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = usage.ru_maxrss / 2**20  # kB → GiB
        cpu = usage.ru_utime + usage.ru_stime  # the child's CPU time: less sensitive to a shared machine
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            raise SystemExit(f"clair aggregate failed with exit status {proc.returncode}")
        report = json.loads(Path(report_path).read_text())
        flagged = np.array([not c["benign"] for c in report["clients"]])
        out_size = sum(os.path.getsize(os.path.join(c["output"], "adapter_model.safetensors"))
                       for c in report["clients"] if c["output"])
        row = dict(
            clients=args.clients, modules=args.layers * 4, devices=args.devices, shapes="q/o %dx%d, k/v %dx%d" % (d, d, kv, d), r=args.rank,
            dtype="bf16", input_gib=size / 2**30, output_gib=out_size / 2**30, wall_s=wall, cpu_s=cpu,
            read_s=report["seconds"]["read"], solve_s=report["seconds"]["solve"], write_s=report["seconds"]["write"],
            module_groups=report["module_groups"], peak_rss_gib=peak,
            verdicts_correct=bool(np.array_equal(~flagged, benign)), load_1min_before=load_before,
            load_1min_after=os.getloadavg()[0],
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    cols = [("clients", "K", "d"), ("modules", "modules", "d"), ("shapes", "shapes", "s"), ("r", "r", "d"), ("devices", "devices", "d"),
            ("input_gib", "input (GiB)", ".2f"), ("wall_s", "wall (s)", ".1f"), ("cpu_s", "CPU (s)", ".1f"), ("read_s", "read (s)", ".1f"),
            ("solve_s", "CLAIR (s)", ".1f"), ("write_s", "write (s)", ".1f"), ("module_groups", "module groups", "d"),
            ("peak_rss_gib", "peak RSS (GiB)", ".2f"), ("verdicts_correct", "verdicts correct", ""),
            ("load_1min_before", "load (1 min)", ".1f")]
    print(markdown_table([row], cols))
    print("target: wall < 90 s and peak RSS < 4 GiB on the 2-core machine")
    write_json(args.json, dict(benchmark="bench_aggregate", rows=[row], quick=args.quick,
                               command=" ".join(sys.argv), machine=machine_info()))
    return [row]


if __name__ == "__main__":
    main()
