"""The clients' reports for centre pooling (``clair aggregate --pooling centre``).

A client directory may hold :data:`CLIENT_REPORT`: its number of training
examples and/or the noise energy of its ΔW per module (all clients or none).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from clair_jax.adapters.peft_format import AdapterError

__all__ = ["CLIENT_REPORT", "client_reports", "call_options"]

#: A client directory's optional report for ``pooling="centre"``: its training examples and measured noise.
CLIENT_REPORT = "clair_client.json"


def client_reports(federation):
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


def call_options(options, reports, call):
    """The options of one CLAIR call: with centre pooling, the clients' noise for its modules."""
    if reports is None:
        return options
    if "sizes" in reports:
        return dict(options, client_sizes=reports["sizes"])
    return dict(options, update_noise=[np.array([[n[m] for n in reports["noise"]] for m in chunk.modules])
                                      for chunk in call])
