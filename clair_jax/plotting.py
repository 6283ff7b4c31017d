"""A picture of the verdict: :func:`verdict_figure` (matplotlib, imported lazily).

Three panels: each client's pooled refit z against the threshold, coloured by its
status; a clients × modules heatmap of the per-module z; each module group's
stacked benign spectrum with r̂ and the noise edge σ̂(√p + √n) marked.
:meth:`clair_jax.ClairResult.plot` and ``clair aggregate --plot`` call it.
Needs matplotlib (the ``plot`` extra: ``pip install "clair-jax[plot]"``); ``import clair_jax`` does not import it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["STATUS_COLOURS", "verdict_figure", "report_figure", "result_figure"]

#: Colour of each status in every panel.
STATUS_COLOURS = {"benign": "#2b8a3e", "noisy": "#e8a33d", "contaminated": "#c92a2a"}


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plotting the verdict needs matplotlib: pip install \"clair-jax[plot]\" (or matplotlib)") from err
    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo") and not _interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _interactive():
    import sys

    return hasattr(sys, "ps1") or "ipykernel" in sys.modules


def verdict_figure(names, statuses, z, z_crit, module_z, module_names, spectra, path=None, title=None):
    """Draw the verdict; save it to ``path`` (PNG/PDF/SVG by extension) if given.

    Args:
        names: K client names. statuses: K of "benign" | "noisy" | "contaminated".
        z: (K,) pooled refit z (mean over problems). z_crit: its threshold.
        module_z: (K, M) per-module refit z (NaN where a module did not judge the client).
        module_names: M column labels.
        spectra: a list of dicts, one per module group: ``label``, ``values`` (singular
            values of the stacked benign updates, descending), ``rank`` (r̂) and
            ``edge`` (the noise edge σ̂(√p + √n), or None).

    Returns:
        The matplotlib ``Figure``.
    """
    plt = _pyplot()
    from matplotlib.colors import SymLogNorm
    from matplotlib.patches import Patch

    k = len(names)
    z = np.asarray(z, float)
    module_z = np.asarray(module_z, float).reshape(k, -1)
    colours = [STATUS_COLOURS.get(s, "grey") for s in statuses]
    fig = plt.figure(figsize=(13, 4.2 + 0.18 * k), constrained_layout=True)
    grid = fig.add_gridspec(1, 3, width_ratios=[1.0, 1.3, 1.1])

    ax = fig.add_subplot(grid[0])
    rows = np.arange(k)
    shown = np.where(np.isfinite(z), np.maximum(z, 0.0), 0.0)
    ax.barh(rows, shown, color=colours)
    ax.axvline(z_crit, color="black", ls="--", lw=1)
    ax.text(z_crit, -1.0, f" z_crit = {z_crit:g}", fontsize=8, va="center")
    ax.set_xscale("symlog", linthresh=max(z_crit, 1.0))
    ax.set_yticks(rows, [f"{n} ({s})" for n, s in zip(names, statuses)], fontsize=8)
    ax.set_ylim(k - 0.5, -1.5)
    ax.set_xlabel("pooled refit z (mean over modules; symlog)")
    ax.set_title("clients: pooled z and status", fontsize=10)
    ax.legend(handles=[Patch(color=c, label=s) for s, c in STATUS_COLOURS.items()], fontsize=8, loc="lower right")

    ax = fig.add_subplot(grid[1])
    finite = module_z[np.isfinite(module_z)]
    top = max(float(np.max(np.abs(finite))) if finite.size else 1.0, 10.0)
    image = ax.imshow(module_z, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                      norm=SymLogNorm(linthresh=max(z_crit, 1.0), vmin=-top, vmax=top))
    ax.set_yticks(rows, names, fontsize=8)
    for label, colour in zip(ax.get_yticklabels(), colours):
        label.set_color(colour)
    m = module_z.shape[1]
    step = max(1, m // 16)
    ax.set_xticks(np.arange(0, m, step), [_short(module_names[i]) for i in range(0, m, step)],
                  rotation=60, ha="right", fontsize=7)
    ax.set_title("per-module refit z (clients × modules)", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="z (symlog)")

    ax = fig.add_subplot(grid[2])
    for i, spec in enumerate(spectra):
        values = np.asarray(spec["values"], float)
        # Numerical zeros (rounding, below 1e-5 of the largest) would stretch the log axis.
        values = values[values > 1e-5 * values.max()] if values.size and values.max() > 0 else values[:0]
        if not values.size:
            continue
        line, = ax.semilogy(np.arange(1, values.size + 1), values, ".-", lw=1, ms=3, label=spec["label"])
        r = int(spec["rank"])
        if 0 < r <= values.size:
            ax.plot([r], [values[r - 1]], "o", mfc="none", ms=9, color=line.get_color())
        if spec.get("edge") is not None and np.isfinite(spec["edge"]) and spec["edge"] > 0:
            ax.axhline(spec["edge"], color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("index of singular value")
    ax.set_ylabel("singular value of the benign stack")
    ax.set_title("benign stack spectra\nr̂ circled, noise edge σ̂(√p+√n) dotted", fontsize=10)
    if spectra:
        ax.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _short(name, width=28):
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _edge(sigma, p, n):
    return float(sigma) * (np.sqrt(p) + np.sqrt(max(n, 1)))


def result_figure(result, path=None, *, z_crit=5.0, client_names=None, max_spectra=6):
    """:func:`verdict_figure` of a :class:`~clair_jax.ClairResult` (see :meth:`~clair_jax.ClairResult.plot`)."""
    from clair_jax.lora import LoRAFactors

    k = int(result.client_benign.shape[-1])
    names = list(client_names) if client_names is not None else [f"client {j}" for j in range(k)]
    module_z = np.asarray(result.residual_z, float).reshape(-1, k).T
    modules = [f"problem {i}" for i in range(module_z.shape[1])]
    spectra = np.asarray(result.spectrum, float).reshape(-1, np.shape(result.spectrum)[-1])
    ranks = np.asarray(result.rank).reshape(-1)
    sigma = np.asarray(result.noise_level, float).reshape(-1)
    benign = np.asarray(result.benign).reshape(-1, k)
    p = int(result.subspace.shape[-2])
    refined = result.refined
    columns = int(refined.B.shape[-1] if isinstance(refined, LoRAFactors) else np.shape(refined)[-1]) \
        if refined is not None else 1
    chosen = np.unique(np.linspace(0, len(ranks) - 1, min(max_spectra, len(ranks))).astype(int))
    specs = [dict(label=modules[i] + f" (r̂ {ranks[i]})", values=spectra[i], rank=ranks[i],
                  edge=_edge(sigma[i], p, int(benign[i].sum()) * columns)) for i in chosen]
    return verdict_figure(names, result.statuses(), np.asarray(result.client_z), z_crit, module_z, modules, specs,
                          path)


def report_figure(report, path=None, *, z_crit=None, max_spectra=6):
    """:func:`verdict_figure` of a ``clair aggregate`` report (the dict or its JSON)."""
    clients = report["clients"]
    z_crit = float(report.get("options", {}).get("z_crit", 5.0) if z_crit is None else z_crit)
    modules = [m for g in report["groups"] for m in g["modules"]]
    module_z = np.array([[c["module_z"].get(m, np.nan) for m in modules] for c in clients], float)
    specs = []
    for g in report["groups"]:
        for i in np.unique(np.linspace(0, len(g["modules"]) - 1, min(2, len(g["modules"])))).astype(int):
            spectrum = g.get("spectrum", [None] * len(g["modules"]))[i]
            if spectrum is None:
                continue
            specs.append(dict(label=f"{_short(g['modules'][i], 24)} {tuple(g['shape'])} (r̂ {g['rank'][i]})",
                              values=spectrum, rank=g["rank"][i], edge=g.get("noise_edge", [None] * len(g["modules"]))[i]))
    specs = specs[:max_spectra]
    statuses = [c.get("status", "benign" if c["benign"] else "contaminated") for c in clients]
    return verdict_figure([c["name"] for c in clients], statuses, [c["z"] for c in clients], z_crit, module_z,
                          modules, specs, path)
