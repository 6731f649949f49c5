"""`openrlhf-bonesoup tiny`: tiny local models, objectives and prompts for a `--cpu` rehearsal launch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openrlhf_bonesoup.errors import BoneSoupError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tiny", help="build tiny local models, objectives and prompts for a --cpu rehearsal launch"
    )
    p.add_argument("--output", required=True, help="a new folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise BoneSoupError(f"{args.output} exists and is not empty: give a new folder")
    import contextlib

    import transformers

    from openrlhf_bonesoup.demo import tiny

    # Only the commands on stdout: OpenRLHF and DeepSpeed log there when imported; no loading bars.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with contextlib.redirect_stdout(sys.stderr):
        paths = tiny.make_rehearsal(out)
    print(f"tiny models, three objectives and prompts in {out}. Train the three backbones on this CPU")
    print(f"(2 PPO steps each); the last launch merges three preferences into {out}/soup/merged:")
    print(tiny.rehearsal_command(paths, out))
    return 0
