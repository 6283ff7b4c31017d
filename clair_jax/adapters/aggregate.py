"""PEFT adapter directories in, refined adapters out: :func:`aggregate`.

Steps (DESIGN §6):

1. read and check every client's config and safetensors header
   (:func:`~clair_jax.adapters.load_federation`); refuse, writing nothing, when a
   client cannot be used;
2. per module group (a chunk of one shape group's modules, read lazily with the
   PEFT scaling folded into B and ranks zero-padded), run CLAIR on the factors:
   ``cj.clair_groups`` with one client verdict per call;
3. pool the calls' verdicts into one client verdict (``cj.pool_verdicts``);
   a chunk whose verdict let in a client the pooled verdict leaves out of the
   collaborative set is refined again with the pooled verdict (``cj.screen`` +
   ``cj.conclude``), so no Û is estimated with it in it;
4. write, for every client whose status is not ``"contaminated"`` (``"benign"``,
   or ``"noisy"``: honest but noisier, refined by projection onto Û, which it did
   not help estimate), ``OUT/<name>/`` with the client's own
   ``adapter_config.json`` and an ``adapter_model.safetensors`` with the same keys,
   shapes and dtypes: ``lora_A`` and every full weight byte for byte, ``lora_B``
   refined (B̃ = ÛÛᵀB, the scaling divided back out, the padded rank cut off);
5. optionally a global adapter: per module the rank-R truncated SVD of the mean
   refined benign ΔW, computed from the factors.

When the whole federation fits in one module group (the default budget holds
256 MiB of float32 factors) steps 2–3 are one ``cj.clair_groups`` call over all
shape groups.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import ml_dtypes  # noqa: F401  (numpy bfloat16 for safetensors)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from clair_jax.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_federation

__all__ = ["aggregate", "plan_chunks", "global_factors", "GLOBAL_NAME", "CHUNK_BYTES", "CLIENT_REPORT"]

#: Default budget of one module group: float32 factors of all K clients, in bytes.
CHUNK_BYTES = 256 * 2**20
#: Directory (under the output directory) of the optional global adapter.
GLOBAL_NAME = "global_adapter"
FILE_MODE, DIR_MODE = 0o644, 0o755


@dataclass(frozen=True)
class Chunk:
    """A module group: some modules of one shape group, solved in one CLAIR call."""

    group: int
    modules: tuple


def plan_chunks(federation, chunk_bytes=CHUNK_BYTES):
    """Split each shape group into module groups of at most ``chunk_bytes`` of factors.

    Returns a list of lists of :class:`Chunk`: each inner list is solved in one call
    (one slice of every shape group, so a call sees the same layers in all groups).
    Every shape group is split into the same number of near-equal parts, preferring a
    number that divides every group evenly (equal shapes compile once).
    """
    k = len(federation.clients)
    sizes = [len(g.modules) for g in federation.groups]
    total = sum(k * g.rank * (g.shape[0] + g.shape[1]) * 4 * len(g.modules) for g in federation.groups)
    parts = max(1, math.ceil(total / chunk_bytes))
    parts = min(parts, max(sizes))
    even = math.gcd(*sizes)
    for n in range(parts, min(2 * parts, max(sizes)) + 1):
        if even % n == 0:
            parts = n
            break
    calls = []
    for c in range(parts):
        call = []
        for gi, g in enumerate(federation.groups):
            m = len(g.modules)
            lo, hi = (c * m) // parts, ((c + 1) * m) // parts
            if hi > lo:
                call.append(Chunk(gi, g.modules[lo:hi]))
        calls.append(call)
    return calls


class _Progress:
    """A progress bar over module groups on stderr (one line per step when not a tty)."""

    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def step(self, what):
        if not self.enabled:
            return
        self.done += 1
        width = 24
        fill = int(width * self.done / self.total)
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} module groups "
                f"({time.perf_counter() - self.start:.0f} s) {what}")
        if self.tty:
            print("\r" + line[:120].ljust(120), end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _clair_call(factors, clients=None, **options):
    """One CLAIR call over several shape groups' factors (one verdict), restricted to
    the client indices ``clients`` (None: all)."""
    import jax.numpy as jnp

    import clair_jax as cj

    if clients is not None:
        factors = [cj.LoRAFactors(f.B[:, clients], f.A[:, clients]) for f in factors]
    factors = [cj.LoRAFactors(jnp.asarray(f.B), jnp.asarray(f.A)) for f in factors]
    return cj.clair_groups(factors, **options)


def _refine_with(factors, verdict, **options):
    """One call's groups refined with the pooled ``verdict`` (every client present;
    the call's own noise test decides which clients outside the set are noisy)."""
    import jax.numpy as jnp

    import clair_jax as cj

    factors = [cj.LoRAFactors(jnp.asarray(f.B), jnp.asarray(f.A)) for f in factors]
    later = ("coordinate_noise", "update_noise", "client_sizes", "centre_rank")
    screen_options = {key: value for key, value in options.items() if key not in later}
    return cj.conclude(cj.screen(factors, **screen_options), verdict._replace(status=None),
                       **{key: options[key] for key in later[1:] if key in options})


def _pool(results, options):
    """One client verdict over every call's results (the pooling rule of ``cj.clair_groups``)."""
    import clair_jax as cj

    pooling = {k: options[k] for k in ("z_crit", "min_gap", "threshold") if k in options}
    return cj.pool_verdicts(results, **pooling)


def _refined_outputs(federation, chunk, result, clients, store):
    """Cut the refined B of ``clients`` back to each one's rank, divide its scaling
    out, cast to its dtype and keep it in ``store[(client, key)]``."""
    refined = np.asarray(result.refined.B)
    padded = federation.groups[chunk.group].rank
    if refined.shape[-1] > padded:
        # Centre pooling: B̃ = [λB, (1−λ)B_C], Ã = [A; A_C], a new rank (scaling 1, folded into B̃).
        refined_a = np.asarray(result.refined.A)
        for col, j in enumerate(clients):
            client = federation.clients[j]
            for i, name in enumerate(chunk.modules):
                entry = client.modules[name]
                dtype = _np_dtype(entry.dtype)
                store[(j, entry.key_b)] = refined[i, col].astype(dtype)
                store[(j, entry.key_a)] = refined_a[i, col].astype(dtype)
        return
    for col, j in enumerate(clients):
        client = federation.clients[j]
        for i, name in enumerate(chunk.modules):
            entry = client.modules[name]
            b = refined[i, col, :, :entry.rank] / np.float32(entry.scaling)
            store[(j, entry.key_b)] = b.astype(_np_dtype(entry.dtype))


def _np_dtype(code):
    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}[code]


def _group_report(federation, calls, results_by_call):
    groups = []
    for gi, g in enumerate(federation.groups):
        rank, lam, noise, converged, spectrum, edge = [], [], [], [], [], []
        for call, results in zip(calls, results_by_call):
            for chunk, res in zip(call, results):
                if chunk.group != gi:
                    continue
                rank += np.asarray(res.rank).reshape(-1).tolist()
                lam += np.asarray(res.lam, dtype=float).reshape(-1).tolist()
                sigma = np.asarray(res.noise_level, dtype=float).reshape(-1)
                noise += sigma.tolist()
                converged += np.asarray(res.converged).reshape(-1).astype(bool).tolist()
                spectrum += np.asarray(res.spectrum, dtype=float).reshape(len(sigma), -1).tolist()
                # The noise edge σ̂(√p + √n), n the benign stack's noise columns (LoRA rank each).
                members = np.asarray(res.benign).reshape(len(sigma), -1).sum(axis=1)
                edge += (sigma * (np.sqrt(g.shape[0]) + np.sqrt(np.maximum(members * g.rank, 1)))).tolist()
        groups.append(dict(shape=list(g.shape), modules=list(g.modules), lora_rank=g.rank, rank=rank, lam=lam,
                           noise_level=noise, converged=converged, spectrum=spectrum, noise_edge=edge))
    return groups


def _check_outputs(federation, out_dir, keep_flagged, global_rank):
    """Refuse (before any work) to overwrite existing outputs."""
    out_dir = os.path.abspath(out_dir)
    for c in federation.clients:
        if os.path.abspath(c.path) in (out_dir, os.path.abspath(keep_flagged or out_dir)):
            raise AdapterError(c.path, "is the output directory itself")
        for base in [out_dir] + ([keep_flagged] if keep_flagged else []):
            target = os.path.join(base, c.name)
            if os.path.exists(target):
                raise AdapterError(c.path, f"output {target} already exists (remove it or choose another --out)")
    if global_rank is not None:
        if GLOBAL_NAME in federation.names:
            raise AdapterError(GLOBAL_NAME, f"a client directory is named {GLOBAL_NAME!r}, the global adapter's name")
        if os.path.exists(os.path.join(out_dir, GLOBAL_NAME)):
            raise AdapterError(os.path.join(out_dir, GLOBAL_NAME), "already exists (remove it or choose another --out)")


def _write_adapter(target, config_source, tensors, metadata, *, config=None):
    """Write one adapter directory atomically (a temporary sibling renamed into place)."""
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cfg = os.path.join(tmp, CONFIG_NAME)
    if config is None:
        shutil.copyfile(config_source, cfg)   # the client's own config, byte for byte
    else:
        with open(cfg, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
    weights = os.path.join(tmp, WEIGHTS_NAME)
    save_file(tensors, weights, metadata=metadata)
    for path in (cfg, weights):
        os.chmod(path, FILE_MODE)
    os.chmod(tmp, DIR_MODE)
    os.replace(tmp, target)


def _copy_adapter(client, target):
    os.makedirs(target)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copyfile(os.path.join(client.path, name), os.path.join(target, name))
        os.chmod(os.path.join(target, name), FILE_MODE)
    os.chmod(target, DIR_MODE)


def global_factors(b_list, a_list, rank):
    """Rank-``rank`` truncated SVD of mean_k B_k A_k from the factors alone.

    With P = [B_1 … B_n] (p × nr) and Q = [A_1; …; A_n] (nr × q), mean ΔW = PQ/n;
    P = Q₁R₁ and Qᵀ = Q₂R₂ (thin QR), so PQ/n = Q₁ (R₁R₂ᵀ/n) Q₂ᵀ and the SVD of the
    nr × nr core gives the truncation. No p × q matrix is formed.

    Returns:
        (B_g (p, rank), A_g (rank, q)) with B_g A_g the truncation; √σ on each side.
        Columns beyond the mean's rank are zero.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> bs = [rng.standard_normal((6, 2)) for _ in range(3)]
        >>> as_ = [rng.standard_normal((2, 5)) for _ in range(3)]
        >>> bg, ag = global_factors(bs, as_, 5)
        >>> mean = sum(b @ a for b, a in zip(bs, as_)) / 3
        >>> bool(np.allclose(bg @ ag, mean))
        True
    """
    p_mat = np.concatenate([np.asarray(b, np.float64) for b in b_list], axis=1)
    q_mat = np.concatenate([np.asarray(a, np.float64) for a in a_list], axis=0)
    q1, r1 = np.linalg.qr(p_mat)
    q2, r2 = np.linalg.qr(q_mat.T)
    u, s, vt = np.linalg.svd(r1 @ r2.T / len(b_list))
    keep = min(rank, s.shape[0])
    root = np.sqrt(s[:keep])
    b_g = np.zeros((p_mat.shape[0], rank))
    a_g = np.zeros((rank, q_mat.shape[1]))
    b_g[:, :keep] = (q1 @ u[:, :keep]) * root
    a_g[:keep] = root[:, None] * (vt[:keep] @ q2.T)
    return b_g, a_g


def _write_global(federation, benign, store, out_dir, rank):
    """The global adapter: rank-``rank`` truncation of the mean refined benign ΔW per module."""
    members = np.flatnonzero(benign)
    ref = federation.clients[int(members[0])]
    dtypes = [e.dtype for j in members for e in federation.clients[j].modules.values()]
    dtype = _np_dtype(max(set(dtypes), key=dtypes.count))
    tensors = {}
    handles = [safe_open(federation.clients[j].weights_path, framework="numpy") for j in members]
    try:
        for name, entry in ref.modules.items():
            bs, as_ = [], []
            for j, fh in zip(members, handles):
                e = federation.clients[j].modules[name]
                if (j, e.key_a) in store:   # centre pooling: a new rank, scaling folded into B
                    bs.append(store[(j, e.key_b)].astype(np.float64))
                    as_.append(store[(j, e.key_a)].astype(np.float64))
                else:
                    bs.append(store[(j, e.key_b)].astype(np.float64) * e.scaling)
                    as_.append(fh.get_tensor(e.key_a).astype(np.float64))
            b_g, a_g = global_factors(bs, as_, rank)
            tensors[entry.key_b] = b_g.astype(dtype)
            tensors[entry.key_a] = a_g.astype(dtype)
    finally:
        for fh in handles:
            fh.__exit__(None, None, None)
    config = dict(ref.config)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  modules_to_save=None, lora_bias=False)
    target = os.path.join(out_dir, GLOBAL_NAME)
    _write_adapter(target, None, tensors, ref.metadata, config=config)
    return target


def aggregate(dirs, out_dir, *, json_path=None, global_rank=None, keep_flagged=None, chunk_bytes=CHUNK_BYTES,
              progress=False, **clair_options) -> dict:
    """Refine K PEFT LoRA adapters with CLAIR and write a refined adapter for every client not contaminated.

    Args:
        dirs: K ≥ 3 adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).
        out_dir: where ``<basename of dir>/`` is written for each client whose status is
            ``"benign"`` or ``"noisy"`` (honest but noisier: its update projected onto Û).
        json_path: also write the report (the returned dict) there as JSON.
        global_rank: also write ``out_dir/global_adapter/``: per module the rank-R
            truncated SVD of the mean refined ΔW of the collaborative set (status
            ``"benign"``; noisy clients are left out of it as of Û) (s = 1: r = lora_alpha = R).
        keep_flagged: copy each contaminated client's adapter there unchanged.
        chunk_bytes: budget of one module group (float32 factors of all clients);
            peak memory is about one module group plus the refined lora_B's.
        progress: a progress bar over module groups on stderr.
        **clair_options: passed to ``cj.clair_groups`` (rank, lam, noise, z_crit, pooling, …).
            With ``pooling="centre"`` every client directory may hold :data:`CLIENT_REPORT`
            (``{"num_examples": n}`` or ``{"update_noise": {module: ν}}``, ν the noise
            energy of its ΔW = s·BA; all clients or none), and each refined adapter has rank r + r_c
            (r = lora_alpha = that rank, the scaling folded into lora_B).

    Returns:
        The report: ``clients`` (input order: name, path, status — ``"benign"``,
        ``"noisy"`` or ``"contaminated"``, the verdict to act on (an output is written
        unless contaminated) —, benign (in the collaborative set Û is fitted on),
        score, z, nonfinite, output, flagged_copy, lora_rank, dtypes, passthrough,
        local_modules, module_z: the refit statistic per module; with centre pooling
        output_rank and centre_weight: λ per module, the weight its own update kept), ``groups`` (per
        module group: shape, modules, lora_rank and per module r̂, λ, noise level,
        convergence), ``global_adapter``, timings.

    Raises:
        AdapterError: a client that cannot be used (nothing is written then).
    """
    from clair_jax.pool import CONTAMINATED, STATUSES   # jax only once there is work

    t0 = time.perf_counter()
    federation = load_federation(dirs)
    _check_outputs(federation, out_dir, keep_flagged, global_rank)
    if global_rank is not None and (isinstance(global_rank, bool) or int(global_rank) != global_rank or global_rank < 1):
        raise ValueError(f"global_rank must be a positive integer, got {global_rank!r}")
    k = len(federation.clients)
    reports = _client_reports(federation) if clair_options.get("pooling") == "centre" else None
    calls = plan_chunks(federation, chunk_bytes)
    bar = _Progress(sum(len(c) for c in calls), progress)

    # Steps 2-3: one CLAIR call per module group, then one pooled verdict.
    t_read = t_solve = 0.0
    results_by_call, store = [], {}
    everyone = list(range(k))
    for call in calls:
        t = time.perf_counter()
        factors = [federation.factors(c.group, c.modules) for c in call]
        t_read += time.perf_counter() - t
        t = time.perf_counter()
        results = _clair_call(factors, **_call_options(clair_options, reports, call))
        t_solve += time.perf_counter() - t
        for chunk, res in zip(call, results):
            _refined_outputs(federation, chunk, res, everyone, store)
            bar.step(f"{len(chunk.modules)} × {federation.groups[chunk.group].shape}")
        results_by_call.append(tuple(_light(r) for r in results))
        del factors, results
    verdict = _pool([r for results in results_by_call for r in results], clair_options)
    benign = np.asarray(verdict.benign, bool)

    # A module group whose own verdict let in a client the pooled verdict leaves out
    # of the set is refined again with the pooled verdict (only possible with several calls).
    resolved = []
    for ci, (call, results) in enumerate(zip(calls, results_by_call)):
        own = np.asarray(results[0].client_benign, bool)
        if not np.any(own & ~benign) or benign.sum() < 2:
            continue
        resolved.append(ci)
        factors = [federation.factors(c.group, c.modules) for c in call]
        again = _refine_with(factors, verdict, **_call_options(clair_options, reports, call))
        for chunk, res in zip(call, again):
            _refined_outputs(federation, chunk, res, everyone, store)
        results_by_call[ci] = tuple(_light(r) for r in again)
    if resolved:   # the status reads every call's final noise test
        verdict = _pool([r for results in results_by_call for r in results], clair_options)
    status = np.asarray(verdict.status)
    served = status != CONTAMINATED
    t_solve_total = time.perf_counter() - t0

    # Where each client kept its local lora_B: outside the set and not noise-like in
    # that module, or no subspace; and each client's refit statistic per module.
    local = np.zeros(k, int)
    module_z = [{} for _ in range(k)]
    centre_weight = [{} for _ in range(k)]
    for call, results in zip(calls, results_by_call):
        for chunk, res in zip(call, results):
            own = np.asarray(res.client_benign, bool)
            no_sub = np.asarray(res.rank).reshape(-1) == 0
            projected = np.asarray(res.noisy, bool).reshape(len(chunk.modules), -1)
            z = np.asarray(res.residual_z, float).reshape(len(chunk.modules), -1)
            for j in everyone:
                refined_here = (own[j] | projected[:, j]) & ~no_sub
                local[j] += len(chunk.modules) - int(refined_here.sum())
                module_z[j].update({name: float(z[i, j]) for i, name in enumerate(chunk.modules)})
                if res.centre_weight is not None:
                    lam = np.asarray(res.centre_weight, float).reshape(len(chunk.modules), -1)
                    centre_weight[j].update({name: float(lam[i, j]) for i, name in enumerate(chunk.modules)})

    # Step 4: write.
    t = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    clients, centre_ranks = [], {}
    for j, client in enumerate(federation.clients):
        output = flagged_copy = None
        if served[j]:
            pooled = any((j, e.key_a) in store for e in client.modules.values())
            tensors = {}
            with safe_open(client.weights_path, framework="numpy") as fh:
                for key in client.keys:
                    tensors[key] = store.pop((j, key)) if (j, key) in store else fh.get_tensor(key)
            output = os.path.join(out_dir, client.name)
            config = None
            if pooled:
                tensors, config = _centre_adapter(client, tensors)
                centre_ranks[j] = config["r"]
            _write_adapter(output, client.config_path, tensors, client.metadata, config=config)
            del tensors
        elif keep_flagged:
            flagged_copy = os.path.join(keep_flagged, client.name)
            _copy_adapter(client, flagged_copy)
        clients.append(dict(
            name=client.name, path=client.path, status=STATUSES[int(status[j])], benign=bool(benign[j]),
            score=float(verdict.scores[j]),
            z=float(verdict.z[j]), nonfinite=bool(verdict.nonfinite[j]), output=output, flagged_copy=flagged_copy,
            lora_rank=max(e.rank for e in client.modules.values()), dtypes=list(client.dtypes),
            passthrough=list(client.passthrough), local_modules=int(local[j]) if served[j] else None,
            module_z=module_z[j], output_rank=centre_ranks.get(j),
            centre_weight=centre_weight[j] or None,
        ))
    global_path = None
    if global_rank is not None and benign.any():
        store_g = {}
        for j in np.flatnonzero(benign):
            c = federation.clients[j]
            with safe_open(os.path.join(out_dir, c.name, WEIGHTS_NAME), framework="numpy") as fh:
                for e in c.modules.values():
                    store_g[(j, e.key_b)] = fh.get_tensor(e.key_b)
                    if centre_ranks:
                        store_g[(j, e.key_a)] = fh.get_tensor(e.key_a)
        global_path = _write_global(federation, benign, store_g, out_dir, int(global_rank))
    t_write = time.perf_counter() - t

    report = dict(
        clients=clients,
        groups=_group_report(federation, calls, results_by_call),
        module_groups=sum(len(c) for c in calls),
        calls=len(calls),
        resolved_calls=resolved,
        passthrough_note=("full weights (modules_to_save, lora_bias, biases) are copied through unchanged per client, "
                          "not aggregated; the global adapter holds LoRA factors only"),
        global_adapter=None if global_path is None else dict(path=global_path, rank=int(global_rank)),
        out_dir=os.path.abspath(out_dir),
        options={key: value for key, value in clair_options.items()},
        seconds=dict(read=t_read, solve=t_solve, read_and_solve=t_solve_total, write=t_write,
                     total=time.perf_counter() - t0),
    )
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
        os.chmod(json_path, FILE_MODE)
    return report


#: A client directory's optional report for ``pooling="centre"``: its training examples and measured noise.
CLIENT_REPORT = "clair_client.json"


def _client_reports(federation):
    """Each client's ``clair_client.json`` (None when no client has one): ``num_examples`` (n_k) and/or ``update_noise``
    ({module: ν}, the noise energy of its ΔW = s·BA, e.g. from two half-data trainings).
    Every client must report one kind the same way (noise for every module, or a size)."""
    if not any(os.path.exists(os.path.join(c.path, CLIENT_REPORT)) for c in federation.clients):
        return None   # no client reports: every served client is pooled halfway (centre.OWN_FLOOR)
    reports = []
    for c in federation.clients:
        path = os.path.join(c.path, CLIENT_REPORT)
        if not os.path.exists(path):
            raise AdapterError(c.path, f"{CLIENT_REPORT} is missing: with pooling='centre' either every client "
                                       "reports num_examples or update_noise, or none does")
        try:
            with open(path, encoding="utf-8") as fh:
                rep = json.load(fh)
        except (OSError, ValueError) as exc:
            raise AdapterError(c.path, f"{CLIENT_REPORT} is not readable JSON: {exc}") from exc
        if not isinstance(rep, dict):
            raise AdapterError(c.path, f"{CLIENT_REPORT} must hold a JSON object")
        noise = rep.get("update_noise")
        if noise is not None:
            missing = [m for m in c.modules if m not in noise]
            bad = [m for m in c.modules if m in noise and not (isinstance(noise[m], (int, float))
                                                                and math.isfinite(noise[m]) and noise[m] >= 0)]
            if missing or bad:
                raise AdapterError(c.path, f"{CLIENT_REPORT}: update_noise must give a finite value >= 0 for "
                                           f"every module; {'missing ' + missing[0] if missing else 'bad ' + bad[0]}")
        size = rep.get("num_examples")
        if size is not None and not (isinstance(size, (int, float)) and math.isfinite(size) and size > 0):
            raise AdapterError(c.path, f"{CLIENT_REPORT}: num_examples must be > 0, got {size!r}")
        if noise is None and size is None:
            raise AdapterError(c.path, f"{CLIENT_REPORT} gives neither num_examples nor update_noise")
        reports.append(dict(noise=noise, size=size))
    if all(r["noise"] is not None for r in reports):
        return dict(noise=[r["noise"] for r in reports])
    if all(r["size"] is not None for r in reports):
        return dict(sizes=np.array([r["size"] for r in reports], float))
    raise AdapterError(federation.clients[0].path, f"{CLIENT_REPORT}: every client must report update_noise, or "
                                                   "every client num_examples (the federation mixes the two)")


def _call_options(options, reports, call):
    """The options of one CLAIR call: with centre pooling, the clients' noise for its modules."""
    if reports is None:
        return options
    if "sizes" in reports:
        return dict(options, client_sizes=reports["sizes"])
    return dict(options, update_noise=[np.array([[n[m] for n in reports["noise"]] for m in chunk.modules])
                                      for chunk in call])


def _centre_adapter(client, tensors):
    """A centre-pooled client's tensors padded to one rank R, and its config (r = lora_alpha = R)."""
    rank = max(tensors[e.key_a].shape[0] for e in client.modules.values())
    out = dict(tensors)
    for e in client.modules.values():
        b, a = tensors[e.key_b], tensors[e.key_a]
        pad = rank - a.shape[0]
        if pad:
            out[e.key_b] = np.concatenate([b, np.zeros((b.shape[0], pad), b.dtype)], axis=1)
            out[e.key_a] = np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)], axis=0)
    config = dict(client.config)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return out, config


def _light(result):
    """A ClairResult without its refined factors (the one large field)."""
    return result._replace(refined=None)
