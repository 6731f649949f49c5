"""`openrlhf-bonesoup`: one entry point, one sub-command per stage of the method.

Thin on purpose: parse, call the stage's module, report. Each sub-command is a module here with its
flags beside its handler: `add_parser(subparsers)` adds it (`set_defaults(func=run)`), `run(args)` returns
the exit code. This module holds the parser, `main` and what three or more sub-commands share. Every
user error (BoneSoupError, or a bad flag) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

# Names only: `coefficients` here would be replaced by the sub-command module cli/coefficients.py once imported.
from openrlhf_bonesoup.coefficients import backbone_matrix, backbone_matrix_from_row, parse_floats
from openrlhf_bonesoup.errors import BoneSoupError, Parser

PROG = "openrlhf-bonesoup"
ILL_CONDITIONED = 50.0  # condition number of B above which lambda is worth a warning (B(0.7), n = 2: 2.5)


def matrix_from_flags(args: argparse.Namespace, n: int) -> np.ndarray:
    """B from --beta or --row (coefficients, soup init, merge and serve), with a warning when ill-conditioned."""
    if args.row is not None:
        if args.beta is not None:
            raise BoneSoupError("give --beta or --row, not both (--row sets the whole first row of B)")
        row = parse_floats(args.row, "--row")
        if len(row) != n:
            raise BoneSoupError(f"--row has {len(row)} entries but the preference has {n}")
        matrix = backbone_matrix_from_row(row)
    else:
        matrix = backbone_matrix(0.7 if args.beta is None else args.beta, n)
    condition = np.linalg.cond(matrix)
    if condition > ILL_CONDITIONED:
        print(
            f"{PROG}: warning: B has condition number {condition:.3g}: lambda = B^-1 mu is large and changes "
            "fast with mu (beta close to 1/n, or a --row close to uniform)",
            file=sys.stderr,
        )
    return matrix


def quiet_model_loading() -> None:
    """score, evaluate and merge --alpha auto load models: transformers' "Loading weights" bar per model,
    OpenRLHF's INFO lines and DeepSpeed's no-GPU notice (these commands choose their device themselves)
    would bury the command's own lines. Warnings, errors and download bars still show, except vLLM's own
    platform notes (vLLM 0.32 warns on every import that its CPU build's triton has no CPU backend): vLLM
    logs from ERROR up unless VLLM_LOGGING_LEVEL says otherwise, as in `serve`. That note is logged before
    vLLM configures its logging, so its logger's level is set here too."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # read once, when vllm is first imported
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    import huggingface_hub.utils
    import transformers

    from openrlhf_bonesoup.integration.launcher import quiet_deepspeed

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()  # the line above turned the hub's off too
    logging.disable(logging.INFO)
    quiet_deepspeed()


def _negative_values_attached(argv: Sequence[str]) -> list[str]:
    """`--preference -0.3,1.3` as `--preference=-0.3,1.3`: argparse takes a value that starts with '-'
    and is not a plain number for an option, and says "expected one argument"."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"-\.?\d", token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def build_parser() -> argparse.ArgumentParser:
    # Imported here: the sub-command modules import this package's shared helpers at their top.
    from openrlhf_bonesoup.cli import coefficients, demo, evaluate, merge, score, select_beta, serve, soup, tiny

    parser = Parser(prog=PROG, description="Bone Soup for OpenRLHF: backbone rewards, merging, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (coefficients, merge, serve, score, evaluate, select_beta, soup, demo, tiny):
        command.add_parser(sub)  # in this order in --help
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(_negative_values_attached(argv))
        return args.func(args)
    except (BoneSoupError, OSError) as e:  # OSError: an unwritable or missing folder, a full disk
        print(f"{getattr(e, 'prog', PROG)}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the commands clean up on the way out (merge: no partial output)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def main_entry() -> None:
    code = main()
    # Python's shutdown garbage-collects every object, which takes ~0.5 s once torch is imported;
    # frozen objects are skipped (the OS frees the memory). Streams still flush and files close.
    # Not once triton is loaded (OpenRLHF's imports bring it): its nanobind module reports every frozen
    # object as a leak at exit, 30 lines of noise.
    if "triton" not in sys.modules:
        gc.freeze()
    sys.exit(code)
