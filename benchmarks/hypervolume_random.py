"""How often Bone Soup's hypervolume beats Rewarded Soup's on random quadratic instances (the CPU demo's
setting, closed forms, no files): the figure docs/demo.md quotes, reproducible with

    .venv/bin/python benchmarks/hypervolume_random.py [--instances 200] [--beta 0.7] [--seed 0]

Per dimension d in {1, 2, 5}: centres c_i ~ N(0, 1)^d, curvatures A_i = diag(exp N(0, 1)^d); both soups
at the paper's 11 preferences; hypervolume against the two fronts' common nadir (indicators.py's rule).
"""

from __future__ import annotations

import argparse

import numpy as np

from openrlhf_bonesoup import indicators
from openrlhf_bonesoup.coefficients import backbone_matrix, merge_coefficients, preference_grid
from openrlhf_bonesoup.demo import analytic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--beta", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    matrix, grid = backbone_matrix(args.beta, 2), preference_grid(11)
    for dim in (1, 2, 5):
        wins = 0
        for _ in range(args.instances):
            c, a = rng.normal(size=(2, dim)), np.exp(rng.normal(size=(2, dim)))
            thetas = [analytic.optimum(row, c, a) for row in matrix]
            lambdas = [merge_coefficients(matrix, mu) for mu in grid]
            bone = np.array([analytic.rewards(lam[0] * thetas[0] + lam[1] * thetas[1], c, a) for lam in lambdas])
            rewarded = np.array([analytic.rewards(mu[0] * c[0] + mu[1] * c[1], c, a) for mu in grid])
            ref = indicators.common_reference([bone, rewarded])
            wins += indicators.hypervolume(bone, ref) > indicators.hypervolume(rewarded, ref)
        print(f"beta {args.beta:g}, dimension {dim}: Bone Soup's hypervolume larger on {wins} of {args.instances}")


if __name__ == "__main__":
    main()
