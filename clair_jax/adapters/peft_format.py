"""PEFT LoRA adapter directories, read exactly as peft (≥ 0.21) reads them.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``[base_model.model.]<module>.lora_A.weight`` (r × in) and ``….lora_B.weight``
(out × r); the module's update is ΔW = s·B·A with

* s = lora_alpha / r, or lora_alpha / √r when ``use_rslora``;
* r and lora_alpha overridden per module by ``rank_pattern`` / ``alpha_pattern``,
  whose keys are regexes matched as ``re.match(rf"(.*\\.)?({key})$", module)``,
  the first matching key winning (peft's ``get_pattern_key``);
* ``fan_in_fan_out`` transposing the base weight's ΔW only: A is (r, in) and B is
  (out, r) either way, so B·A is the same linear map.

Embedding LoRA (``lora_embedding_A`` (r × vocab), ``lora_embedding_B`` (dim × r))
has the same B·A structure and is read the same way. Every other tensor
(``modules_to_save``, ``lora_B.bias`` of ``lora_bias``, biases of ``bias="all"``,
trainable tokens) is a full weight, not a LoRA factor: it is carried through
unchanged and listed as such.

Only headers are read here: :meth:`Federation.factors` reads the factors of a module
group lazily with ``safetensors.safe_open``, so one group of modules times K clients
is in memory at a time, never the whole federation. No torch is needed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import ml_dtypes  # noqa: F401  (registers numpy's bfloat16: safetensors cannot read BF16 without it)
import numpy as np
from safetensors import safe_open

from clair_jax.adapters.keys import peft_factor

__all__ = [
    "AdapterError", "ModuleEntry", "ClientAdapter", "ModuleGroup", "Federation",
    "CONFIG_NAME", "WEIGHTS_NAME", "MIN_CLIENTS",
    "pattern_value", "peft_scaling", "read_client", "load_federation",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: CLAIR needs a majority to tell shared from contaminated.
MIN_CLIENTS = 3

_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}

# LoRA variants whose update is not s·B·A of the saved factors (or whose factors are not 2-D).
_VARIANTS = {
    "use_dora": "DoRA (use_dora): its ΔW depends on the base model's weights",
    "use_qalora": "QA-LoRA (use_qalora): its A acts on pooled inputs",
    "use_bdlora": "block-diagonal LoRA (use_bdlora): its factors are not plain B and A",
    "target_parameters": "LoRA on raw parameters (target_parameters): its factors are not plain B and A",
    "kasa_config": "KaSA (kasa_config): its update is not s·B·A",
    "velora_config": "VeLoRA (velora_config): its update is not s·B·A",
    "monteclora_config": "MonteCLoRA (monteclora_config): its update is not s·B·A",
    "arrow_config": "Arrow routing (arrow_config): its update is not s·B·A",
    "layer_replication": "layer_replication: replicated layers share their adapters",
}


class AdapterError(ValueError):
    """An adapter directory that cannot be aggregated; ``client`` names it."""

    def __init__(self, client, reason):
        self.client = str(client)
        self.reason = reason
        super().__init__(f"{self.client}: {reason}")


def pattern_value(patterns, module, default):
    """peft's per-module override: the value of the first key of ``patterns`` that
    matches ``module`` as ``re.match(rf"(.*\\.)?({key})$", module)``, else ``default``.

    Example:
        >>> pattern_value({"q_proj": 8, "layers.0.v_proj": 4}, "model.layers.0.v_proj", 16)
        4
        >>> pattern_value({"proj": 8}, "model.layers.0.q_proj", 16)   # whole name components only
        16
    """
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def peft_scaling(config, module):
    """(r, s) of ``module`` under ``config``: s = alpha/r, or alpha/√r with ``use_rslora``.

    Example:
        >>> peft_scaling({"r": 16, "lora_alpha": 32}, "model.layers.0.q_proj")
        (16, 2.0)
        >>> peft_scaling({"r": 16, "lora_alpha": 32, "use_rslora": True}, "q_proj")
        (16, 8.0)
        >>> peft_scaling({"r": 16, "lora_alpha": 32, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 2}}, "q_proj")
        (4, 0.5)
    """
    r = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return int(r), (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


@dataclass(frozen=True)
class ModuleEntry:
    """One LoRA module of one client: keys, shapes, rank and scaling."""

    key_a: str
    key_b: str
    out_features: int
    in_features: int
    rank: int
    scaling: float
    dtype: str          # safetensors dtype code of B (A's is checked to agree)


@dataclass(frozen=True)
class ClientAdapter:
    """One client's adapter directory (headers only)."""

    name: str
    path: str
    config: dict
    modules: dict                 # module name → ModuleEntry
    passthrough: tuple            # keys of full weights carried through unchanged
    keys: tuple                   # every key, in file order
    metadata: dict | None         # the safetensors file's __metadata__

    @property
    def weights_path(self) -> str:
        return os.path.join(self.path, WEIGHTS_NAME)

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG_NAME)

    @property
    def dtypes(self) -> tuple:
        return tuple(sorted({m.dtype for m in self.modules.values()}))


@dataclass(frozen=True)
class ModuleGroup:
    """Modules of one (out, in) shape, solved as one CLAIR problem stack.

    ``rank`` is the largest LoRA rank of any client in the group: smaller ranks are
    zero-padded (B's columns, A's rows), which leaves every B·A unchanged.
    """

    shape: tuple          # (out, in) = (p, q)
    modules: tuple        # module names
    rank: int


def _module_name(name):
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def read_client(path) -> ClientAdapter:
    """Read and check one adapter directory's config and safetensors header.

    Raises:
        AdapterError: naming the directory and what is wrong with it.
    """
    path = os.fspath(path)
    name = os.path.basename(os.path.normpath(path))
    if not os.path.isdir(path):
        raise AdapterError(path, "no such directory")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise AdapterError(path, f"missing {CONFIG_NAME}")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(path, f"{CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(path, f"{CONFIG_NAME} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(path, f"peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') can be aggregated")
    for option, what in _VARIANTS.items():
        if config.get(option):
            raise AdapterError(path, f"not supported: {what}")
    for option in ("r", "lora_alpha"):
        value = config.get(option)
        if option in config and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise AdapterError(path, f"{CONFIG_NAME}: {option} must be a positive number, got {value!r}")
    for option in ("rank_pattern", "alpha_pattern"):
        value = config.get(option)
        if value is not None and not isinstance(value, dict):
            raise AdapterError(path, f"{CONFIG_NAME}: {option} must be a mapping of regex → value, got {value!r}")
        for key in value or {}:
            try:
                re.compile(key)
            except re.error as exc:
                raise AdapterError(path, f"{CONFIG_NAME}: {option} key {key!r} is not a valid regex ({exc})") from None

    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        hint = " (only adapter_model.bin: save with safe_serialization=True)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise AdapterError(path, f"missing {WEIGHTS_NAME}{hint}")
    try:
        with safe_open(weights, framework="numpy") as fh:
            keys = tuple(fh.keys())
            metadata = fh.metadata()
            headers = {k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape())) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for a bad header or size
        raise AdapterError(path, f"corrupt {WEIGHTS_NAME} ({type(exc).__name__}: {exc})") from None

    factors, passthrough = {}, []
    for key in keys:
        if "lora_magnitude_vector" in key:
            raise AdapterError(path, f"DoRA weights ({key}) are not supported: ΔW depends on the base model's weights")
        found = peft_factor(key)  # (module, "A" | "B"), shared with clair_jax.flower
        if found is None:
            passthrough.append(key)
            continue
        factors.setdefault(_module_name(found[0]), {})[found[1]] = key
    if not factors:
        raise AdapterError(path, f"{WEIGHTS_NAME} holds no LoRA factors (no *.lora_A.weight / *.lora_B.weight keys)")

    modules = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "B" not in pair else "lora_A"
            raise AdapterError(path, f"module {module} has no {missing} weight")
        (dtype_a, shape_a), (dtype_b, shape_b) = headers[pair["A"]], headers[pair["B"]]
        if len(shape_a) != 2 or len(shape_b) != 2:
            raise AdapterError(path, f"module {module}: LoRA factors must be 2-D (convolution LoRA is not supported), "
                                     f"got lora_A {shape_a} and lora_B {shape_b}")
        if dtype_b not in _FLOAT_DTYPES or dtype_a not in _FLOAT_DTYPES:
            raise AdapterError(path, f"module {module}: LoRA factors must be float32/float16/bfloat16/float64, "
                                     f"got {dtype_a} and {dtype_b}")
        if dtype_a != dtype_b:
            raise AdapterError(path, f"module {module}: lora_A is {dtype_a} but lora_B is {dtype_b}")
        if shape_b[1] != shape_a[0]:
            raise AdapterError(path, f"module {module}: lora_B {shape_b} and lora_A {shape_a} disagree on the rank")
        r, s = peft_scaling(config, module)
        if shape_a[0] != r:
            raise AdapterError(path, f"module {module} has rank {shape_a[0]} but {CONFIG_NAME} gives it r = {r} "
                                     "(r / rank_pattern): peft would not load it")
        modules[module] = ModuleEntry(pair["A"], pair["B"], shape_b[0], shape_a[1], r, float(s), dtype_b)
    return ClientAdapter(name, path, config, modules, tuple(passthrough), keys, metadata)


def _odd_one(clients, value, what):
    """Raise for the first client whose ``value(client)`` differs from the majority's."""
    values = [value(c) for c in clients]
    common = _majority(values)
    for c, v in zip(clients, values):
        if repr(v) != repr(common):
            raise AdapterError(c.path, f"{what} {v!r} differs from the other clients' {common!r}")


def _majority(values):
    common, _ = Counter(map(repr, values)).most_common(1)[0]
    return values[[repr(v) for v in values].index(common)]


def _check_modules(clients):
    """Same LoRA module set and shapes as the majority of clients, else name the odd one."""
    reference = _majority([sorted(c.modules) for c in clients])
    for c in clients:
        missing = sorted(set(reference) - set(c.modules), key=_natural_key)
        extra = sorted(set(c.modules) - set(reference), key=_natural_key)
        if missing or extra:
            show = lambda ms: ", ".join(ms[:3]) + (f" (+{len(ms) - 3} more)" if len(ms) > 3 else "")  # noqa: E731
            parts = ([f"lacks {show(missing)}"] if missing else []) + ([f"has extra {show(extra)}"] if extra else [])
            raise AdapterError(c.path, "target modules differ from the other clients': it " + " and ".join(parts))
    for m in reference:
        shapes = [(c.modules[m].out_features, c.modules[m].in_features) for c in clients]
        common = _majority(shapes)
        for c, shape in zip(clients, shapes):
            if shape != common:
                raise AdapterError(c.path, f"module {m} has shape (out, in) = {shape}, the other clients' {common}")


@dataclass(frozen=True)
class Federation:
    """K clients' adapters, checked against each other, with their module groups.

    ``groups`` are the shape groups (one CLAIR problem stack each, modules on the
    leading axis); clients appear in the order given.
    """

    clients: tuple
    groups: tuple

    @property
    def names(self) -> tuple:
        return tuple(c.name for c in self.clients)

    def factors(self, group=None, modules=None, *, dtype=np.float32):
        """LoRA factors with the scaling folded into B, read lazily from disk.

        Args:
            group: index into ``groups``; None: every group, as a tuple.
            modules: names of the group's modules to read (default all of them).
            dtype: the arrays' dtype (float32 by default; inputs are upcast).

        Returns:
            :class:`clair_jax.LoRAFactors` with B (M, K, p, r) = s_k·B_k and
            A (M, K, r, q), zero-padded to the group's rank r (numpy arrays).
        """
        import clair_jax as cj

        if group is None:
            return tuple(self.factors(g, dtype=dtype) for g in range(len(self.groups)))
        grp = self.groups[group]
        names = grp.modules if modules is None else tuple(modules)
        (p, q), r, k = grp.shape, grp.rank, len(self.clients)
        b = np.zeros((len(names), k, p, r), dtype)
        a = np.zeros((len(names), k, r, q), dtype)
        for j, client in enumerate(self.clients):
            with safe_open(client.weights_path, framework="numpy") as fh:
                for i, name in enumerate(names):
                    entry = client.modules[name]
                    rk = entry.rank
                    b[i, j, :, :rk] = fh.get_tensor(entry.key_b).astype(dtype) * dtype(entry.scaling)
                    a[i, j, :rk, :] = fh.get_tensor(entry.key_a).astype(dtype)
        return cj.LoRAFactors(B=b, A=a)


def _natural_key(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_federation(dirs) -> Federation:
    """Read and check K ≥ 3 PEFT LoRA adapter directories (headers only).

    Every client must be a LoRA adapter of the same base model with the same modules
    of the same shapes (ranks and scalings may differ per client and module).
    Modules are grouped by shape (out, in): grouped-query attention gives a q/o group
    and a k/v group. Factors are read only when :meth:`Federation.factors` asks.

    Raises:
        AdapterError: naming the first client directory that cannot be used, and why.

    Example (a sketch; see docs/peft.md for a runnable one)::

        fed = load_federation(["clients/a", "clients/b", "clients/c"])
        results = cj.clair_groups(fed.factors())
    """
    dirs = [os.fspath(d) for d in dirs]
    if len(dirs) < MIN_CLIENTS:
        raise AdapterError(", ".join(dirs) or "(none)",
                           f"{len(dirs)} client(s) given; CLAIR needs at least {MIN_CLIENTS} adapter directories")
    clients = tuple(read_client(d) for d in dirs)
    seen = {}
    for c in clients:
        if c.name in seen:
            raise AdapterError(c.path, f"same directory name as {seen[c.name]}: the outputs would collide")
        seen[c.name] = c.path
    _odd_one(clients, lambda c: c.config.get("base_model_name_or_path"), "base_model_name_or_path")
    _check_modules(clients)

    modules = sorted(clients[0].modules, key=_natural_key)
    by_shape = {}
    for m in modules:
        e = clients[0].modules[m]
        by_shape.setdefault((e.out_features, e.in_features), []).append(m)
    groups = tuple(
        ModuleGroup(shape, tuple(names), max(c.modules[m].rank for c in clients for m in names))
        for shape, names in by_shape.items()
    )
    return Federation(clients, groups)
