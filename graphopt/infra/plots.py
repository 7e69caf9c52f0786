"""Pictures of a report and of a dependency graph (matplotlib, an optional dependency: ``graphopt[plot]``,
imported only when a picture is drawn).

- :func:`plot_report`: per pass, quality against latency (ratio to the original) and against weight
  size: the trajectory from the original to the result, one point per pass, Pareto-style.
- :func:`plot_groups`: the prunable groups of a model, one bar per group (its units), coloured by unit
  kind and labelled by the modules it couples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..units import MIB
from .metrics import NOISY


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'graphopt[plot]' (or pip install matplotlib)") from None
    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_report(report: Any, path: str | Path) -> Path:
    """Write ``path`` (png/svg/pdf by suffix): quality vs latency ratio and vs weight MiB, per pass."""
    plt = _pyplot()
    rows = [r for r in report.records if r.status in ("baseline", "ok")]
    if not rows:
        raise ValueError("the report has no measured rows to plot")
    name = next((r.quality_name for r in rows if r.quality_name), "")
    quality = [r.quality if r.quality is not None else r.cosine for r in rows]
    if all(q is None for q in quality):
        raise ValueError("the report has no quality figure to plot (run with verify=True)")
    ylabel = name or "output cosine"
    latency = [1.0 if r.status == "baseline" else r.latency_ratio for r in rows]
    size = [None if r.weight_bytes is None else r.weight_bytes / MIB for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xs, xlabel in ((axes[0], latency, "latency, ratio to the original (lower is faster)"),
                           (axes[1], size, "weights, MiB")):
        points = [(x, q, r) for x, q, r in zip(xs, quality, rows) if x is not None and q is not None]
        if not points:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(xlabel)
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color="tab:blue", zorder=1)
        labels: list[tuple[float, float, list[str]]] = []  # passes that leave the point where it was share a label
        for x, q, r in points:
            # on the latency axis, points within the measurement's spread are the same point
            tol = max(0.01, (r.latency_ratio_spread or 0.0) if xs is latency else 0.0) * max(abs(x), 1e-9)
            if labels and abs(labels[-1][0] - x) <= tol and abs(labels[-1][1] - q) < 1e-3:
                labels[-1][2].append(r.text or r.name)
            else:
                labels.append((x, q, [r.text or r.name]))
        noisy = {id(r) for _, _, r in points if xs is latency and (r.latency_ratio_spread or 0.0) > NOISY}
        for i, (x, q, names) in enumerate(labels):
            color = "tab:green" if i == len(labels) - 1 else ("tab:gray" if i == 0 else "tab:blue")
            hollow = any(id(r) in noisy for x2, q2, r in points if (x2, q2) == (x, q))
            ax.scatter([x], [q], s=40, zorder=2, **({"facecolors": "white", "edgecolors": color} if hollow
                                                     else {"color": color}))
            ax.annotate("\n".join(_short(n) for n in names), (x, q), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
        if xs is latency:
            spread = [r.latency_ratio_spread or 0.0 for _, _, r in points]
            ax.errorbar([p[0] for p in points], [p[1] for p in points],
                        xerr=[p[0] * s for p, s in zip(points, spread)], fmt="none", ecolor="tab:blue", alpha=0.4)
        if noisy:
            xlabel += f"\nhollow: spread above {NOISY:.0%}, too noisy to tell from its neighbours"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ylabel} vs the original")
        ax.grid(alpha=0.3)
    fig.suptitle(_short(report.pipeline or "pipeline", 100), fontsize=10)
    return _save(plt, fig, path)


def plot_groups(graph: Any, path: str | Path, *, most: int = 40) -> Path:
    """Write ``path``: one bar per prunable group of ``graph`` (a DependencyGraph), units on the x axis."""
    plt = _pyplot()
    groups = list(graph.groups)[:most]
    if not groups:
        raise ValueError("the model has no prunable group to plot")
    colors = {"head": "tab:orange", "kv-head group": "tab:red", "channel": "tab:blue", "channel block": "tab:cyan",
              "conv group": "tab:purple"}
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(groups) + 1.2))
    labels = [_short(f"{g.id}: {', '.join(g.modules[:2])}{' ...' if len(g.modules) > 2 else ''}", 60)
              for g in groups]
    ax.barh(range(len(groups)), [g.units for g in groups], color=[colors.get(g.unit, "tab:gray") for g in groups])
    ax.set_yticks(range(len(groups)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("prunable units (channels, heads, ...)")
    for unit, color in colors.items():
        if any(g.unit == unit for g in groups):
            ax.bar([0], [0], color=color, label=unit)
    ax.legend(fontsize=8, loc="lower right")
    more = f" (first {most} of {len(graph.groups)})" if len(graph.groups) > most else ""
    ax.set_title(f"{len(graph.groups)} coupled groups{more}", fontsize=10)
    return _save(plt, fig, path)


def plot_front(points: list[tuple[str, float | None, float | None, float]], front: list[str], best: str | None,
               path: str | Path, *, quality_name: str = "quality") -> Path:
    """Write ``path``: a search's measured points, ``(label, quality, speed-up, size)`` each, quality
    against speed-up and against size; the front joined, the best ringed."""
    plt = _pyplot()
    if not points:
        raise ValueError("no measured point to plot")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    on_front = set(front)
    for ax, index, xlabel in ((axes[0], 2, "speed-up over the original (worst timed shape)"),
                              (axes[1], 3, "weight bytes, ratio to the original")):
        shown = [(p[index], p[1], p[0]) for p in points if p[index] is not None and p[1] is not None]
        if not shown:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(xlabel)
            continue
        ax.scatter([x for x, _, _ in shown], [q for _, q, _ in shown], s=22, color="tab:gray", zorder=2)
        line = sorted((x, q) for x, q, name in shown if name in on_front)
        ax.plot([x for x, _ in line], [q for _, q in line], "-o", color="tab:blue", zorder=3, label="front")
        for x, q, name in shown:
            if name == best:
                ax.scatter([x], [q], s=140, facecolors="none", edgecolors="tab:green", linewidths=2, zorder=4,
                           label="best meeting the goal")
            if name in on_front:
                ax.annotate(_short(name, 40), (x, q),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{quality_name} vs the original")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)
