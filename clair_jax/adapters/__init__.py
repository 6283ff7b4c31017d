"""PEFT LoRA adapters in, refined adapters out (``clair aggregate``).

An outer room: it reads PEFT adapter directories (``adapter_config.json`` +
``adapter_model.safetensors``, no torch needed), calls the public ``clair_jax`` API
as a user would, and writes refined adapters that ``PeftModel.from_pretrained``
loads. See docs/peft.md.

* :func:`load_federation`: check K adapter directories and group their modules by
  shape; :meth:`Federation.factors` reads the ``cj.LoRAFactors`` (PEFT scaling
  folded into B) lazily.
* :func:`aggregate`: the whole job, also ``clair aggregate DIR ... --out OUT``.
"""

from clair_jax.adapters.aggregate import aggregate, plan_chunks
from clair_jax.adapters.reports import CLIENT_REPORT
from clair_jax.adapters.writing import GLOBAL_NAME, global_factors
from clair_jax.adapters.peft_format import (
    AdapterError,
    ClientAdapter,
    Federation,
    ModuleEntry,
    ModuleGroup,
    load_federation,
    pattern_value,
    peft_scaling,
    read_client,
)

__all__ = [
    "AdapterError",
    "CLIENT_REPORT",
    "ClientAdapter",
    "Federation",
    "GLOBAL_NAME",
    "ModuleEntry",
    "ModuleGroup",
    "aggregate",
    "global_factors",
    "load_federation",
    "pattern_value",
    "peft_scaling",
    "plan_chunks",
    "read_client",
]
