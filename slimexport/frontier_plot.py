"""The sweep's picture: fidelity (mean ε error, log scale) against measured speed-up, the Pareto front drawn, each
point labelled; matplotlib without a display (:mod:`slimexport.figures`' Agg setup), written atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from slimexport.figures import _plt, _save

# Marker per target set, colour per allocation: the two grid axes besides the budget (which the labels carry).
MARKERS = "osD^v<>P*X"
ALLOCATION_COLOURS = {"softmax": "C0", "uniform": "C1", "greedy": "C2"}
# Where the log axis puts an error of 0 (a budget of 1 reproduces the dense model to rounding): this far below the
# smallest positive error shown.
ZERO_FLOOR_FACTOR = 0.1


def frontier_figure(frontier: Mapping, path: str | Path) -> Path:
    """``frontier.png`` from ``frontier.json``'s content: one point per grid point with its speed-up's 95% interval
    as a horizontal bar, hollow where the gate failed, the Pareto front as a step line."""
    plt = _plt()
    pts = list(frontier["points"])
    errs = [p["fidelity"]["eps_rel_error_mean"] for p in pts]
    positive = [e for e in errs if isinstance(e, (int, float)) and e > 0]
    floor = min(positive) * ZERO_FLOOR_FACTOR if positive else 1e-6
    sets = sorted({tuple(p["config"]["targets"]) for p in pts}, key=lambda t: (len(t), t))
    cache = frontier.get("cache")
    if cache:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(16, 6))
        _cache_panel(ax2, cache)
    else:
        fig, ax = plt.subplots(figsize=(9, 6))
    for p, e in zip(pts, errs, strict=True):
        y = max(e, floor) if isinstance(e, (int, float)) else floor
        colour = ALLOCATION_COLOURS.get(p["config"]["allocation"], "C3")
        marker = MARKERS[sets.index(tuple(p["config"]["targets"])) % len(MARKERS)]
        ci = p.get("speedup_ci95")
        if ci:
            ax.plot(ci, [y, y], color=colour, lw=1, alpha=0.6)
        ax.scatter([p["speedup"]], [y], s=70 if p["pareto"] else 40, marker=marker, zorder=3,
                   facecolors=colour if p["passed"] else "none", edgecolors="k" if p["pareto"] else colour)
        ax.annotate(f"{p['config']['budget']:g}", (p["speedup"], y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["speedup"])
    if front:
        xs, ys = [], []
        for p in front:  # a staircase: the least error of a point at least this fast, rising at each front point
            y = max(p["fidelity"]["eps_rel_error_mean"], floor)
            if xs:
                xs.append(xs[-1])
                ys.append(y)
            xs.append(p["speedup"])
            ys.append(y)
        ax.plot(xs, ys, color="k", lw=1.2, ls="--", zorder=2, label="Pareto front")
    for t in sets:
        ax.scatter([], [], marker=MARKERS[sets.index(t) % len(MARKERS)], color="grey", label=",".join(t))
    for a in sorted({p["config"]["allocation"] for p in pts}):
        ax.scatter([], [], marker="s", color=ALLOCATION_COLOURS.get(a, "C3"), label=a)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("measured speed-up on the engine (p50 dense / p50 slim; bars: 95% interval)")
    ax.set_ylabel("mean ε relative error vs dense (log)" + (f"; 0 drawn at {floor:.1g}" if any(e == 0 for e in errs) else ""))
    ax.set_title(f"{frontier['model']} on {frontier['backend']} {frontier['dtype']}: labels are budgets "
                 f"({frontier['budget_metric']}); hollow: gate failed", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _cache_panel(ax, cache: Mapping) -> None:
    """Step caching: final-sample error (log) against per-image speed-up, one marker per variant, Pareto front."""
    rows = list(cache["rows"])
    errs = [r["final_rel_error"] for r in rows]
    positive = [e for e in errs if isinstance(e, (int, float)) and e > 0]
    floor = min(positive) * ZERO_FLOOR_FACTOR if positive else 1e-6
    style = {"slim": ("o", "C0"), "cached": ("*", "C3"), "cached+slim": ("D", "C2")}
    for r, e in zip(rows, errs, strict=True):
        y = max(e, floor) if isinstance(e, (int, float)) else floor
        marker, colour = style[r["variant"]]
        ax.scatter([r["speedup"]], [y], s=70 if r["pareto"] else 40, marker=marker, zorder=3,
                   facecolors=colour if r["passed"] else "none", edgecolors="k" if r["pareto"] else colour)
        ax.annotate(r["id"].replace("-b", " ").replace("+cache", "+c"), (r["speedup"], y), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["speedup"])
    if front:
        ax.plot([r["speedup"] for r in front], [max(r["final_rel_error"], floor) for r in front], color="k", lw=1.2, ls="--",
                zorder=2, label="Pareto front")
    for v, (marker, colour) in style.items():
        ax.scatter([], [], marker=marker, color=colour, label={"slim": "slim", "cached": "dense, cached",
                                                                 "cached+slim": "slim, cached"}[v])
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel(f"per-image speed-up ({cache['steps']}-step loops vs dense uncached)")
    ax.set_ylabel("final-sample error vs dense uncached (log)")
    ax.set_title(f"step caching ({cache['describe']}); hollow: gate failed", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")


__all__ = ["frontier_figure"]
