"""Compiled programs kept on disk: a second process loads CLAIR's programs instead of compiling them."""

import os
import subprocess
import sys

from clair_jax import _compile

CALL = """
import json, sys
import jax
from jax._src import monitoring
import clair_jax as cj
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
where = cj.keep_compiled_programs()
if where is None or "--no-call" in sys.argv:
    print(json.dumps(dict(where=where, configured=jax.config.jax_compilation_cache_dir)))
    sys.exit(0)
fed = cj.data.make_federation(0, num_clients=12, p=10, q=4, rank=2)
result = cj.clair(fed.updates)
print(json.dumps(dict(where=where, hits=len(hits), benign=[bool(b) for b in result.client_benign])))
"""


def _run(env, *args):
    out = subprocess.run([sys.executable, "-c", CALL, *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")
           and not k.startswith("JAX_PERSISTENT_CACHE")}
    env.update(extra)
    return env


def test_a_second_process_loads_the_programs_the_first_compiled(tmp_path):
    cache = tmp_path / "xla"
    first = _run(_env(CLAIR_JAX_CACHE=str(cache)))
    assert first["where"] == str(cache) and first["hits"] == 0
    assert len(list(cache.iterdir())) >= 5   # the stage programs, every one kept
    second = _run(_env(CLAIR_JAX_CACHE=str(cache)))
    assert second["hits"] >= 5 and second["benign"] == first["benign"]


def test_off_keeps_nothing_and_a_callers_directory_is_kept(tmp_path, monkeypatch):
    off = _run(_env(CLAIR_JAX_CACHE="off"))
    assert off["where"] is None and not off["configured"]
    assert _run(_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"), CLAIR_JAX_CACHE=str(tmp_path / "x")),
                "--no-call")["where"] == str(tmp_path / "mine")
    monkeypatch.delenv("CLAIR_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _compile.default_cache_dir() == str(tmp_path / "clair_jax" / "xla")
