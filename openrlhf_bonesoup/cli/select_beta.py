"""`openrlhf-bonesoup select-beta`: name the beta whose evaluation has the largest hypervolume."""

from __future__ import annotations

import argparse
import json

from openrlhf_bonesoup import coefficients
from openrlhf_bonesoup.coefficients import parse_floats


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "select-beta", help="name the beta whose evaluation (results.json) has the largest hypervolume"
    )
    p.add_argument("results", nargs="+", help="results.json of evaluate, one per beta")
    p.add_argument("--reference", default=None, help="hypervolume reference point (default: common nadir of all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import indicators

    reference = parse_floats(args.reference, "--reference") if args.reference else None
    out = coefficients.clean(indicators.select_beta(args.results, reference))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"hypervolume against {out['reference_point']} ({out['reference_rule']}):")
    for entry in out["runs"]:
        print(f"  beta {entry['beta']:g}: {entry['hypervolume']:.6g}  ({entry['path']})")
    print(f"best: beta {out['best']['beta']:g}")
    return 0
