"""The plot of Pareto fronts on a matplotlib Axes: evaluate's pareto.png and both demos' figures.

The caller makes the figure and saves it (matplotlib's Agg backend, no display); this module draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from openrlhf_bonesoup.indicators import pareto_mask


def plot_fronts(
    ax,
    fronts: dict[str, dict],
    names: Sequence[str],
    reference: Sequence[float] | None = None,
    reference_label: str = "reference point",
) -> dict[str, dict]:
    """Draw Pareto fronts on a matplotlib Axes (objectives 1 and 2) and return what was drawn.

    fronts: label -> {"mean": points (K, n), "preferences": (K, n), optional}, so an evaluation's
    results.json goes in as it is, and several together (Bone Soup, Rewarded Soup). Per front the
    non-dominated points are filled and joined in the order of objective 1 (the preference order
    zigzags wherever the models do), dominated points hollow, each point labelled with its mu when
    given. reference (the hypervolume's, or the SFT policy's scores) is a black cross.
    Returns label -> {"front": [[x, y], ...] as joined, "dominated": [[x, y], ...], "labels": [...]}.
    """
    drawn = {}
    for label, front in fronts.items():
        points = np.asarray(front["mean"], dtype=np.float64)[:, :2]
        mask = pareto_mask(points)  # in the two objectives drawn: the front the eye sees
        order = np.flatnonzero(mask)[np.argsort(points[mask, 0], kind="stable")]
        (line,) = ax.plot(*points[order].T, marker="o", markersize=5, linewidth=1.2, label=label)
        if not mask.all():  # hollow, not joined
            color = line.get_color()
            ax.plot(*points[~mask].T, "o", ms=5, mfc="none", color=color, label=f"{label} (dominated)")
        prefs = front.get("preferences")
        labeled = prefs is not None and len(prefs) == len(points)
        labels = [",".join(f"{x:g}" for x in mu) for mu in prefs] if labeled else []
        for text, point in zip(labels, points, strict=False):  # no labels, or one per point
            ax.annotate(text, point, textcoords="offset points", xytext=(3, 3), fontsize=6, color=line.get_color())
        drawn[label] = {"front": points[order].tolist(), "dominated": points[~mask].tolist(), "labels": labels}
    if reference is not None:
        ax.plot(*reference[:2], marker="x", markersize=8, color="black", linestyle="none", label=reference_label)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return drawn
