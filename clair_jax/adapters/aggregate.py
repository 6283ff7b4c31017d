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
import sys
import time
from dataclasses import dataclass

import numpy as np
from safetensors import safe_open

from clair_jax.adapters.peft_format import WEIGHTS_NAME, load_federation
from clair_jax.adapters.reports import CLIENT_REPORT, call_options, client_reports
from clair_jax.adapters.writing import (
    FILE_MODE, GLOBAL_NAME, centre_adapter, check_outputs, copy_adapter, global_factors, np_dtype, write_adapter,
    write_global,
)

__all__ = ["aggregate", "plan_chunks", "global_factors", "GLOBAL_NAME", "CHUNK_BYTES", "CLIENT_REPORT"]

#: Default budget of one module group: float32 factors of all K clients, in bytes.
CHUNK_BYTES = 256 * 2**20


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
                dtype = np_dtype(entry.dtype)
                store[(j, entry.key_b)] = refined[i, col].astype(dtype)
                store[(j, entry.key_a)] = refined_a[i, col].astype(dtype)
        return
    for col, j in enumerate(clients):
        client = federation.clients[j]
        for i, name in enumerate(chunk.modules):
            entry = client.modules[name]
            b = refined[i, col, :, :entry.rank] / np.float32(entry.scaling)
            store[(j, entry.key_b)] = b.astype(np_dtype(entry.dtype))


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
    check_outputs(federation, out_dir, keep_flagged, global_rank)
    if global_rank is not None and (isinstance(global_rank, bool) or int(global_rank) != global_rank or global_rank < 1):
        raise ValueError(f"global_rank must be a positive integer, got {global_rank!r}")
    k = len(federation.clients)
    reports = client_reports(federation) if clair_options.get("pooling") == "centre" else None
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
        results = _clair_call(factors, **call_options(clair_options, reports, call))
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
        again = _refine_with(factors, verdict, **call_options(clair_options, reports, call))
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
                tensors, config = centre_adapter(client, tensors)
                centre_ranks[j] = config["r"]
            write_adapter(output, client.config_path, tensors, client.metadata, config=config)
            del tensors
        elif keep_flagged:
            flagged_copy = os.path.join(keep_flagged, client.name)
            copy_adapter(client, flagged_copy)
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
        global_path = write_global(federation, benign, store_g, out_dir, int(global_rank))
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


def _light(result):
    """A ClairResult without its refined factors (the one large field)."""
    return result._replace(refined=None)
