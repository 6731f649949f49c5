"""Combiners: raw per-objective values -> the one scalar reward PPO trains on.

A combiner is a weight vector over the n objectives once resolved: `bonesoup` (row j of B(beta)),
`linear` (explicit weights, MORLHF) or `single` (one objective, Rewarded Soup's baseline).
`Combination` normalises each objective (none, fixed {mean, std}, or running statistics) and takes
the weighted sum. During training there is exactly one Combination, in the PPO trainer process, which
sees every sample of a step whichever reward actor or rollout engine scored it; so running statistics
are one global statistic over all samples in order, and a sample's reward never depends on the worker.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from openrlhf_bonesoup import coefficients
from openrlhf_bonesoup.errors import BoneSoupError

COMBINERS = ("bonesoup", "linear", "single")


class Combination:
    """Normalisation and weighted sum over the n objectives of `specs` (parsed objective specs).

    Running statistics (Chan et al.'s parallel update) start empty: mean 0, std 1. Each call with
    update=True first adds the batch to them, then normalises the batch with the updated values.
    """

    def __init__(self, specs: Sequence[dict], weights: Sequence[float]):
        self.names = [s["name"] for s in specs]
        self.how = [s["normalize"] for s in specs]
        self.weights = np.asarray(weights, dtype=np.float64)
        if self.weights.shape != (len(specs),):
            raise BoneSoupError(f"{self.weights.size} combiner weights for {len(specs)} objectives")
        self.count = np.zeros(len(specs))
        self.mean = np.zeros(len(specs))
        self.m2 = np.zeros(len(specs))

    def __call__(self, raw: np.ndarray, update: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """raw (N, n) -> (reward (N,), normalised values (N, n)); update=False leaves the statistics."""
        raw = np.asarray(raw, dtype=np.float64).reshape(-1, len(self.names))
        values = raw.copy()
        for i, how in enumerate(self.how):
            if isinstance(how, dict):
                values[:, i] = (raw[:, i] - how["mean"]) / how["std"]
            elif how == "running":
                if update and raw.shape[0]:
                    n, batch_mean = raw.shape[0], raw[:, i].mean()
                    delta, total = batch_mean - self.mean[i], self.count[i] + n
                    self.mean[i] += delta * n / total
                    self.m2[i] += ((raw[:, i] - batch_mean) ** 2).sum() + delta**2 * self.count[i] * n / total
                    self.count[i] = total
                std = np.sqrt(self.m2[i] / self.count[i]) if self.count[i] > 1 else 1.0
                values[:, i] = (raw[:, i] - self.mean[i]) / max(std, 1e-8)
        return values @ self.weights, values

    def state(self) -> dict:
        """The running statistics, as plain numbers: saved with OpenRLHF's checkpoint (worker.py)."""
        return {
            "names": list(self.names),
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
        }

    def load_state(self, state: dict) -> None:
        """Continue from `state()` of a run with the same objectives (a resumed run)."""
        if state["names"] != self.names:
            raise BoneSoupError(
                f"the checkpoint's running statistics are for objectives {state['names']}, this launch has {self.names}"
            )
        self.count, self.mean, self.m2 = (np.asarray(state[k], dtype=np.float64) for k in ("count", "mean", "m2"))


def combiner_weights(
    combiner: str,
    n: int,
    *,
    beta: float | None = None,
    backbone_index: int | None = None,
    reward_weights: Sequence[float] | None = None,
    objective: int | None = None,
) -> np.ndarray:
    """bonesoup: row backbone_index of B(beta); linear: reward_weights (a point of the simplex, as in
    MORLHF); single: e_objective (Rewarded Soup's per-objective baseline)."""
    given = {"--beta": beta, "--backbone_index": backbone_index, "--reward_weights": reward_weights}
    given["--objective"] = objective
    needs = {"bonesoup": ("--beta", "--backbone_index"), "linear": ("--reward_weights",), "single": ("--objective",)}
    if combiner not in needs:
        raise BoneSoupError(f"unknown reward combiner {combiner!r}; choose one of {', '.join(COMBINERS)}")
    for flag, value in given.items():
        if flag in needs[combiner] and value is None:
            raise BoneSoupError(f"--reward_combiner {combiner} needs {flag}")
        if flag not in needs[combiner] and value is not None:
            raise BoneSoupError(f"{flag} does not apply to --reward_combiner {combiner}")
    if combiner == "bonesoup":
        matrix = coefficients.backbone_matrix(beta, n)
        if not 0 <= backbone_index < n:
            raise BoneSoupError(f"--backbone_index must lie in 0..{n - 1} for {n} objectives, got {backbone_index}")
        # The row as soup.json records B (0.3, not 0.30000000000000004): the same weights in the
        # manifest, the launch's config and the dry run; a 1e-17 difference changes no reward.
        return np.asarray(coefficients.clean(matrix[backbone_index]))
    if combiner == "linear":
        return coefficients.check_preference(reward_weights, n)
    if not 0 <= objective < n:
        raise BoneSoupError(f"--objective must lie in 0..{n - 1} for {n} objectives, got {objective}")
    return np.eye(n)[objective]


def add_reward_arguments(parser: argparse.ArgumentParser) -> None:
    """The combiner flags, shared by the launcher and `openrlhf-bonesoup score` (dotted aliases in
    OpenRLHF 0.11's style)."""
    group = parser.add_argument_group("Bone Soup reward")
    group.add_argument("--reward_combiner", "--reward.combiner", dest="reward_combiner", choices=COMBINERS)
    group.add_argument("--beta", "--reward.beta", dest="beta", type=float, help="bonesoup: diagonal of B(beta)")
    group.add_argument(
        "--backbone_index", "--reward.backbone_index", dest="backbone_index", type=int, help="bonesoup: row j"
    )
    group.add_argument("--reward_weights", "--reward.weights", dest="reward_weights", help="linear: w1,...,wn (sum 1)")
    group.add_argument("--objective", "--reward.objective", dest="objective", type=int, help="single: objective index")
    group.add_argument("--objectives", "--reward.objectives", dest="objectives", help="YAML/JSON objectives file")


def weights_from_args(args: argparse.Namespace, n: int) -> np.ndarray:
    """combiner_weights from the flags of add_reward_arguments."""
    if args.reward_combiner is None:
        raise BoneSoupError("--reward_combiner is required: bonesoup, linear or single")
    reward_weights = None
    if args.reward_weights is not None:
        reward_weights = coefficients.parse_floats(args.reward_weights, "--reward_weights")
    return combiner_weights(
        args.reward_combiner,
        n,
        beta=args.beta,
        backbone_index=args.backbone_index,
        reward_weights=reward_weights,
        objective=args.objective,
    )
