"""Which LoRA module and factor an array's key names (peft's layout), and the pairs.

peft saves a module's factors as ``<module>.lora_A.weight`` (r × in) and
``<module>.lora_B.weight`` (out × r), embedding LoRA as ``<module>.lora_embedding_A``
and ``…_B``. A key names factor A when it holds the A tag, and its partner is the
same key with the B tag in that place. ``clair aggregate`` (:mod:`clair_jax.adapters`)
and ``ClairStrategy`` (``clair_jax.flower``) pair keys with these functions.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PEFT_TAGS", "factor_of", "peft_factor", "pair_lora_keys"]

#: peft's on-disk factor keys: (A tag, B tag, what follows the tag).
PEFT_TAGS = ((".lora_A", ".lora_B", ".weight"), (".lora_embedding_A", ".lora_embedding_B", ""))


def factor_of(key: str, a_tag: str = "lora_A", b_tag: str = "lora_B",
              tail: str | None = None) -> tuple[str, str, str] | None:
    """``(module, "A" or "B", partner key)`` when ``key`` names a LoRA factor, else None.

    The last occurrence of a tag counts; ``module`` is what precedes it (without a
    trailing dot, or the key itself when nothing does) and the partner key has
    the other tag in its place. With ``tail`` given, only keys whose text after
    the tag is exactly ``tail`` count.

    Example:
        >>> factor_of("layers.0.q_proj.lora_A.weight")
        ('layers.0.q_proj', 'A', 'layers.0.q_proj.lora_B.weight')
    """
    for tag, factor, other in ((a_tag, "A", b_tag), (b_tag, "B", a_tag)):
        head, found, rest = key.rpartition(tag)
        if found and (tail is None or rest == tail):
            return head.rstrip(".") or key, factor, head + other + rest
    return None


def peft_factor(key: str) -> tuple[str, str] | None:
    """``(module, "A" or "B")`` for a key of a saved peft adapter, else None.

    Example:
        >>> peft_factor("base_model.model.x.lora_embedding_B")
        ('base_model.model.x', 'B')
    """
    for a_tag, b_tag, tail in PEFT_TAGS:
        hit = factor_of(key, a_tag, b_tag, tail)
        if hit is not None:
            return hit[0], hit[1]
    return None


def pair_lora_keys(keys: Iterable[str], a_tag: str = "lora_A",
                   b_tag: str = "lora_B") -> dict[str, tuple[str, str]]:
    """``{module: (a_key, b_key)}`` for every A key whose B partner is among ``keys``.

    Example:
        >>> pair_lora_keys(["m.lora_A.weight", "m.lora_B.weight", "head.bias", "n.lora_A.weight"])
        {'m': ('m.lora_A.weight', 'm.lora_B.weight')}
    """
    keys = set(keys)
    pairs = {}
    for key in sorted(keys):
        hit = factor_of(key, a_tag, b_tag)
        if hit is not None and hit[1] == "A" and hit[2] in keys:
            pairs[hit[0]] = (key, hit[2])
    return pairs
