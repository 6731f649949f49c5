"""`openrlhf-bonesoup soup init|register|show` (and `register` at the top level): a soup folder by hand.

Makes, fills and shows soup.json without the training launcher.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from openrlhf_bonesoup import objectives
from openrlhf_bonesoup.cli import PROG, matrix_from_flags
from openrlhf_bonesoup.errors import Parser


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "soup", help="make, fill and show a soup folder (soup.json) without the training launcher"
    )
    soup_sub = p.add_subparsers(dest="soup_command", required=True, parser_class=Parser)
    q = soup_sub.add_parser("init", help="create soup.json: objectives, B, SFT model")
    q.add_argument("--soup_dir", "--soup.dir", dest="soup_dir", required=True, help="the soup folder")
    q.add_argument("--objectives", required=True, help="objectives spec: RM paths A,B or a YAML/JSON file")
    q.add_argument(
        "--beta", type=float, default=None, help="diagonal of B, in (1/n, 1] (default 0.7; 1: Rewarded Soup)"
    )
    q.add_argument("--row", default=None, help="explicit first row of a symmetric circulant B (n >= 3)")
    q.add_argument("--sft", required=True, help="the SFT checkpoint every backbone was trained from")
    q.set_defaults(func=run_init)
    _register_flags(soup_sub.add_parser("register", help="register a trained backbone (recovery after a failed hook)"))
    q = soup_sub.add_parser("show", help="print a soup's objectives, B, SFT model and backbones")
    q.add_argument("--soup_dir", "--soup.dir", dest="soup_dir", required=True, help="the soup folder")
    q.add_argument("--json", action="store_true", help="print soup.json as it is")
    q.set_defaults(func=run_show)
    # `register` is `soup register`, also at the top level where the post-training hook's errors point.
    _register_flags(subparsers.add_parser("register", help="= soup register: register a trained backbone checkpoint"))


def _register_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--soup_dir", "--soup.dir", dest="soup_dir", required=True, help="the soup folder")
    p.add_argument("--backbone_index", type=int, required=True, help="j: the row of B it was trained on")
    p.add_argument("--checkpoint", required=True, help="its final checkpoint (--ckpt.output_dir of the run)")
    p.set_defaults(func=run_register)


def run_init(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import soup

    specs = objectives.parse_objectives(args.objectives)
    objectives.check_models(specs)  # config.json and safetensors headers: no weights loaded
    sft = soup.checkpoint_path(args.sft, "--sft")  # absolute: merges read it from anywhere
    matrix = matrix_from_flags(args, len(specs))
    manifest = soup.init_soup(args.soup_dir, objectives=specs, beta=float(matrix[0, 0]), matrix=matrix, sft=sft)
    print(f"soup {Path(args.soup_dir) / soup.MANIFEST}: {manifest['n']} objectives {[o['name'] for o in specs]}")
    print(
        f"register each trained backbone j: {PROG} soup register --soup_dir {args.soup_dir} --backbone_index j "
        "--checkpoint PATH"
    )
    return 0


def run_register(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import hook, soup

    soup.checkpoint_path(args.checkpoint, "--checkpoint")  # a policy checkpoint, from its config.json
    entry = hook.register_checkpoint(args.soup_dir, args.backbone_index, args.checkpoint)["backbones"][
        args.backbone_index
    ]
    print(
        f"backbone {args.backbone_index} of {args.soup_dir}: trained, {entry['checkpoint']} ({entry['bytes']} bytes, "
        f"sha256 of headers and samples {entry['sha256_headers_and_samples'][:16]}...)"
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import soup

    manifest = soup.read_soup(args.soup_dir)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"soup {Path(args.soup_dir) / soup.MANIFEST} (created {manifest.get('created')})")
    for i, o in enumerate(manifest["objectives"]):
        where = o.get("path") or o.get("url")
        print(f"  objective {i}: {o['name']} ({o['kind']}: {where}, normalize {o['normalize']})")
    with np.printoptions(precision=6, suppress=True):
        print(f"  beta {manifest['beta']:g}, B =\n{np.asarray(manifest['matrix'])}")
    print(f"  SFT model: {manifest.get('sft')}")
    for j, entry in enumerate(manifest["backbones"]):
        entry = entry or {}
        where = entry.get("checkpoint") or entry.get("output_dir") or "-"
        print(f"  backbone {j}: {entry.get('status', 'missing')}, {where}")
        if "pending_launch" in entry:  # a relaunch that has not registered a new checkpoint (yet)
            print(f"    relaunched to {entry['pending_launch'].get('output_dir', '-')}: the checkpoint above stays")
    ready = soup.trained_backbones(manifest) is not None
    print(f"  ready to merge: {'yes' if ready else 'no (every backbone must be trained)'}")
    return 0
