"""`openrlhf-bonesoup demo`: the recipe on tiny LMs (OpenRLHF PPO on CPU), or `--analytic`: Theorem 1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openrlhf_bonesoup.errors import BoneSoupError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the recipe on tiny LMs: OpenRLHF PPO on CPU, Bone Soup vs Rewarded Soup")
    p.add_argument("--output", required=True, help="folder for results.json, demo.png, the soups and logs")
    p.add_argument("--steps", type=int, help="PPO steps per backbone (default 24)")  # demo.recipe.STEPS
    p.add_argument("--seed", type=int, default=42, help="training seed (default 42)")
    p.add_argument("--analytic", action="store_true", help="the Theorem 1 check on quadratic rewards instead (4 s)")
    p.add_argument("--beta", type=float, default=0.7, help="--analytic: diagonal of B, in (1/2, 1] (default 0.7)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.analytic:
        return _recipe(args)
    from openrlhf_bonesoup.demo import analytic

    r = analytic.run_demo(args.output, args.beta)
    print(f"quadratic rewards, beta {r['beta']:g}: two soups merged at 101 preferences in {r['seconds']:.1f} s")
    print(f"hypervolume, 11 preferences, reference {r['reference_point']} (this instance): {r['hypervolume']}")
    print(
        f"Bone Soup beats Rewarded Soup for mu_1 in {r['win_interval']} (measured); "
        f"Theorem 1 guarantees [{r['theorem_interval'][0]:.4f}, {r['theorem_interval'][1]:.4f}]"
    )
    for region in r["n3"]:
        print(
            f"n = 3, beta {region['beta']:g}: Bone Soup beats Rewarded Soup wherever min_i mu_i >= "
            f"{region['wins_where_min_mu_at_least']:g} ({region['share_won']:.1%} of {region['points']} preferences)"
        )
    print(f"wrote {Path(args.output) / 'results.json'} and {Path(args.output) / r['plot']}")
    return 0


def _recipe(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup.demo import recipe

    steps = recipe.STEPS if args.steps is None else args.steps
    if steps < 1:
        raise BoneSoupError(f"--steps takes a positive number of PPO steps, got {steps}")
    try:
        r = recipe.run(args.output, steps=steps, seed=args.seed)
    except KeyboardInterrupt:  # the running launch and its processes are ended by then (demo/recipe.py's _run)
        print(f"interrupted; the same command starts again from scratch in {args.output}", file=sys.stderr)
        return 130
    print(f"hypervolume above the SFT policy {[round(v, 4) for v in r['sft']]}: {r['hypervolume']}")
    for name, moved in r["moved"].items():
        print(f"{name}: backbone j raised objective j above the SFT policy: {moved}")
    print(f"done in {r['seconds']:.0f} s. Serve the Bone Soup it trained (any preference per request):")
    print(f"  openrlhf-bonesoup serve --soup_dir {Path(args.output).resolve() / 'bone_soup'}")
    return 0
