"""Pareto fronts and their indicators, all objectives maximised: the numbers evaluate, select-beta and the demos report.

Non-dominated filtering and the hypervolume are moocore's (the maintained C implementation that pymoo's HV
indicator calls), Spearman is scipy's. A front is a results.json-like dict ("mean": points, optionally
"preferences", "objectives", "beta"); nothing here generates, scores or draws.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openrlhf_bonesoup.errors import BoneSoupError

REFERENCE_RULE = "common nadir: per objective, the lowest mean score over every front compared"


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """True for each point that no other point dominates (exact duplicates: the first is kept)."""
    import moocore

    return moocore.is_nondominated(np.asarray(points, dtype=np.float64), maximise=True)


def common_reference(fronts: Sequence[np.ndarray]) -> np.ndarray:
    """The common nadir of several fronts: per objective, the lowest value of any point in any front."""
    return np.min(np.concatenate([np.asarray(f, dtype=np.float64) for f in fronts]), axis=0)


def hypervolume(points: np.ndarray, reference: Sequence[float]) -> float:
    """Volume dominated by `points` and dominating `reference`; points not above it add nothing."""
    import moocore

    points, reference = np.asarray(points, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if reference.shape != points.shape[1:]:
        raise BoneSoupError(f"the reference point needs {points.shape[1]} values, got {reference.tolist()}")
    return float(moocore.hypervolume(points, ref=reference, maximise=True))


def controllability(preferences: np.ndarray, means: np.ndarray) -> list[float | None]:
    """Spearman correlation of objective i's mean score with its weight mu_i, for each i.

    1 means the scores follow the requested trade-off in rank order. None where it is undefined
    (a weight or a score that never changes across the preferences).
    """
    from scipy.stats import ConstantInputWarning, spearmanr

    out = []
    for i in range(means.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            rho = spearmanr(preferences[:, i], means[:, i]).statistic
        out.append(None if not np.isfinite(rho) else float(rho))
    return out


def win_interval(preferences: np.ndarray, ours: np.ndarray, theirs: np.ndarray) -> list[float] | None:
    """[lo, hi] of mu_1 over the longest run of consecutive preferences where mu . ours >= mu . theirs.

    Both fronts must be measured at the same preferences (n = 2, sorted by mu_1). The ends are
    measured preferences; between two of them the scalarised rewards are not measured. None if
    ours never wins. A relative tolerance of 1e-9 absorbs float round-off on exact ties.
    """
    ours_s, theirs_s = (np.sum(preferences * p, axis=1) for p in (ours, theirs))
    wins = ours_s >= theirs_s - 1e-9 * np.maximum(1.0, np.abs(theirs_s))
    best, start = None, None
    for k, win in enumerate([*wins, False]):
        if win and start is None:
            start = k
        elif not win and start is not None:
            if best is None or k - start > best[1] - best[0]:
                best = (start, k)
            start = None
    return None if best is None else [float(preferences[best[0], 0]), float(preferences[best[1] - 1, 0])]


def summarise(preferences: Sequence[Sequence[float]], samples: Sequence[np.ndarray], names: Sequence[str]) -> dict:
    """Per preference the mean and standard error of every objective over its samples, the Pareto
    front of the means and each objective's controllability."""
    from scipy.stats import sem

    prefs = np.asarray(preferences, dtype=np.float64)
    means = np.stack([np.mean(s, axis=0) for s in samples])
    with warnings.catch_warnings():  # one sample has no standard error: recorded as null
        warnings.simplefilter("ignore", RuntimeWarning)
        sems = np.stack([sem(s, axis=0) if len(s) > 1 else np.full(s.shape[1], np.nan) for s in samples])
    return {
        "objectives": list(names),
        "preferences": prefs.tolist(),
        "samples": [len(s) for s in samples],
        "mean": means.tolist(),
        "sem": [[None if not np.isfinite(x) else float(x) for x in row] for row in sems],
        "pareto": pareto_mask(means).tolist(),
        "controllability": dict(zip(names, controllability(prefs, means), strict=True)),
    }


def add_fronts(results: dict, others: dict[str, dict], reference: Sequence[float] | None) -> None:
    """Hypervolume of results' front and of every other front against one reference point, and the
    win interval against each other front measured at the same preferences (n = 2)."""
    fronts = {results["label"]: np.asarray(results["mean"])} | {k: np.asarray(v["mean"]) for k, v in others.items()}
    for name, front in fronts.items():
        if front.ndim != 2 or front.shape[1] != len(results["objectives"]):
            raise BoneSoupError(f"front {name!r} needs points with {len(results['objectives'])} objectives")
    ref = np.asarray(reference, dtype=np.float64) if reference is not None else common_reference(list(fronts.values()))
    results["reference_point"] = ref.tolist()
    results["reference_rule"] = "given (--reference)" if reference is not None else REFERENCE_RULE
    results["hypervolume"] = {name: hypervolume(front, ref) for name, front in fronts.items()}
    prefs = np.asarray(results["preferences"])
    results["win_interval"] = {
        name: win_interval(prefs, np.asarray(results["mean"]), np.asarray(other["mean"]))
        for name, other in others.items()
        if prefs.shape[1] == 2 and same_preferences(other.get("preferences"), prefs)
    }


def same_preferences(a, b) -> bool:
    """Whether two lists of preferences are the same points in the same order."""
    a, b = (np.asarray(x if x is not None else [], dtype=np.float64) for x in (a, b))
    return a.shape == b.shape and np.allclose(a, b)


def load_front(path: str | os.PathLike) -> dict:
    """An evaluation's results.json, or any JSON with "mean": [[r_1, ..., r_n], ...] (MORLHF points)."""
    path = Path(path)
    try:
        front = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BoneSoupError(f"cannot read front {path}: {e}") from None
    if not isinstance(front, dict) or "mean" not in front:
        raise BoneSoupError(f'{path} has no "mean": [[r_1, ..., r_n], ...] list of points')
    return front


def select_beta(paths: Sequence[str | os.PathLike], reference: Sequence[float] | None = None) -> dict:
    """Name the beta whose evaluation has the largest hypervolume.

    The runs must score the same objectives at the same preferences; their hypervolumes are computed
    against one reference point, the common nadir of all runs unless one is given.
    """
    runs = [(Path(p), load_front(p)) for p in paths]
    if len(runs) < 2:
        raise BoneSoupError("select-beta compares at least two evaluations (one results.json per beta)")
    first = runs[0][1]
    for path, run in runs:
        if "beta" not in run:
            raise BoneSoupError(f"{path} records no beta: pass results.json files written by evaluate")
        if run.get("objectives") != first.get("objectives"):
            raise BoneSoupError(
                f"{path} scores objectives {run.get('objectives')}, {runs[0][0]} {first.get('objectives')}"
            )
        if not same_preferences(run.get("preferences"), first.get("preferences")):
            raise BoneSoupError(f"{path} and {runs[0][0]} were evaluated at different preferences")
    betas = [run["beta"] for _, run in runs]
    if len(set(betas)) != len(betas):
        twice = sorted({b for b in betas if betas.count(b) > 1})
        raise BoneSoupError(f"select-beta compares different betas, but beta {twice[0]:g} is given twice")
    fronts = [np.asarray(run["mean"]) for _, run in runs]
    ref = np.asarray(reference, dtype=np.float64) if reference is not None else common_reference(fronts)
    table = [
        {"path": str(path), "beta": run["beta"], "hypervolume": hypervolume(front, ref)}
        for (path, run), front in zip(runs, fronts, strict=True)
    ]
    best = max(table, key=lambda row: row["hypervolume"])
    return {
        "reference_point": ref.tolist(),
        "reference_rule": "given (--reference)" if reference is not None else REFERENCE_RULE.replace("front", "run"),
        "runs": table,
        "best": best,
    }
