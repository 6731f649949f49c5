"""`openrlhf-bonesoup evaluate`: merge a soup at each preference, generate, score: front, hypervolume, plot.

Also the flags and the --alpha value that `merge --alpha auto` shares with it (it generates alike).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from openrlhf_bonesoup import coefficients
from openrlhf_bonesoup.cli import quiet_model_loading
from openrlhf_bonesoup.coefficients import parse_floats
from openrlhf_bonesoup.errors import BoneSoupError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="merge a soup at each preference, generate, score: front, hypervolume, plot"
    )
    p.add_argument("--soup_dir", required=True, help="a soup folder whose soup.json lists all n backbones as trained")
    prefs = p.add_mutually_exclusive_group(required=True)
    prefs.add_argument("--grid", type=int, help="n = 2: K evenly spaced preferences (0,1) ... (1,0); the paper uses 11")
    prefs.add_argument("--preferences", help="explicit preferences, e.g. '0,1;0.5,0.5;1,0'")
    p.add_argument("--prompts", required=True, help="JSONL of prompts (key: --data.input_key)")
    p.add_argument(
        "--objectives", default=None, help="objectives spec (RM paths A,B or a YAML/JSON file); default: the soup's own"
    )
    p.add_argument("--output", required=True, help="folder for results.json, results.csv, pareto.png, models/")
    p.add_argument("--alpha", default="0", help="SFT extrapolation strength, or 'auto': the reference's search")
    p.add_argument("--alpha_prompts", default=None, help="JSONL validation split for --alpha auto")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        help="LABEL=RESULTS_JSON of another soup or MORLHF points to overlay (repeatable)",
    )
    p.add_argument("--reference", default=None, help="hypervolume reference point r1,r2,... (default: common nadir)")
    p.add_argument("--label", default=None, help="name of this soup in plots and results (default: bone_soup)")
    add_generation_flags(p)
    p.add_argument(
        "--overwrite", action="store_true", help="start again in --output (without it, the same command resumes)"
    )
    p.add_argument("--workers", type=int, default=1, help="merge processes")
    p.set_defaults(func=run)


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    # evaluate and merge --alpha auto read prompts and sample alike: one definition of the flags.
    p.add_argument("--data.input_key", dest="input_key", default="input", help="JSON key of the prompt")
    p.add_argument("--data.input_template", dest="input_template", default=None, help='e.g. "User: {}\\nAssistant: "')
    p.add_argument("--data.apply_chat_template", dest="apply_chat_template", action="store_true")
    p.add_argument("--data.max_samples", dest="max_samples", type=int, default=None, help="first N prompts only")
    p.add_argument("--eval.max_new_tokens", dest="max_new_tokens", type=int, default=128)
    p.add_argument("--eval.temperature", dest="temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--eval.top_p", dest="top_p", type=float, default=0.9)
    p.add_argument("--eval.seed", dest="seed", type=int, default=42)
    p.add_argument("--eval.batch_size", dest="batch_size", type=int, default=8, help="transformers and scoring batch")
    p.add_argument("--vllm.gpu_memory_utilization", dest="gpu_memory_utilization", type=float, default=0.6)
    p.add_argument(
        "--eval.backend", dest="backend", choices=["auto", "vllm", "transformers"], default="auto",
        help="generation: vLLM (one engine, weights reloaded per preference) when installed, else transformers",
    )  # fmt: skip
    p.add_argument(
        "vllm_flags", nargs="*", metavar="-- VLLM_FLAGS",
        help="after --: vLLM engine flags for generation (e.g. -- --tensor-parallel-size 8 --dtype bfloat16)",
    )  # fmt: skip


def parse_alpha(text: str) -> float | str:
    """--alpha of evaluate and merge: a number, or 'auto' (the reference's search)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise BoneSoupError(f"--alpha takes a number >= 0 or 'auto', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import evaluate, generation, soup  # torch, transformers: loaded by this sub-command only

    quiet_model_loading()
    preferences = coefficients.preference_sweep(soup.read_soup(args.soup_dir)["n"], args.grid, args.preferences)
    compare = {}
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise BoneSoupError(f"--compare takes LABEL=RESULTS_JSON, got {item!r}")
        compare[label] = path
    results = evaluate.evaluate(
        args.soup_dir,
        preferences,
        args.prompts,
        args.output,
        objectives=args.objectives,
        alpha=parse_alpha(args.alpha),
        alpha_prompts=args.alpha_prompts,
        data={k: getattr(args, k) for k in evaluate.DATA},
        sampling={k: getattr(args, k) for k in generation.SAMPLING},
        compare=compare,
        reference=parse_floats(args.reference, "--reference") if args.reference else None,
        label=args.label,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    names = results["objectives"]
    print(f"{results['label']} (beta {results['beta']:g}, alpha {results['alpha']}), {results['backend']} generation:")
    for mu, mean, err in zip(results["preferences"], results["mean"], results["sem"], strict=True):
        cells = [
            f"{x} {m:.4g} +- {'n/a' if e is None else format(e, '.2g')}"
            for x, m, e in zip(names, mean, err, strict=True)
        ]
        print(f"  mu {[round(v, 4) for v in mu]}: " + ", ".join(cells))
    print(f"hypervolume (reference point {results['reference_point']}): {results['hypervolume']}")
    print(f"controllability (Spearman, score vs weight): {results['controllability']}")
    print(f"wrote {Path(args.output) / 'results.json'}, results.csv, pareto.png")
    return 0
