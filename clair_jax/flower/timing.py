"""The part of a Flower round's CLAIR call that XLA spends compiling (``ClairStrategy.compile_seconds``)."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import jax

__all__ = ["compiling", "counting_compile_seconds"]


@contextmanager
def compiling():
    """``[seconds]`` XLA spends compiling programs while the block runs (jax.monitoring's events).

    The listener is process-wide: compiles on another thread meanwhile are counted too.
    """
    spent = [0.0]

    def listener(event, seconds, **kwargs):
        if event.endswith("backend_compile_duration"):
            spent[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield spent
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def counting_compile_seconds(judge):
    """``judge`` (returning a ``Judgement``) with its ``compile_seconds`` filled in."""
    @functools.wraps(judge)
    def run(*args, **kwargs):
        with compiling() as spent:
            out = judge(*args, **kwargs)
        return out._replace(compile_seconds=spent[0])
    return run
