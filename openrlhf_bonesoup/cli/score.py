"""`openrlhf-bonesoup score`: score prompt/response JSONL with the training objectives and combiner."""

from __future__ import annotations

import argparse
from pathlib import Path

from openrlhf_bonesoup import coefficients, combiners, objectives
from openrlhf_bonesoup.cli import quiet_model_loading
from openrlhf_bonesoup.errors import BoneSoupError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="score prompt/response JSONL with the training objectives and combiner")
    p.add_argument("--reward.model_name_or_path", dest="reward_model_name_or_path", help="objectives A,B,...")
    combiners.add_reward_arguments(p)  # the launcher's combiner flags, one definition
    p.add_argument("--input", required=True, help='JSONL of {"prompt": ..., "response": ...}')
    p.add_argument("--output", required=True, help='JSONL: each record plus "rewards" and "reward"')
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--ds.param_dtype", dest="param_dtype", default="bf16", choices=["bf16", "fp16"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    quiet_model_loading()
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
