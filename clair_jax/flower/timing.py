"""The part of a Flower round's CLAIR call that XLA spends compiling (``ClairStrategy.compile_seconds``)."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import jax

__all__ = ["Compiles", "compiling", "counting_compile_seconds"]


class Compiles:
    """What XLA compiled while a :func:`compiling` block ran: ``count`` programs in ``seconds``."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0


@contextmanager
def compiling():
    """A :class:`Compiles` record of the programs XLA compiles while the block runs (jax.monitoring's events).

    The listener is process-wide: compiles on another thread meanwhile are counted too.
    """
    spent = Compiles()

    def listener(event, seconds, **kwargs):
        if event.endswith("backend_compile_duration"):
            spent.count += 1
            spent.seconds += seconds

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
        return out._replace(compile_seconds=spent.seconds)
    return run
