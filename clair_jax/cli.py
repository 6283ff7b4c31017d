"""Command line: ``clair <command>`` (also ``python -m clair_jax <command>``).

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so
``clair --help`` stays fast.
"""

from __future__ import annotations

import os

# XLA's CPU SVD calls into OpenBLAS; its thread pool fights XLA's own threads and
# makes small SVDs up to 100× slower on a busy machine. One thread is the fast
# setting for the problem sizes here. Must be set before numpy/jax load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402

# command → (module, one-line help)
COMMANDS = {
    "demo": ("clair_jax.demo", "synthetic federation: CLAIR against local, FedAvg and robust baselines"),
    "regression": ("clair_jax.experiments.regression", "multi-response linear regression clients, end to end"),
    "mlp": ("clair_jax.experiments.mlp", "MLP clients fine-tuned with optax, end to end"),
    "digits": ("clair_jax.experiments.digits", "real data: scikit-learn's 8x8 digits, ridge-classifier clients"),
    "copy-task": ("clair_jax.experiments.copy_task", "Transformer LoRA text-copying experiment"),
    "aggregate": ("clair_jax.adapters.cli", "PEFT LoRA adapter directories in, refined adapters out"),
    "shakespeare": ("clair_jax.experiments.shakespeare",
                    "real LLM: federated LoRA of SmolLM2-135M on Shakespeare's roles, judged by clair aggregate"),
}


DESCRIPTION = ("CLAIR: robust aggregation of federated client updates (low-rank plus block-sparse). "
               "Also runs as 'python -m clair_jax COMMAND'; 'clair COMMAND --help' lists a command's options.")


def build_parser(argv=None):
    from clair_jax import __version__  # the package is imported already (this module lives in it)

    parser = argparse.ArgumentParser(prog="clair", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"clair_jax {__version__}")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile every program again instead of loading those a previous run kept "
                             "(default: kept in $CLAIR_JAX_CACHE or ~/.cache/clair_jax/xla; CLAIR_JAX_CACHE=off "
                             "also turns it off)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # only import the module whose options we need
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not args.no_compile_cache:   # a later run loads the programs this one compiles
        from clair_jax import keep_compiled_programs
        keep_compiled_programs()
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
