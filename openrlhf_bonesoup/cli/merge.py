"""`openrlhf-bonesoup merge`: merge backbone checkpoints for one or more preferences (streamed, atomic)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from openrlhf_bonesoup import coefficients, objectives
from openrlhf_bonesoup.cli import matrix_from_flags, quiet_model_loading
from openrlhf_bonesoup.cli.evaluate import add_generation_flags, parse_alpha
from openrlhf_bonesoup.coefficients import parse_floats
from openrlhf_bonesoup.errors import BoneSoupError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="merge backbone checkpoints for one or more preferences (streamed, atomic)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backbones", help="comma-separated backbone checkpoints P0,P1,... in the row order of B")
    src.add_argument("--soup_dir", help="a soup folder whose soup.json lists all n backbones as trained")
    p.add_argument("--beta", type=float, default=None, help="diagonal of B, in (1/n, 1] (default 0.7)")
    p.add_argument("--row", default=None, help="explicit first row of a symmetric circulant B (n >= 3)")
    prefs = p.add_mutually_exclusive_group(required=True)
    prefs.add_argument("--preference", help="one preference, e.g. 0.3,0.7: --output is the merged checkpoint")
    prefs.add_argument("--preferences", help="a sweep, e.g. '0,1;0.5,0.5;1,0': one --output sub-folder each")
    prefs.add_argument("--grid", type=int, help="n = 2: a sweep over K evenly spaced preferences (0,1) ... (1,0)")
    p.add_argument("--sft", default=None, help="SFT checkpoint for --alpha (default: the soup's SFT model)")
    p.add_argument("--alpha", default="0", help="extrapolation away from SFT: (1+a) theta - a theta_sft; or 'auto'")
    p.add_argument("--alpha_prompts", default=None, help="--alpha auto: JSONL validation split (key --data.input_key)")
    p.add_argument("--objectives", default=None, help="--alpha auto: objectives spec (default: the soup's)")
    add_generation_flags(p)  # --alpha auto generates for the validation prompts as evaluate does
    p.add_argument("--output", required=True, help="merged checkpoint folder (a parent folder for a sweep)")
    p.add_argument("--output.max_shard_size", dest="max_shard_size", default="5GB", help="e.g. 5GB (default)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--workers", type=int, default=1, help="processes (Ray tasks when Ray is initialised)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N]: sum on a GPU (bit-identical output)")
    p.add_argument("--lora.densify", dest="lora_densify", action="store_true", help="LoRA: write full weights")
    p.add_argument("--lora.base", dest="lora_base", default=None, help="LoRA: base model folder for densify")
    p.set_defaults(func=run)


def soup_from_flags(args: argparse.Namespace) -> tuple[list[str], np.ndarray, str | None, dict | None]:
    """merge's and serve's two sources: --soup_dir (B, backbones, SFT from soup.json) or --backbones
    with --beta/--row. Returns (backbones, B, sft, manifest or None)."""
    from openrlhf_bonesoup import soup

    if args.soup_dir:
        if args.beta is not None or args.row is not None:
            raise BoneSoupError("--soup_dir takes B from its manifest: drop --beta/--row")
        manifest, backbones = soup.require_trained(args.soup_dir)
        return backbones, coefficients.check_matrix(manifest["matrix"]), args.sft or manifest.get("sft"), manifest
    backbones = [b for b in args.backbones.split(",") if b]
    return backbones, matrix_from_flags(args, len(backbones)), args.sft, None


def run(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import merge  # torch and safetensors: loaded by this sub-command only

    backbones, matrix, sft, manifest = soup_from_flags(args)
    n = matrix.shape[0]
    if args.preference is not None:
        preferences = [parse_floats(args.preference, "--preference")]
        outputs = [args.output]
    else:
        preferences = coefficients.preference_sweep(n, args.grid, args.preferences)
        outputs = merge.sweep_outputs(args.output, preferences)
    engine_kw = dict(
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        workers=args.workers,
        device=args.device,
        densify=args.lora_densify,
        base=args.lora_base,
    )
    alpha = parse_alpha(args.alpha)
    if alpha == "auto":  # the reference's search on a validation split, then per-objective alphas
        import torch

        from openrlhf_bonesoup import evaluate, generation

        spec = args.objectives or (manifest["objectives"] if manifest else None)
        if spec is None or args.alpha_prompts is None:
            raise BoneSoupError("--alpha auto needs --alpha_prompts FILE and --objectives (or the soup's, --soup_dir)")
        quiet_model_loading()
        objs = objectives.load_objectives(spec, device="cuda" if torch.cuda.is_available() else "cpu")
        val = evaluate.read_prompts(args.alpha_prompts, backbones[0], **{k: getattr(args, k) for k in evaluate.DATA})
        sampling = {k: getattr(args, k) for k in generation.SAMPLING}
        workdir = Path(outputs[0]).parent / ".alpha_search"
        search = evaluate.search_alpha(backbones, matrix, sft, objs, val, workdir, sampling, **engine_kw)
        means = coefficients.clean(search["means"])
        print(f"--alpha auto: per-objective alphas {search['best']} (mean validation scores {means})")
        alpha = search["best"]
    paths = merge.merge_soup(backbones, matrix, preferences, outputs, sft=sft, alpha=alpha, **engine_kw)
    with np.printoptions(precision=6, suppress=True):
        for mu, path in zip(preferences, paths, strict=True):
            lam = np.asarray(coefficients.clean(coefficients.merge_coefficients(matrix, mu)))  # no "-0."
            line = f"{path}: mu {np.asarray(mu)}, lambda {lam}"
            if np.any(np.asarray(alpha, dtype=np.float64)):
                weights, sft_weight = coefficients.soup_weights(matrix, mu, alpha)
                weights = np.asarray(coefficients.clean(weights))
                line += f", alpha {alpha}, backbone weights {weights}, SFT weight {sft_weight:.6g}"
            print(line)
    return 0
