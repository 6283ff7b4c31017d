"""Where the GPU spends its time: linear-algebra primitives at the 7B call's shapes, then the stages on a few modules.

Prints, as it goes (so a run cut short still tells something): compile and run
times of batched SVD / eigh / QR / matmul at the shapes the solver and the
factor reduction use (batch 1 and 128), then the stages of the call (reduce,
detect, pool, refine) on ``MODS`` modules of the ``bench_llm`` workload (K 32,
d 4096, r 16, noise 5 %) with JAX's compile log, twice (cold, warm), then
``cj.clair`` on ``MODS2`` modules. The H200 run of 2026-12-04 is in
``benchmarks/results/gpu_diag_h200.log`` (it ran out of its 270 s inside the
first detection on 8 modules).

Usage::

    MODS=8 MODS2=32 OUT=DIR python benchmarks/investigations/gpu_diag.py
"""
import os, sys, time, json, logging
sys.path.insert(0, os.getcwd())
out = os.environ.get("OUT", "/tmp")
T0 = time.perf_counter()
def say(*a):
    print(f"[{time.perf_counter()-T0:6.1f}s]", *a, flush=True)
import numpy as np
import jax, jax.numpy as jnp
say("jax", jax.__version__, jax.devices())
def bench(name, fn, *xs, reps=5):
    f = jax.jit(fn)
    t = time.perf_counter(); jax.block_until_ready(f(*xs)); c = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(reps): jax.block_until_ready(f(*xs))
    say(f"{name:40s} compile+first {c*1e3:8.1f} ms  run {(time.perf_counter()-t)/reps*1e3:8.2f} ms")
rng = np.random.default_rng(0)
for bsz in (1, 128):
    a40 = jnp.asarray(rng.standard_normal((bsz, 40, 40)), jnp.float32)
    a512 = jnp.asarray(rng.standard_normal((bsz, 512, 40)), jnp.float32)
    g512 = jnp.asarray(rng.standard_normal((bsz, 512, 512)), jnp.float32)
    bench(f"svd 40x40 batch {bsz}", lambda x: jnp.linalg.svd(x, full_matrices=False), a40)
    bench(f"eigh 40x40 batch {bsz}", lambda x: jnp.linalg.eigh(x @ jnp.swapaxes(x, -1, -2)), a40)
    bench(f"qr 512x40 batch {bsz}", lambda x: jnp.linalg.qr(x), a512)
    bench(f"eigh 512x512 batch {bsz}", lambda x: jnp.linalg.eigh(x @ jnp.swapaxes(x, -1, -2)), g512, reps=2)
    bench(f"svd 512x512 batch {bsz}", lambda x: jnp.linalg.svd(x, full_matrices=False), g512, reps=2)
    bench(f"matmul 512x512 @ 512x40 batch {bsz}", lambda x, y: x @ y, g512, a512)
big = jnp.asarray(rng.standard_normal((128, 4096, 512)), jnp.float32)
bench("R-only QR 4096x512 batch 128", lambda x: jnp.linalg.qr(x, mode="r"), big, reps=2)
del big
logging.basicConfig(level=logging.WARNING)
jax.config.update("jax_log_compiles", True)
import clair_jax as cj
from benchmarks.bench_llm import make_factors
from clair_jax import detect, pool, refine, stack
from clair_jax.options import ClairOptions
mods = int(os.environ.get("MODS", "8"))
b, a, benign = make_factors(0, mods, 32, 4096, 16, noise=0.05)
say(f"factors {mods} modules made")
f = cj.LoRAFactors(jnp.asarray(b), jnp.asarray(a))
opts = ClairOptions.checked()
for rep in range(2):
    t = time.perf_counter(); pr = jax.block_until_ready(stack.problems(f, "left")); say(f"rep {rep} reduce {time.perf_counter()-t:.2f}s")
    t = time.perf_counter(); det = jax.block_until_ready(detect.until_settled(pr, opts)); say(f"rep {rep} detect {time.perf_counter()-t:.2f}s passes {det.passes} iters {np.asarray(det.decomposition.iterations).tolist()}")
    t = time.perf_counter(); v = jax.block_until_ready(pool.client_verdict(det.benign, det.scores, det.z, det.usable)); say(f"rep {rep} pool {time.perf_counter()-t:.2f}s")
    t = time.perf_counter(); r = jax.block_until_ready(refine.refine(pr, det, v.benign)); say(f"rep {rep} refine {time.perf_counter()-t:.2f}s correct {bool((np.asarray(v.benign)==benign).all())}")
jax.config.update("jax_log_compiles", False)
for svt in ("full",):
    o2 = ClairOptions.checked(svt=svt)
    for rep in range(2):
        t = time.perf_counter(); det = jax.block_until_ready(detect.until_settled(pr, o2)); say(f"svt={svt} rep {rep} detect {time.perf_counter()-t:.2f}s")
t = time.perf_counter(); res = cj.clair(cj.LoRAFactors(b, a)); jax.block_until_ready(res.refined.B); say(f"cj.clair numpy factors {mods} modules (warm-ish) {time.perf_counter()-t:.2f}s")
m2 = int(os.environ.get("MODS2", "0"))
if m2:
    b, a, benign = make_factors(0, m2, 32, 4096, 16, noise=0.05)
    say(f"factors {m2} modules made")
    t = time.perf_counter(); res = cj.clair(cj.LoRAFactors(b, a)); jax.block_until_ready(res.refined.B); say(f"cj.clair {m2} modules cold-shape {time.perf_counter()-t:.2f}s correct {bool((np.asarray(res.client_benign)==benign).all())}")
    t = time.perf_counter(); res = cj.clair(cj.LoRAFactors(b, a)); jax.block_until_ready(res.refined.B); say(f"cj.clair {m2} modules warm {time.perf_counter()-t:.2f}s")
