"""The Transformer LoRA text-copying experiment (``clair copy-task``).

End to end, on a laptop CPU:

1. **Base model.** A small decoder-only Transformer
   (:mod:`clair_jax.experiments.transformer`) is trained with optax on generic
   copying: a sequence ``x_1 … x_L SEP x_1 … x_L``; the loss is on the copy.
2. **Clients.** Each client fine-tunes rank-r LoRA adapters on the four
   attention projections of every layer (base frozen) on a small private
   dataset of its own *copying variant*. Benign client k copies through a
   token mapping σ_k that is the identity except on a shared set T of "active"
   tokens, which σ_k permutes in its own way: every benign update moves the same
   few token directions (a shared low-rank subspace) but differently per client.
   Contaminated clients (default 30%) train on corrupted targets: random tokens,
   a reversed copy, a shifted copy, or a permutation of a *different* token set.
   All clients train in one vmapped optax loop.
3. **CLAIR** runs once on every adapted module: ``LoRAFactors`` with the module
   axis (n_layers·4) leading and the client axis next, a client verdict pooled
   over modules; the refined factors are loaded back into each benign client's
   model.
4. **Evaluation** on every benign client's held-out data (token accuracy,
   whole-sequence exact match, loss) for the base model, local LoRA, FedAvg of
   ΔW, FedAvg of A and B separately, coordinate-wise median and Multi-Krum of
   ΔW, CLAIR, and the oracle (CLAIR's refinement with the true benign set);
   detection precision / recall / F1 per module and pooled.

Teacher-forced accuracy is reported; a sequence counts as an exact match when
every target token is the argmax, which is exactly greedy decoding reproducing
the target.

Example:
    >>> from clair_jax.experiments.copy_task import run_copy_task
    >>> results = run_copy_task(quick=True, progress=False)  # doctest: +SKIP
    >>> results["methods"]["clair"]["token_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clair_jax._compile import program
from clair_jax.experiments import transformer as tfm

__all__ = [
    "CopyTaskConfig",
    "QUICK",
    "DEFAULT",
    "CONTAMINATION_KINDS",
    "Federation",
    "make_federation",
    "make_sequences",
    "sequence_loss",
    "train_base",
    "train_clients",
    "client_train_step",
    "evaluate",
    "module_names",
    "to_module_factors",
    "to_client_deltas",
    "oracle_subspace",
    "detection_scores",
    "aggregate_methods",
    "METHOD_LABELS",
    "run_copy_task",
    "format_report",
    "add_arguments",
    "run",
]

# task kinds (encoded as ints so data generation vmaps over clients)
KIND_MAP, KIND_REVERSE, KIND_RANDOM, KIND_SHIFT = 0, 1, 2, 3
CONTAMINATION_KINDS = ("random", "reverse", "shift", "foreign")


class CopyTaskConfig(NamedTuple):
    """Every knob of the experiment.

    Attributes:
        n_tokens: content vocabulary size (the separator is one more id).
        seq_len: L, content tokens per sequence (sequence length 2L + 1).
        n_active: |T|, tokens every benign client remaps.
        d_model, n_heads, n_layers, d_mlp: model shape.
        base_steps, base_batch, base_lr: base-model training.
        lora_rank, lora_alpha: adapters (ΔW = alpha/r · B A).
        client_train: private training sequences per client.
        label_noise: probability that a benign client's private target token
            is a random token (small, noisy private data: the estimation error
            E_k that pooling the subspace removes).
        client_test: held-out sequences per client.
        client_steps, client_lr: local fine-tuning (full-batch Adam).
        chunk: optimisation steps per progress update.
    """

    n_tokens: int = 16
    seq_len: int = 8
    n_active: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_mlp: int = 128
    base_steps: int = 600
    base_batch: int = 64
    base_lr: float = 3e-3
    lora_rank: int = 4
    lora_alpha: float = 4.0
    client_train: int = 12
    label_noise: float = 0.1
    client_test: int = 256
    client_steps: int = 200
    client_lr: float = 5e-3
    chunk: int = 50

    @property
    def separator(self) -> int:
        return self.n_tokens

    @property
    def model(self) -> tfm.TransformerConfig:
        return tfm.TransformerConfig(
            vocab_size=self.n_tokens + 1,
            max_len=2 * self.seq_len + 1,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            d_mlp=self.d_mlp,
        )

    @property
    def lora(self) -> tfm.LoRAConfig:
        return tfm.LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha)


DEFAULT = CopyTaskConfig()
DEFAULT_CLIENTS, QUICK_CLIENTS = 20, 12
QUICK = DEFAULT._replace(base_steps=200, client_steps=100, client_test=64)


class Federation(NamedTuple):
    """Who does what.

    Attributes:
        mapping: (K, V) int, client k's target for token t under KIND_MAP.
        kind: (K,) int task kind.
        benign: (K,) bool ground truth.
        labels: length-K list of strings ("benign" or a contamination kind).
    """

    mapping: jax.Array
    kind: jax.Array
    benign: np.ndarray
    labels: list


# ---------------------------------------------------------------------------
# data


def _random_permutation_of(rng: np.random.Generator, subset: np.ndarray, vocab: int) -> np.ndarray:
    """Identity on [0, vocab) except a random derangement-free shuffle of ``subset``."""
    mapping = np.arange(vocab)
    while True:
        perm = rng.permutation(subset)
        if np.any(perm != subset):  # never the identity: the client must change something
            break
    mapping[subset] = perm
    return mapping


def make_federation(cfg: CopyTaskConfig, clients: int, contamination: float, seed: int) -> Federation:
    """Draw the client tasks.

    Benign clients permute the shared active set T = {0, …, n_active − 1}.
    Contaminated clients cycle through :data:`CONTAMINATION_KINDS`; "foreign"
    permutes a disjoint token set.

    Args:
        cfg: experiment configuration.
        clients: K.
        contamination: fraction of contaminated clients in [0, 1).
        seed: RNG seed (which clients are contaminated, the permutations).

    Returns:
        :class:`Federation`.
    """
    if clients < 2:
        raise ValueError(f"clients must be >= 2, got {clients}")
    if not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be in [0, 1), got {contamination}")
    if 2 * cfg.n_active > cfg.n_tokens:
        raise ValueError(f"n_active={cfg.n_active} must be at most n_tokens/2={cfg.n_tokens // 2}")
    n_bad = int(round(contamination * clients))
    if clients - n_bad < 2:
        raise ValueError(f"contamination={contamination} leaves fewer than 2 benign clients of {clients}")
    rng = np.random.default_rng(seed)
    vocab = cfg.n_tokens + 1
    active = np.arange(cfg.n_active)
    foreign = np.arange(cfg.n_tokens - cfg.n_active, cfg.n_tokens)
    bad = np.zeros(clients, bool)
    bad[rng.choice(clients, n_bad, replace=False)] = True
    mapping, kind, labels = [], [], []
    j = 0
    for k in range(clients):
        if not bad[k]:
            mapping.append(_random_permutation_of(rng, active, vocab))
            kind.append(KIND_MAP)
            labels.append("benign")
            continue
        label = CONTAMINATION_KINDS[j % len(CONTAMINATION_KINDS)]
        j += 1
        labels.append(label)
        if label == "foreign":
            mapping.append(_random_permutation_of(rng, foreign, vocab))
            kind.append(KIND_MAP)
        else:
            mapping.append(np.arange(vocab))
            kind.append({"random": KIND_RANDOM, "reverse": KIND_REVERSE, "shift": KIND_SHIFT}[label])
    return Federation(
        mapping=jnp.asarray(np.stack(mapping), jnp.int32),
        kind=jnp.asarray(kind, jnp.int32),
        benign=~bad,
        labels=labels,
    )


def make_sequences(
    key: jax.Array, mapping: jax.Array, kind: jax.Array, n: int, cfg: CopyTaskConfig, label_noise: float = 0.0
) -> jax.Array:
    """Sequences ``x_1 … x_L SEP y_1 … y_L`` of one client's task.

    Args:
        key: PRNG key.
        mapping: (V,) int token map (KIND_MAP).
        kind: scalar int task kind.
        n: number of sequences.
        cfg: experiment configuration.
        label_noise: probability that a target token is replaced by a uniform
            random token (noisy private labels).

    Returns:
        (n, 2L + 1) int32 tokens. vmaps over (key, mapping, kind).
    """
    kx, ky, kn, kz = jax.random.split(key, 4)
    x = jax.random.randint(kx, (n, cfg.seq_len), 0, cfg.n_tokens)
    copies = jnp.stack(
        [
            mapping[x],
            x[:, ::-1],
            jax.random.randint(ky, (n, cfg.seq_len), 0, cfg.n_tokens),
            jnp.roll(x, -1, axis=1),
        ]
    )
    y = copies[kind]
    if label_noise:
        flip = jax.random.bernoulli(kn, label_noise, y.shape)
        y = jnp.where(flip, jax.random.randint(kz, y.shape, 0, cfg.n_tokens), y)
    sep = jnp.full((n, 1), cfg.separator, x.dtype)
    return jnp.concatenate([x, sep, y], axis=1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# losses and metrics


def _target_logits(params, seqs, cfg: CopyTaskConfig, attn_delta=None):
    """Logits predicting y_1..y_L and the targets. seqs: (..., 2L+1)."""
    logits = tfm.forward(params, seqs[..., :-1], cfg.model, attn_delta)
    return logits[..., cfg.seq_len :, :], seqs[..., cfg.seq_len + 1 :]


def sequence_loss(params, seqs, cfg: CopyTaskConfig, attn_delta=None) -> jax.Array:
    """Mean cross-entropy on the copied half. seqs: (n, 2L+1) → scalar."""
    logits, targets = _target_logits(params, seqs, cfg, attn_delta)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def evaluate(params, seqs, cfg: CopyTaskConfig, attn_delta=None) -> dict:
    """Token accuracy, exact match and loss on one client's sequences.

    Args:
        params: base parameters.
        seqs: (n, 2L+1) tokens.
        cfg: experiment configuration.
        attn_delta: optional (n_layers, 4, d, d) dense attention update.

    Returns:
        dict of scalars ``token_accuracy``, ``exact_match``, ``loss``.
    """
    logits, targets = _target_logits(params, seqs, cfg, attn_delta)
    correct = jnp.argmax(logits, -1) == targets
    return {
        "token_accuracy": correct.mean(),
        "exact_match": correct.all(-1).mean(),
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(),
    }


# ---------------------------------------------------------------------------
# training


class _Progress:
    """A dependency-free text progress bar on stderr."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.done, self.start = 0, time.perf_counter()

    def update(self, n: int, stage: str) -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(frac * self.width)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r[{bar:<{self.width}}] {100 * frac:5.1f}% {elapsed:6.1f}s  {stage:<28}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _chunks(total: int, chunk: int):
    while total > 0:
        yield min(chunk, total)
        total -= chunk


def train_base(key: jax.Array, cfg: CopyTaskConfig, progress: _Progress | None = None):
    """Train the base model on identity copying with fresh random batches.

    Args:
        key: PRNG key.
        cfg: experiment configuration.
        progress: optional progress bar.

    Returns:
        (params, losses) with losses (base_steps,) the training curve.
    """
    kinit, kdata = jax.random.split(key)
    params = tfm.init_params(kinit, cfg.model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.base_lr, min(100, cfg.base_steps // 10 + 1), cfg.base_steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    state = opt.init(params)
    identity = jnp.arange(cfg.n_tokens + 1, dtype=jnp.int32)

    def step(carry, key):
        params, state = carry
        seqs = make_sequences(key, identity, jnp.int32(KIND_MAP), cfg.base_batch, cfg)
        loss, grads = jax.value_and_grad(sequence_loss)(params, seqs, cfg)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    @program
    def run_chunk(carry, keys):
        return jax.lax.scan(step, carry, keys)

    keys = jax.random.split(kdata, cfg.base_steps)
    carry, losses, start = (params, state), [], 0
    for n in _chunks(cfg.base_steps, cfg.chunk):
        chunk_keys = keys[start : start + n]
        carry, chunk_losses = run_chunk(carry, chunk_keys)
        losses.append(jax.block_until_ready(chunk_losses))
        start += n
        if progress is not None:
            progress.update(n, "base model")
    return carry[0], jnp.concatenate(losses)


def _client_optimizer(cfg: CopyTaskConfig):
    return optax.adam(cfg.client_lr)


def client_train_step(base, adapter, opt_state, seqs, cfg: CopyTaskConfig):
    """One full-batch Adam step of one client's LoRA adapter (base frozen).

    Args:
        base: base parameters (not differentiated).
        adapter: dict ``B`` (L, 4, d, r), ``A`` (L, 4, r, d).
        opt_state: optax state of the adapter.
        seqs: (n, 2L+1) the client's private training set.
        cfg: experiment configuration.

    Returns:
        (adapter, opt_state, loss). vmap over (adapter, opt_state, seqs) to
        train all clients at once.
    """

    def loss_fn(adapter):
        return sequence_loss(base, seqs, cfg, tfm.lora_deltas(adapter, cfg.lora))

    loss, grads = jax.value_and_grad(loss_fn)(adapter)
    updates, opt_state = _client_optimizer(cfg).update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss


def train_clients(base, train_seqs, key: jax.Array, cfg: CopyTaskConfig, progress: _Progress | None = None):
    """Fine-tune every client's adapter in one vmapped loop.

    All clients start from the same broadcast adapter (B = 0, shared A), as in
    federated LoRA.

    Args:
        base: base parameters.
        train_seqs: (K, n, 2L+1) private training sets.
        key: PRNG key of the shared adapter initialisation.
        cfg: experiment configuration.
        progress: optional progress bar.

    Returns:
        (adapters, losses): adapters dict ``B`` (K, L, 4, d, r), ``A`` (K, L, 4,
        r, d); losses (client_steps, K).
    """
    base = jax.tree.map(jnp.asarray, base)
    k = train_seqs.shape[0]
    adapter = tfm.init_lora(key, cfg.model, cfg.lora)
    adapters = jax.tree.map(lambda a: jnp.broadcast_to(a, (k, *a.shape)), adapter)
    states = jax.vmap(_client_optimizer(cfg).init)(adapters)
    vstep = jax.vmap(client_train_step, in_axes=(None, 0, 0, 0, None))

    def step(carry, _):
        adapters, states = carry
        adapters, states, loss = vstep(base, adapters, states, train_seqs, cfg)
        return (adapters, states), loss

    @program
    def run_chunk(carry, xs):
        return jax.lax.scan(step, carry, xs)

    carry, losses = (adapters, states), []
    for n in _chunks(cfg.client_steps, cfg.chunk):
        carry, chunk_losses = run_chunk(carry, jnp.zeros((n,)))
        losses.append(jax.block_until_ready(chunk_losses))
        if progress is not None:
            progress.update(n, "client LoRA fine-tuning")
    return carry[0], jnp.concatenate(losses)


# ---------------------------------------------------------------------------
# federation: modules ↔ clients, aggregation


def module_names(cfg: CopyTaskConfig) -> list:
    """Names of the adapted modules in CLAIR's module-axis order (layer-major)."""
    return [f"layer{layer}.{proj}" for layer in range(cfg.n_layers) for proj in tfm.ATTENTION_PROJECTIONS]


def to_module_factors(adapters: dict, cfg: CopyTaskConfig):
    """Client adapters → CLAIR input, the LoRA scaling folded into B.

    Args:
        adapters: ``B`` (K, L, 4, d, r), ``A`` (K, L, 4, r, d).
        cfg: experiment configuration.

    Returns:
        ``LoRAFactors(B=(L·4, K, d, r), A=(L·4, K, r, d))`` with ΔW = B A.
    """
    import clair_jax as cj

    def modules_first(x):
        k = x.shape[0]
        return jnp.moveaxis(x.reshape(k, -1, *x.shape[-2:]), 0, 1)

    return cj.LoRAFactors(B=modules_first(cfg.lora.scale * adapters["B"]), A=modules_first(adapters["A"]))


def to_client_deltas(module_deltas: jax.Array, cfg: CopyTaskConfig) -> jax.Array:
    """Dense (L·4, K, d, d) module updates → (K, L, 4, d, d) per-client attention deltas."""
    per_client = jnp.moveaxis(module_deltas, 1, 0)
    return per_client.reshape(per_client.shape[0], cfg.n_layers, 4, *per_client.shape[-2:])


def oracle_subspace(dense: jax.Array, benign: np.ndarray, rank: jax.Array) -> jax.Array:
    """Leading left singular vectors of the stacked *true* benign blocks.

    Args:
        dense: (M, K, p, q) module updates.
        benign: (K,) bool true collaborative set.
        rank: (M,) int rank per module (CLAIR's choice, so the oracle differs
            from CLAIR only in knowing S).

    Returns:
        (M, p, p) bases whose columns past ``rank`` are zero.
    """
    idx = np.flatnonzero(benign)
    blocks = dense[:, idx]  # (M, S, p, q)
    stacked = jnp.moveaxis(blocks, 1, 2).reshape(blocks.shape[0], blocks.shape[2], -1)
    u, _, _ = jnp.linalg.svd(stacked, full_matrices=False)
    keep = jnp.arange(u.shape[-1])[None, :] < jnp.asarray(rank).reshape(-1, 1)
    return u * keep[:, None, :]


def detection_scores(predicted_bad: np.ndarray, truly_bad: np.ndarray) -> dict:
    """Precision, recall and F1 of flagging contaminated clients (positive = contaminated).

    Args:
        predicted_bad: (K,) bool flags.
        truly_bad: (K,) bool ground truth.

    Returns:
        dict with ``precision``, ``recall``, ``f1``, ``false_alarms`` and
        ``missed``. With nothing to find and nothing flagged, all scores are 1.
    """
    predicted_bad, truly_bad = np.asarray(predicted_bad, bool), np.asarray(truly_bad, bool)
    tp = int(np.sum(predicted_bad & truly_bad))
    fp = int(np.sum(predicted_bad & ~truly_bad))
    fn = int(np.sum(~predicted_bad & truly_bad))
    precision = tp / (tp + fp) if tp + fp else float(fn == 0)
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "false_alarms": fp, "missed": fn}


def aggregate_methods(adapters: dict, benign: np.ndarray, cfg: CopyTaskConfig, clair_kwargs=None):
    """Every method's attention update for every client.

    Args:
        adapters: local adapters ``B`` (K, L, 4, d, r), ``A`` (K, L, 4, r, d).
        benign: (K,) bool ground truth (used only by the oracle).
        cfg: experiment configuration.
        clair_kwargs: extra keyword arguments of :func:`clair_jax.clair`.

    Returns:
        (deltas, result): deltas maps method name → (K, L, 4, d, d); result is
        CLAIR's ``ClairResult`` on the (L·4)-module factor input.
    """
    import clair_jax as cj
    from clair_jax import baselines

    factors = to_module_factors(adapters, cfg)
    dense = factors.B @ factors.A  # (M, K, d, d)
    result = cj.clair(factors, **(clair_kwargs or {}))
    refined = result.refined.B @ result.refined.A
    # a client flagged by the pooled verdict keeps its local adapter in every module
    clair_dense = jnp.where(jnp.asarray(result.client_benign)[None, :, None, None], refined, dense)
    fedavg_ab = jnp.mean(factors.B, axis=1) @ jnp.mean(factors.A, axis=1)  # (M, d, d)
    subspace = oracle_subspace(dense, benign, result.rank)
    module_deltas = {
        "base": jnp.zeros_like(dense),
        "local": dense,
        "fedavg_dw": baselines.fedavg(dense),
        "fedavg_ab": jnp.broadcast_to(fedavg_ab[:, None], dense.shape),
        "median": baselines.coordinate_median(dense),
        "multi_krum": baselines.multi_krum(dense),
        "clair": clair_dense,
        "oracle": baselines.oracle(dense, subspace, jnp.asarray(benign)),
    }
    return {name: to_client_deltas(d, cfg) for name, d in module_deltas.items()}, result


METHOD_LABELS = {
    "base": "base model",
    "local": "local LoRA",
    "fedavg_dw": "FedAvg of ΔW",
    "fedavg_ab": "FedAvg of A, B",
    "median": "coord. median",
    "multi_krum": "Multi-Krum",
    "clair": "CLAIR",
    "oracle": "oracle (true S)",
}


# ---------------------------------------------------------------------------
# the experiment


def _check_task_config(cfg: CopyTaskConfig) -> None:
    for name in ("n_tokens", "seq_len", "n_active", "base_steps", "base_batch", "client_train", "client_test",
                 "client_steps", "chunk", "lora_rank"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"CopyTaskConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.label_noise < 1.0:
        raise ValueError(f"CopyTaskConfig.label_noise must be in [0, 1), got {cfg.label_noise}")
    for name in ("base_lr", "client_lr", "lora_alpha"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"CopyTaskConfig.{name} must be > 0, got {getattr(cfg, name)}")


def _check_run_args(clients, contamination, seed):
    if not isinstance(clients, (int, np.integer)) or clients < 4:
        raise ValueError(f"clients must be an integer >= 4, got {clients!r}")
    if not isinstance(contamination, (int, float)) or not 0.0 <= contamination <= 0.5:
        raise ValueError(f"contamination must be in [0, 0.5], got {contamination!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def run_copy_task(
    *,
    clients: int | None = None,
    contamination: float = 0.3,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    config: CopyTaskConfig | None = None,
    clair_kwargs: dict | None = None,
) -> dict:
    """Run the whole experiment and return JSON-ready results.

    Args:
        clients: number of clients K (default 20; 12 with ``quick``).
        contamination: fraction of contaminated clients, in [0, 0.5].
        seed: seed of everything (base model, client tasks, data, adapters).
        quick: the small configuration :data:`QUICK` (CI).
        progress: draw a progress bar on stderr.
        config: overrides the configuration entirely.
        clair_kwargs: extra keyword arguments of :func:`clair_jax.clair`.

    Returns:
        dict with ``config``, ``clients``, ``contamination``, ``seed``,
        ``labels`` (K,), ``benign`` (K,), ``methods`` (name → mean
        ``token_accuracy``, ``exact_match``, ``loss`` over benign clients, and
        ``per_client`` lists over the benign clients), ``detection``
        (``pooled`` and ``per_module`` precision/recall/F1, ``flagged_by_kind``
        the fraction of each kind of client flagged), ``client_benign`` (K,)
        CLAIR's pooled verdict, ``client_scores``
        (K,), ``client_z`` (K,) the pooled refit statistic, ``module_scores`` (modules × K), ``rank`` (modules,),
        ``base_accuracy`` (identity copying) and ``timings`` in seconds.
    """
    if clients is None:
        clients = QUICK_CLIENTS if quick else DEFAULT_CLIENTS
    _check_run_args(clients, contamination, seed)
    cfg = config if config is not None else (QUICK if quick else DEFAULT)
    _check_task_config(cfg)
    timings = {}
    bar = _Progress(cfg.base_steps + cfg.client_steps + 2 * cfg.chunk, progress)
    k_base, k_train, k_test, k_lora, k_copy = jax.random.split(jax.random.key(seed), 5)

    t0 = time.perf_counter()
    base, base_losses = train_base(k_base, cfg, bar)
    identity = jnp.arange(cfg.n_tokens + 1, dtype=jnp.int32)
    copy_eval = evaluate(base, make_sequences(k_copy, identity, jnp.int32(KIND_MAP), 512, cfg), cfg)
    timings["base_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fed = make_federation(cfg, clients, contamination, seed)
    gen = jax.vmap(make_sequences, in_axes=(0, 0, 0, None, None, None))
    train_seqs = gen(jax.random.split(k_train, clients), fed.mapping, fed.kind, cfg.client_train, cfg, cfg.label_noise)
    test_seqs = gen(jax.random.split(k_test, clients), fed.mapping, fed.kind, cfg.client_test, cfg, 0.0)
    adapters, client_losses = train_clients(base, train_seqs, k_lora, cfg, bar)
    timings["client_training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    deltas, result = aggregate_methods(adapters, fed.benign, cfg, clair_kwargs)
    jax.block_until_ready(result.client_benign)
    timings["clair_and_baselines"] = time.perf_counter() - t0
    bar.update(cfg.chunk, "CLAIR + baselines")

    t0 = time.perf_counter()
    benign_idx = np.flatnonzero(fed.benign)
    eval_clients = program(jax.vmap(lambda d, s: evaluate(base, s, cfg, d)))
    methods = {}
    for name, delta in deltas.items():
        scores = jax.device_get(eval_clients(delta[benign_idx], test_seqs[benign_idx]))
        methods[name] = {key: float(np.mean(v)) for key, v in scores.items()}
        methods[name]["per_client"] = {key: np.asarray(v).tolist() for key, v in scores.items()}
    timings["evaluation"] = time.perf_counter() - t0
    bar.update(cfg.chunk, "evaluation")

    truly_bad = ~fed.benign
    module_benign = np.asarray(result.benign)
    names = module_names(cfg)
    return {
        "config": cfg._asdict(),
        "clients": int(clients),
        "contamination": float(contamination),
        "seed": int(seed),
        "quick": bool(quick),
        "labels": list(fed.labels),
        "benign": fed.benign.tolist(),
        "methods": methods,
        "detection": {
            "pooled": detection_scores(~np.asarray(result.client_benign), truly_bad),
            "per_module": {n: detection_scores(~module_benign[i], truly_bad) for i, n in enumerate(names)},
            "flagged_by_kind": {
                kind: float(np.mean(~np.asarray(result.client_benign)[np.array(fed.labels) == kind]))
                for kind in sorted(set(fed.labels))
            },
        },
        "client_benign": np.asarray(result.client_benign).tolist(),
        "client_scores": np.asarray(result.client_scores).tolist(),
        "client_z": np.asarray(result.client_z).tolist(),
        "module_scores": {n: np.asarray(result.scores[i]).tolist() for i, n in enumerate(names)},
        "module_z": {n: np.asarray(result.residual_z[i]).tolist() for i, n in enumerate(names)},
        "copies": {n: np.asarray(result.copies[i]).tolist() for i, n in enumerate(names)},
        "rank": {n: int(r) for n, r in zip(names, np.asarray(result.rank))},
        "converged": bool(np.all(np.asarray(result.converged))),
        "base_accuracy": {key: float(v) for key, v in copy_eval.items()},
        "base_final_loss": float(base_losses[-1]),
        "client_final_loss": np.asarray(client_losses[-1]).tolist(),
        "timings": timings,
    }


def format_report(results: dict) -> str:
    """A plain-text table of a :func:`run_copy_task` result."""
    lines = [
        f"copy task: K={results['clients']} clients, contamination={results['contamination']:.2f}, "
        f"seed={results['seed']}{' (quick)' if results['quick'] else ''}",
        f"base model on identity copying: token accuracy {results['base_accuracy']['token_accuracy']:.3f}, "
        f"exact match {results['base_accuracy']['exact_match']:.3f}",
        "",
        f"{'method (benign clients, held out)':<34}{'token acc':>10}{'exact':>8}{'loss':>8}",
    ]
    for name, m in results["methods"].items():
        lines.append(f"{METHOD_LABELS.get(name, name):<34}{m['token_accuracy']:>10.3f}{m['exact_match']:>8.3f}{m['loss']:>8.3f}")
    pooled = results["detection"]["pooled"]
    lines += [
        "",
        f"detection (pooled over modules): precision {pooled['precision']:.3f}, recall {pooled['recall']:.3f}, "
        f"F1 {pooled['f1']:.3f}",
        "flagged fraction by kind: "
        + ", ".join(f"{k} {v:.2f}" for k, v in results["detection"]["flagged_by_kind"].items()),
    ]
    for name, d in results["detection"]["per_module"].items():
        lines.append(
            f"  {name:<16} precision {d['precision']:.3f} recall {d['recall']:.3f} F1 {d['f1']:.3f} "
            f"rank {results['rank'][name]}"
        )
    t = results["timings"]
    lines.append("")
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``clair copy-task``."""
    parser.add_argument(
        "--clients", type=int, default=None, help=f"number of clients K (default {DEFAULT_CLIENTS}; {QUICK_CLIENTS} with --quick)"
    )
    parser.add_argument("--contamination", type=float, default=0.3, help="fraction of contaminated clients (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quick", action="store_true", help="small configuration, under 2 minutes on a laptop CPU")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the full results to PATH as JSON")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``clair copy-task``."""
    try:
        results = run_copy_task(
            clients=args.clients,
            contamination=args.contamination,
            seed=args.seed,
            quick=args.quick,
            progress=not args.no_progress,
        )
    except ValueError as err:
        print(f"clair copy-task: error: {err}", file=sys.stderr)
        return 2
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results written to {args.json}")
    return 0
