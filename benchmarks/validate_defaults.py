"""Check the untuned defaults of ``cj.clair`` on federations they were not tuned on.

Usage: ``OPENBLAS_NUM_THREADS=1 python benchmarks/validate_defaults.py [SEEDS] [-v] [--x64]``
Each configuration (6 contamination kinds × 0/20/45% × relative noise 0/0.15/0.33,
plus heterogeneous clients, scales 1e-6/1e6 and other shapes) is drawn with seeds
900, 901, …; a run passes when the collaborative set is recovered exactly and the
subspace error is below 0.5. Prints failures (all rows with -v) and a count.
"""
import sys, time, itertools
import jax, jax.numpy as jnp, numpy as np
if "--x64" in sys.argv: jax.config.update("jax_enable_x64", True)
import clair_jax as cj
rows=[]; fails=0; n=0
seeds = range(int(sys.argv[1]) if len(sys.argv)>1 and sys.argv[1].isdigit() else 2)
cfgs = []
for kind in ["full_rank","huge","rank_one","off_subspace","mixed","sign_flip"]:
  for cont in [0.0,0.2,0.45]:
    for noise in [0.0,0.15,0.33]:
      cfgs.append(dict(kind=kind,contamination=cont,noise=noise))
extra = [dict(kind="full_rank",contamination=0.3,noise=0.1,heterogeneity=0.3,client_spread=0.8),
         dict(kind="full_rank",contamination=0.3,noise=0.1,scale=1e-6),dict(kind="full_rank",contamination=0.3,noise=0.1,scale=1e6),
         dict(kind="mixed",contamination=0.3,noise=0.1,p=32,q=8,num_clients=20,rank=3),
         dict(kind="mixed",contamination=0.3,noise=0.1,p=100,q=50,num_clients=16,rank=5),
         dict(kind="mixed",contamination=0.3,noise=0.1,p=64,q=1,num_clients=200,rank=3)]
t0=time.time()
for cfg in cfgs+extra:
  for s in seeds:
    fed = cj.data.make_federation(900+s, **cfg)
    res = cj.clair(fed.updates)
    det = cj.metrics.detection_rates(res.benign, fed.benign)
    err = float(cj.metrics.subspace_error(res.subspace, fed.subspace))
    ok = bool((res.benign==fed.benign).all()) and err < 0.5
    n+=1; fails += not ok
    if not ok or "-v" in sys.argv:
      print(f"{'FAIL' if not ok else 'ok  '} {cfg} seed={s} tpr={float(det['tpr']):.2f} fpr={float(det['fpr']):.2f} sub={err:.3f} rank={int(res.rank)} lam={float(res.lam):.2f} conv={bool(res.converged)} it={int(res.decomposition.iterations)}")
print(f"{n-fails}/{n} exact detection; {time.time()-t0:.0f}s")
