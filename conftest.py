"""Doctest collection over clair_jax/: modules behind an optional extra are skipped
where their library is missing (their tests skip the same way)."""

import importlib.util

collect_ignore = []
for module, needs in [("clair_jax/flower.py", "flwr"), ("clair_jax/experiments/digits.py", "sklearn")]:
    if importlib.util.find_spec(needs) is None:
        collect_ignore.append(module)
