"""`openrlhf-bonesoup coefficients`: print B and the merge coefficients lambda = B^-1 mu."""

from __future__ import annotations

import argparse
import json

import numpy as np

from openrlhf_bonesoup import coefficients
from openrlhf_bonesoup.cli import matrix_from_flags
from openrlhf_bonesoup.coefficients import parse_floats


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("coefficients", help="print B and the merge coefficients lambda = B^-1 mu")
    p.add_argument("--beta", type=float, default=None, help="diagonal of B, in (1/n, 1] (default 0.7)")
    p.add_argument("--row", default=None, help="explicit first row of a symmetric circulant B (n >= 3)")
    p.add_argument("--preference", required=True, help="preference mu, e.g. 0.3,0.7 (n = its length)")
    p.add_argument("--alpha", type=float, default=None, help="SFT extrapolation strength (>= 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    mu = parse_floats(args.preference, "--preference")
    matrix = matrix_from_flags(args, len(mu))
    lam = coefficients.merge_coefficients(matrix, mu)
    out: dict = {"matrix": matrix.tolist(), "lambda": lam.tolist()}
    if args.alpha is not None:
        weights, sft_weight = coefficients.extrapolation_weights(lam, args.alpha)
        out["lambda_extrapolated"] = weights.tolist()
        out["sft_weight"] = sft_weight
    out = {k: coefficients.clean(v) for k, v in out.items()}
    if args.json:
        print(json.dumps(out))
        return 0
    with np.printoptions(precision=6, suppress=True):
        print(f"B (n = {len(mu)}):\n{matrix}")
        print(f"preference mu: {np.asarray(mu)}")
        print(f"lambda = B^-1 mu: {np.asarray(out['lambda'])}")
        if args.alpha is not None:
            print(
                f"with alpha = {args.alpha:g}: backbone weights {np.asarray(out['lambda_extrapolated'])}, "
                f"SFT weight {out['sft_weight']:.6g}"
            )
    return 0
