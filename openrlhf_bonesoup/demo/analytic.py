"""The CPU demo: the paper's Theorem 1 setting, run through the real soup, merge and evaluation code.

Two quadratic rewards r_i(theta) = -(theta - c_i)^T A_i (theta - c_i): everything PPO would find is
known in closed form (`optimum`), so Rewarded Soup's ingredients, Bone Soup's backbones and the MORLHF
oracle are exact. They are written as safetensors checkpoints into two real soups, merged for 101
preferences by the merge engine and scored by reading theta back. What it proves, and what it only
shows on its stated instance: docs/demo.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openrlhf_bonesoup import indicators, plot, soup
from openrlhf_bonesoup.coefficients import backbone_matrix, clean, preference_grid
from openrlhf_bonesoup.errors import BoneSoupError

FORMAT = "openrlhf-bonesoup/demo/v1"
MARKER = ".openrlhf-bonesoup-demo"  # written before anything else: an interrupted demo's folder is still a demo's
# Our stated instance: each objective is 10x more sensitive to the coordinate the other one wants.
CENTERS = [[1.0, 0.0], [0.0, 1.0]]
CURVATURES = [[1.0, 10.0], [10.0, 1.0]]
NAMES = ["r1", "r2"]
GRID = 11  # the paper's preference grid, for hypervolumes
FINE = 101  # preferences merged and measured, for the win interval (step 0.01)


def rewards(theta: np.ndarray, centers=CENTERS, curvatures=CURVATURES) -> np.ndarray:
    """(..., n) values r_i(theta) = -sum_d A_i[d] (theta[d] - c_i[d])^2 of thetas of shape (..., dim)."""
    c, a = np.asarray(centers), np.asarray(curvatures)
    return -np.sum(a * (np.asarray(theta)[..., None, :] - c) ** 2, axis=-1)


def optimum(weights: Sequence[float], centers=CENTERS, curvatures=CURVATURES) -> np.ndarray:
    """argmax_theta sum_i w_i r_i(theta) = (sum_i w_i A_i)^-1 sum_i w_i A_i c_i (A_i diagonal)."""
    w, c, a = np.asarray(weights)[:, None], np.asarray(centers), np.asarray(curvatures)
    return np.sum(w * a * c, axis=0) / np.sum(w * a, axis=0)


def theorem_interval(beta: float) -> list[float]:
    """Theorem 1's interval of mu_1 where Bone Soup is at least as good as Rewarded Soup."""
    s = np.sqrt(2 * beta**2 - 2 * beta + 1)
    return [float((1 - s) / 2), float((1 + s) / 2)]


# n = 3: each objective wants its own coordinate and is 10x more sensitive to the two the others want.
CENTERS_3 = np.eye(3).tolist()
CURVATURES_3 = (np.full((3, 3), 10.0) - 9.0 * np.eye(3)).tolist()


def win_region_n3(beta: float, step: float = 0.02) -> dict:
    """n = 3, closed form: where on a simplex grid Bone Soup's merge beats Rewarded Soup's (mu . r).

    The analogue of n = 2's interval: the smallest t such that Bone Soup wins at every grid preference
    with min_i mu_i >= t (n = 2's interval [lo, 1 - lo] is min(mu) >= lo), and the share of the grid won.
    """
    from openrlhf_bonesoup.coefficients import merge_coefficients

    c, a = CENTERS_3, CURVATURES_3
    matrix = backbone_matrix(beta, 3)
    bone = np.stack([optimum(row, c, a) for row in matrix])
    k = round(1 / step)
    grid = np.array([(i, j, k - i - j) for i in range(k + 1) for j in range(k + 1 - i)]) / k
    wins = []
    for mu in grid:
        theta_bone = merge_coefficients(matrix, mu) @ bone
        theta_rs = mu @ np.asarray(c)  # Rewarded Soup: sum_i mu_i c_i, each ingredient the optimum of r_i
        wins.append(mu @ rewards(theta_bone, c, a) >= mu @ rewards(theta_rs, c, a) - 1e-12)
    wins, low = np.asarray(wins), grid.min(axis=1)
    losing = low[~wins]
    threshold = float(losing.max() + step) if losing.size else 0.0
    return {"beta": float(beta), "step": step, "wins_where_min_mu_at_least": round(threshold, 6),
            "share_won": float(wins.mean()), "points": len(grid)}  # fmt: skip


def _soup(folder: Path, beta: float, rows: np.ndarray) -> None:
    """A soup folder whose backbone j is the optimum of sum_i rows[j, i] r_i, saved as safetensors."""
    from safetensors.numpy import save_file

    objectives = [
        {"name": name, "kind": "quadratic", "center": c, "curvature": a}
        for name, c, a in zip(NAMES, CENTERS, CURVATURES, strict=True)
    ]
    soup.init_soup(folder, objectives=objectives, beta=beta, matrix=rows, sft=None)
    for j, row in enumerate(rows):
        checkpoint = folder / f"backbone{j}"
        checkpoint.mkdir(parents=True)
        save_file({"theta": optimum(row).astype(np.float32)}, str(checkpoint / "model.safetensors"))
        soup.register_backbone(folder, j, status="trained", checkpoint=checkpoint)


def _merged_rewards(folder: Path, preferences: list[list[float]]) -> np.ndarray:
    """Merge the soup at every preference with the real engine; r of each merged theta, (K, n)."""
    from safetensors.numpy import load_file

    from openrlhf_bonesoup.merge import merge_soup, sweep_outputs

    manifest = soup.read_soup(folder)
    outputs = sweep_outputs(folder / "merged", preferences)
    models = merge_soup(soup.trained_backbones(manifest), manifest["matrix"], preferences, outputs, progress=False)
    return np.stack([rewards(load_file(str(m / "model.safetensors"))["theta"].astype(np.float64)) for m in models])


def _prepare(output: Path) -> None:
    # Rerunning into the same folder replaces an earlier demo, finished or interrupted (its marker is
    # written first); anything else is never deleted.
    if output.exists() and any(output.iterdir()):
        try:
            previous = json.loads((output / "results.json").read_text()).get("format")
        except (OSError, json.JSONDecodeError, AttributeError):
            previous = None
        if previous != FORMAT and not (output / MARKER).is_file():
            raise BoneSoupError(f"{output} is not empty and holds no earlier demo: choose a new --output")
        for name in ("bone_soup", "rewarded_soup"):
            shutil.rmtree(output / name, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text(FORMAT + "\n")


def run_demo(output: str | os.PathLike, beta: float = 0.7) -> dict:
    """Build, merge and evaluate both soups; write output/results.json and output/demo.png."""
    start = time.perf_counter()
    output = Path(output)
    matrix = backbone_matrix(beta, 2)  # validates beta
    _prepare(output)
    fine = [mu.tolist() for mu in preference_grid(FINE)]
    coarse = [round(k * (FINE - 1) / (GRID - 1)) for k in range(GRID)]  # the 11-point grid inside the fine one
    prefs = np.asarray(fine)

    bone_dir, rewarded_dir = output / "bone_soup", output / "rewarded_soup"
    _soup(bone_dir, beta, matrix)
    _soup(rewarded_dir, 1.0, backbone_matrix(1.0, 2))
    bone, rewarded = _merged_rewards(bone_dir, fine), _merged_rewards(rewarded_dir, fine)
    oracle = rewards(np.stack([optimum(mu) for mu in fine]))

    fronts = {"bone_soup": bone[coarse], "rewarded_soup": rewarded[coarse], "morlhf": oracle[coarse]}
    ref = indicators.common_reference(list(fronts.values()))
    measured = indicators.win_interval(prefs, bone, rewarded)
    theorem = theorem_interval(beta)
    results = {
        "format": FORMAT,
        "instance": {
            "rewards": "r_i(theta) = -sum_d a_i[d] (theta[d] - c_i[d])^2",
            "centers": CENTERS,
            "curvatures": CURVATURES,
            "source": "stated instance of this demo (the paper's Theorem 1 setting)",
        },
        "beta": float(beta),
        "hypervolume": {name: indicators.hypervolume(front, ref) for name, front in fronts.items()},
        "hypervolume_preferences": prefs[coarse].tolist(),
        "reference_point": ref.tolist(),
        "reference_rule": indicators.REFERENCE_RULE,
        "win_interval": measured,
        "win_interval_step": 1 / (FINE - 1),
        "theorem_interval": theorem,
        "win_contains_theorem": measured is not None and measured[0] <= theorem[0] and theorem[1] <= measured[1],
        "controllability": {
            name: dict(zip(NAMES, indicators.controllability(prefs, front), strict=True))
            for name, front in (("bone_soup", bone), ("rewarded_soup", rewarded))
        },
        "claims": {
            "guaranteed": "Theorem 1: mu . r(Bone Soup) >= mu . r(Rewarded Soup) for mu_1 in theorem_interval, "
            "on every instance; win_interval is where it was measured here (101 merged preferences)",
            "this_instance": "hypervolume: Bone Soup above Rewarded Soup on this instance; not on every instance",
        },
        "fronts": {name: front.tolist() for name, front in fronts.items()},
        "n3": [win_region_n3(b) for b in (0.6, 0.7, 0.8)],
        "soups": {"bone_soup": str(bone_dir), "rewarded_soup": str(rewarded_dir)},
        "plot": "demo.png",
    }
    _plot(output / "demo.png", results, prefs, bone, rewarded)
    results["seconds"] = round(time.perf_counter() - start, 2)
    results = clean(results)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _plot(path: Path, results: dict, prefs: np.ndarray, bone: np.ndarray, rewarded: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    hv = results["hypervolume"]
    labels = {
        "bone_soup": f"Bone Soup (beta {results['beta']:g})",
        "rewarded_soup": "Rewarded Soup",
        "morlhf": "MORLHF oracle",
    }
    # The oracle first, so that the Bone Soup points (often on it) are drawn on top.
    fronts = {labels[k]: {"mean": v} for k, v in reversed(results["fronts"].items())}
    plot.plot_fronts(left, fronts, NAMES, results["reference_point"], "HV reference point")
    left.set_title(
        "Fronts at 11 preferences; hypervolume (this instance):\n"
        + ", ".join(f"{labels[k]} {v:.1f}" for k, v in hv.items()),
        fontsize=9,
    )

    gain = np.sum(prefs * bone, axis=1) - np.sum(prefs * rewarded, axis=1)
    right.plot(prefs[:, 0], gain, color="C0", label="mu . r(Bone Soup) - mu . r(Rewarded Soup)")
    right.axhline(0, color="black", linewidth=0.8)
    lo, hi = results["theorem_interval"]
    right.axvspan(lo, hi, color="C2", alpha=0.15, label=f"theorem interval [{lo:.3f}, {hi:.3f}]")
    if results["win_interval"] is not None:
        for x in results["win_interval"]:
            right.axvline(x, color="C3", linestyle="--", linewidth=1)
        right.plot(
            [],
            [],
            color="C3",
            linestyle="--",
            label="measured win interval [{:.2f}, {:.2f}]".format(*results["win_interval"]),
        )
    right.set_xlabel("mu_1 (weight of r1)")
    right.set_ylabel("scalarised reward difference")
    right.set_title("Where Bone Soup beats Rewarded Soup (guaranteed inside the theorem interval)", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
