"""`openrlhf-bonesoup`: one entry point, one sub-command per stage of the method.

Thin on purpose: parse, call the stage's module, report. Every user error (BoneSoupError, or a bad
flag) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from openrlhf_bonesoup import coefficients
from openrlhf_bonesoup.coefficients import BoneSoupError

PROG = "openrlhf-bonesoup"


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage before its error; we promise one line.
    def error(self, message: str):  # type: ignore[override]
        raise BoneSoupError(f"{self.prog}: {message}")


def parse_floats(text: str, what: str) -> list[float]:
    """'0.3,0.7' -> [0.3, 0.7], or a BoneSoupError naming the flag."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise BoneSoupError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _matrix(args: argparse.Namespace, n: int) -> np.ndarray:
    if args.row is not None:
        row = parse_floats(args.row, "--row")
        if len(row) != n:
            raise BoneSoupError(f"--row has {len(row)} entries but the preference has {n}")
        return coefficients.backbone_matrix_from_row(row)
    return coefficients.backbone_matrix(args.beta, n)


def cmd_coefficients(args: argparse.Namespace) -> int:
    mu = parse_floats(args.preference, "--preference")
    matrix = _matrix(args, len(mu))
    lam = coefficients.merge_coefficients(matrix, mu)
    out: dict = {"matrix": matrix.tolist(), "lambda": lam.tolist()}
    if args.alpha is not None:
        weights, sft_weight = coefficients.extrapolation_weights(lam, args.alpha)
        out["lambda_extrapolated"] = weights.tolist()
        out["sft_weight"] = sft_weight
    if args.json:
        print(json.dumps(out))
        return 0
    with np.printoptions(precision=6, suppress=True):
        print(f"B (n = {len(mu)}):\n{matrix}")
        print(f"preference mu: {np.asarray(mu)}")
        print(f"lambda = B^-1 mu: {lam}")
        if args.alpha is not None:
            print(
                f"with alpha = {args.alpha:g}: backbone weights {np.asarray(out['lambda_extrapolated'])}, "
                f"SFT weight {out['sft_weight']:.6g}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Bone Soup for OpenRLHF: backbone rewards, merging, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("coefficients", help="print B and the merge coefficients lambda = B^-1 mu")
    p.add_argument("--beta", type=float, default=0.7, help="diagonal of B, in (1/n, 1] (default 0.7)")
    p.add_argument("--row", default=None, help="explicit first row of a symmetric circulant B (n >= 3)")
    p.add_argument("--preference", required=True, help="preference mu, e.g. 0.3,0.7 (n = its length)")
    p.add_argument("--alpha", type=float, default=None, help="SFT extrapolation strength (>= 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_coefficients)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except BoneSoupError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def main_entry() -> None:
    sys.exit(main())
