"""Serving: one OpenAI-compatible endpoint for a soup, the trade-off chosen by each request.

`openrlhf-bonesoup serve` loads a soup once and answers GET /health, GET /v1/models,
POST /v1/completions and POST /v1/chat/completions (the tokenizer's chat template), with
`"stream": true` as server-sent events. A request's preference mu is its body field "preference"
(what the `openai` client sends with extra_body), else the one in its model name "bonesoup:0.3,0.7",
else --default_preference. Every response names that preference in "model" and carries
"bonesoup": {preference, lambda, alpha, weights, sft_weight}. Bad input is HTTP 400 with an
OpenAI-style error body and a one-line message; fields this server does not implement are refused
the same way, never silently ignored.

One worker thread owns the model; requests wait in a queue and are batched (`group_jobs`):
- full weights (transformers): the n backbones (and the SFT model when alpha > 0) stay resident and
  `TransformersBackend.switch` recomputes the working model's parameters in place with the merge
  engine's arithmetic (same inputs in the same order, fp32 accumulator over the same row chunks, one
  cast to the checkpoint dtype), so a served preference is the checkpoint `merge` writes for it, bit
  for bit. Queued requests are grouped by preference: one switch per group, not per request.
- LoRA (transformers + PEFT): each preference's rank-concatenated soup adapter (merge's own function)
  is added to one PeftModel in memory (at most MAX_ADAPTERS, least recently used evicted); a batch
  mixes preferences through PEFT's per-sample `adapter_names`.
- LoRA on vLLM (`--device cuda` with vllm installed): `merge_soup` writes each preference's adapter
  once to a cache folder, served as a per-request LoRARequest. vLLM's offline engine returns whole
  completions, so a stream is one chunk. Full-weight soups stay on transformers (one-line notice).

Written by hand, because no serving library changes a model's weights between batches: the
scheduler, per-row streaming and stopping (`_Rows`), and the thin OpenAI protocol layer. HTTP,
validation and server-sent events are FastAPI's, pydantic's and starlette's.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import logging
import queue
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from openrlhf_bonesoup import checkpoints, lora, merge
from openrlhf_bonesoup.coefficients import (
    BoneSoupError,
    check_preference,
    clean,
    merge_coefficients,
    parse_floats,
)
from openrlhf_bonesoup.merge_engine import CHUNK_ELEMENTS, weighted_sum

log = logging.getLogger(__name__)

MODEL = "bonesoup"
MAX_ADAPTERS = 32  # LoRA soup adapters kept per server (a few MB each); least recently used evicted
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- the soup


class Soup:
    """What is served: n backbones (checkpoints or LoRA adapters), B, the SFT model and alpha, planned as
    merge.merge_soup plans them (merge.soup_inputs / soup_row): a served preference is a merged one."""

    def __init__(
        self,
        backbones: Sequence[str | Path],
        matrix: np.ndarray | Sequence[Sequence[float]],
        *,
        sft: str | Path | None = None,
        alpha: float | Sequence[float] = 0.0,
        default_preference: Sequence[float] | None = None,
        objectives: Sequence[str] | None = None,
    ):
        self.matrix, self.inputs, self.sft = merge.soup_inputs(backbones, matrix, sft=sft, alpha=alpha)
        self.n, self.alpha = self.matrix.shape[0], alpha
        self.backbones = self.inputs[: self.n]
        for path in self.inputs:
            checkpoints.weight_files(path)  # exists, safetensors only (the merge's no-pickle rule)
        self.lora = all(lora.is_adapter(p) for p in self.backbones)
        self.base = None
        if self.lora:  # served on the adapters' base model
            self.base = lora.base_model(self.backbones[0], None)
        self.default = self.preference(default_preference or [1.0 / self.n] * self.n)
        self.objectives = list(objectives) if objectives else None

    def preference(self, mu: Sequence[float]) -> tuple[float, ...]:
        """mu checked on the simplex, as a hashable key."""
        return tuple(check_preference(mu, self.n).tolist())

    def plan(self, mu: Sequence[float]) -> tuple[list[float], dict]:
        """merge_soup's weights for mu (one per input, SFT last), and what a response reports."""
        weights = merge.soup_row(self.matrix, mu, self.alpha, self.sft)
        info = {
            "preference": list(mu),
            "lambda": clean(merge_coefficients(self.matrix, mu)),
            "alpha": self.alpha,
            "weights": clean(weights[: self.n]),
            "sft_weight": weights[self.n] if self.sft else None,
        }
        return weights, info

    def tokenizer_dir(self) -> Path:
        # merge copies side files (tokenizer) from the first backbone; adapters often have none
        first = self.backbones[0]
        return first if (first / "tokenizer_config.json").is_file() or not self.lora else self.base


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(eq=False)
class Job:
    """One prompt of one HTTP request, as the worker thread sees it.

    emit(event) is thread-safe; events are ("text", index, piece), ("end", index, finish_reason,
    completion_tokens) and ("error", index, status, message).
    """

    ids: list[int]
    mu: tuple[float, ...]
    max_tokens: int
    temperature: float
    top_p: float
    emit: Callable[[tuple], None]
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text emitted so far
    done: bool = False  # EOS, max_tokens, or the client left


def group_jobs(jobs: Sequence[Job], current: tuple | None, max_batch_size: int, by_preference: bool) -> list[list[Job]]:
    """Batches of jobs that share sampling settings (and the preference, when the weights must switch).

    Groups run with the preference already in place first, then grouped by preference, so the
    weights switch once per preference however the requests arrived.
    """
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.mu if by_preference else (), job.temperature, job.top_p), []).append(job)
    order = sorted(groups, key=lambda key: (key[0] != current, key[0]))
    return [groups[k][i : i + max_batch_size] for k in order for i in range(0, len(groups[k]), max_batch_size)]


class _Worker:
    """The queue and the one thread that owns the model; subclasses generate one batch."""

    by_preference = False

    def __init__(self, soup: Soup, max_batch_size: int):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise BoneSoupError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.soup, self.max_batch_size = soup, max_batch_size
        self.current: tuple | None = None
        self.queue: queue.Queue[Job] = queue.Queue()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="bonesoup-serve", daemon=True).start()

    def submit(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.queue.put(job)

    def _loop(self) -> None:
        while True:
            pending = [self.queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    pending.append(self.queue.get_nowait())
            for batch in group_jobs(pending, self.current, self.max_batch_size, self.by_preference):
                batch = [job for job in batch if not job.done]  # clients that left while queued
                try:
                    if batch:
                        self.generate(batch)
                except Exception as e:  # one failing batch must not stop the server
                    log.exception("generation failed")
                    bad = isinstance(e, BoneSoupError)
                    status, message = (400, str(e)) if bad else (500, f"{type(e).__name__}: {e}")
                    for job in batch:
                        if not job.done:
                            job.done = True
                            job.emit(("error", job.index, status, message))

    def generate(self, batch: list[Job]) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- transformers


class _Rows(BaseStreamer, StoppingCriteria):
    """Streams each row's new text to its job and stops the rows that are done (EOS, the job's own
    max_tokens, a client that left), so one `generate` call serves jobs of different lengths."""

    def __init__(self, jobs: list[Job], tokenizer, eos: set[int]):
        self.jobs, self.tokenizer, self.eos, self.prompt = jobs, tokenizer, eos, True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:  # generate hands over the prompt ids first
            self.prompt = False
            return
        for job, token in zip(self.jobs, value.tolist(), strict=True):
            if job.done:
                continue
            job.tokens.append(token)
            finish = "stop" if token in self.eos else "length" if len(job.tokens) >= job.max_tokens else None
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
            # a character split across tokens decodes as U+FFFD until its last byte arrives
            if finish or not text.endswith("\ufffd"):
                if len(text) > job.sent:
                    job.emit(("text", job.index, text[job.sent :]))
                job.sent = len(text)
            if finish:
                job.done = True
                job.emit(("end", job.index, finish, len(job.tokens)))

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:  # only a client that left, or generate's own length limit
                job.done = True
                job.emit(("end", job.index, "length", len(job.tokens)))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([job.done for job in self.jobs], device=input_ids.device)


class TransformersBackend(_Worker):
    """Full-weight soups (weights recomputed in place per preference) and LoRA soups (PEFT adapters)."""

    name = "transformers"

    def __init__(self, soup: Soup, *, device: str = "cpu", dtype: str | None = None, max_batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(soup, max_batch_size)
        self.by_preference = not soup.lora
        self.device = torch.device(device)
        if dtype is None:  # bf16 matmuls are slow on CPUs; a GPU serves the checkpoint's own dtype
            dtype = "auto" if self.device.type == "cuda" else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(str(soup.tokenizer_dir()))
        model_dir = soup.base if soup.lora else soup.backbones[0]
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES.get(dtype, dtype))
        self.model = model.to(self.device).eval()
        self.context = _context_length(self.model.config, self.tokenizer)
        eos = self.model.generation_config.eos_token_id  # what `generate` itself stops on
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos, default=0)
        self.switches = 0
        if soup.lora:
            self.adapters: OrderedDict[tuple, str] = OrderedDict()
            self.names = (f"mu{k}" for k in itertools.count())  # adapter names become module keys: no dots
            self.adapter(soup.default)
        else:
            self._load_inputs()
            self.switch(soup.default)
        self.start()

    # -- full weights

    def _load_inputs(self) -> None:
        """The resident inputs, tensor by tensor, viewed as (rows, row) like the engine's chunks."""
        from safetensors import safe_open

        inputs = self.soup.inputs
        layouts = [checkpoints.read_layout(p) for p in inputs]
        checkpoints.check_layouts(inputs, layouts)  # the engine's checks; drops a tied lm_head as the engine does
        params = self.model.state_dict(keep_vars=True)
        self.tensors: dict[str, tuple[torch.Tensor, list[torch.Tensor], torch.dtype]] = {}
        handles: dict[str, Any] = {}
        for name, (_, _, shape, _) in layouts[0].items():
            xs = []
            for layout in layouts:
                file = layout[name][0]
                if file not in handles:
                    handles[file] = safe_open(file, framework="pt", device=str(self.device))
                xs.append(handles[file].get_tensor(name))
            target = params.get(name)
            if target is None or list(target.shape) != shape:
                raise BoneSoupError(
                    f"tensor {name!r} of {inputs[0]} is not a parameter of the loaded model: serving needs checkpoint "
                    "names that match the model's (merge the preference with `openrlhf-bonesoup merge` instead)"
                )
            if not xs[0].is_floating_point():  # masks, ids: the engine copies them and needs them equal
                if not all(torch.equal(xs[0], x) for x in xs[1:]):
                    raise BoneSoupError(f"integer tensor {name!r} differs between the inputs; cannot merge it")
                continue
            for path, x in zip(inputs, xs, strict=True):
                if not torch.isfinite(x).all():
                    raise BoneSoupError(f"tensor {name!r} of {path} has NaN/inf values; refusing to serve it")
            rows = shape[0] if shape else 1
            self.tensors[name] = (target.data.view(rows, -1), [x.view(rows, -1) for x in xs], xs[0].dtype)
        widest = max((self._step(x[0]) * x[0].shape[1] for _, x, _ in self.tensors.values()), default=1)
        self.acc = torch.empty(widest, dtype=torch.float32, device=self.device)

    @staticmethod
    def _step(x: torch.Tensor) -> int:
        return max(1, CHUNK_ELEMENTS // max(x.shape[1], 1))  # rows per chunk, as the engine cuts them

    @torch.no_grad()
    def switch(self, mu: tuple[float, ...]) -> None:
        """Recompute every parameter for preference mu: sum_i w_i input_i in fp32, cast to the checkpoint
        dtype (then to the serving dtype, as loading the merged checkpoint would)."""
        if mu == self.current:
            return
        weights, _ = self.soup.plan(mu)
        self.current = None  # a failed switch leaves no claim about the weights
        # One torch thread, as the merge engine: the sums are memory-bound, and on busy cores two OpenMP
        # threads wait on each other (2-core VM: 17-37 ms with one thread, 1-2 s with two, 1.8 M parameters).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for target, xs, dtype in self.tensors.values():
                step = self._step(xs[0])
                for start in range(0, xs[0].shape[0], step):
                    chunk = [x[start : start + step] for x in xs]
                    out = weighted_sum(chunk, weights, self.acc[: chunk[0].numel()].view(chunk[0].shape))
                    target[start : start + step].copy_(out.to(dtype))
        finally:
            torch.set_num_threads(threads)
        self.current = mu
        self.switches += 1

    # -- LoRA

    def adapter(self, mu: tuple[float, ...]) -> str:
        """The PEFT adapter of preference mu: merge's rank concatenation, cast to the adapters' dtype
        as merge saves it, loaded as PeftModel.load_adapter loads that file."""
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

        if mu in self.adapters:
            self.adapters.move_to_end(mu)
            return self.adapters[mu]
        weights, _ = self.soup.plan(mu)
        (tensors,), config, dtype = lora.concatenate(self.soup.backbones, [weights])
        state = {k: v.to(dtype) for k, v in tensors.items()}
        if not all(torch.isfinite(x).all() for x in state.values()):
            raise BoneSoupError(f"the soup adapter for preference {list(mu)} overflows {dtype}")
        peft_config = PeftConfig.from_peft_type(**config)
        peft_config.inference_mode = True
        name = next(self.names)
        if not self.adapters:
            self.model = get_peft_model(self.model, peft_config, adapter_name=name)
        else:
            self.model.add_adapter(name, peft_config)
        set_peft_model_state_dict(self.model, state, adapter_name=name)
        self.model.eval()
        self.adapters[mu] = name
        self.switches += 1
        return name

    def _evict(self, keep: set[tuple]) -> None:
        for mu in [mu for mu in self.adapters if mu not in keep][: max(0, len(self.adapters) - MAX_ADAPTERS)]:
            self.model.delete_adapter(self.adapters.pop(mu))

    # -- generation

    def generate(self, batch: list[Job]) -> None:
        kwargs = {}
        if self.soup.lora:
            kwargs["adapter_names"] = [self.adapter(job.mu) for job in batch]
            self._evict({job.mu for job in batch})
        else:
            self.switch(batch[0].mu)
        width = max(len(job.ids) for job in batch)  # left padding: every row ends where generation starts
        ids = torch.tensor([[self.pad] * (width - len(j.ids)) + j.ids for j in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in batch], device=self.device)
        job = batch[0]
        if job.temperature == 0:
            kwargs["do_sample"] = False
        else:  # top_k 0: no top-k filtering, as OpenAI and vLLM sample
            kwargs.update(do_sample=True, temperature=job.temperature, top_p=job.top_p, top_k=0)
        rows = _Rows(batch, self.tokenizer, self.eos)
        with torch.no_grad():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(j.max_tokens for j in batch),
                pad_token_id=self.pad,
                streamer=rows,
                stopping_criteria=StoppingCriteriaList([rows]),
                **kwargs,
            )


def _context_length(config, tokenizer) -> int | None:
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 10**8]  # tokenizers say 1e30 for "unknown"
    return min(limits, default=None)


# ---------------------------------------------------------------------------------------------- vLLM


class VllmBackend(_Worker):
    """LoRA soups on vLLM: merge_soup writes each preference's adapter once into a cache folder
    (least recently used removed past MAX_ADAPTERS), and every request names its LoRARequest."""

    name = "vllm"
    device = "cuda"

    def __init__(self, soup: Soup, *, dtype: str | None = None, max_batch_size: int = 8):
        import vllm
        from transformers import AutoConfig, AutoTokenizer

        super().__init__(soup, max_batch_size)
        rank = sum(json.loads((b / lora.ADAPTER_CONFIG).read_text())["r"] for b in soup.backbones)
        self.llm = vllm.LLM(
            model=str(soup.base),
            dtype=dtype or "auto",
            enable_lora=True,
            max_lora_rank=1 << max(3, (rank - 1).bit_length()),  # vLLM takes powers of two from 8
            max_loras=max_batch_size,
            max_num_seqs=max_batch_size,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(soup.tokenizer_dir()))
        self.context = _context_length(AutoConfig.from_pretrained(str(soup.base)), self.tokenizer)
        self.cache = Path(tempfile.mkdtemp(prefix="bonesoup-serve-loras-"))
        atexit.register(shutil.rmtree, self.cache, True)
        self.loras: OrderedDict[tuple, Any] = OrderedDict()
        self.ids = itertools.count(1)
        self.start()

    def _lora(self, mu: tuple[float, ...]):
        from vllm.lora.request import LoRARequest

        if mu in self.loras:
            self.loras.move_to_end(mu)
            return self.loras[mu]
        k = next(self.ids)
        (folder,) = merge.merge_soup(
            self.soup.backbones,
            self.soup.matrix,
            [list(mu)],
            [self.cache / f"mu{k}"],
            alpha=self.soup.alpha,
            progress=False,
        )
        self.loras[mu] = LoRARequest(f"mu{k}", k, str(folder))
        return self.loras[mu]

    def generate(self, batch: list[Job]) -> None:
        import vllm

        loras = [self._lora(job.mu) for job in batch]
        keep = {job.mu for job in batch}
        for mu in [mu for mu in self.loras if mu not in keep][: max(0, len(self.loras) - MAX_ADAPTERS)]:
            shutil.rmtree(self.loras.pop(mu).lora_path, ignore_errors=True)
        params = [vllm.SamplingParams(temperature=j.temperature, top_p=j.top_p, max_tokens=j.max_tokens) for j in batch]
        prompts = [{"prompt_token_ids": job.ids} for job in batch]
        outputs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        for job, out in zip(batch, outputs, strict=True):
            done = out.outputs[0]
            job.done = True
            job.emit(("text", job.index, done.text))
            job.emit(("end", job.index, done.finish_reason, len(done.token_ids)))


def load_backend(
    soup: Soup, *, device: str | None = None, dtype: str | None = None, max_batch_size: int = 8
) -> TransformersBackend | VllmBackend:
    """vLLM for a LoRA soup on a GPU where vllm is installed; transformers otherwise.

    device: cpu, cuda, cuda:1... (default: cuda when a GPU is visible); dtype: auto, float32, bfloat16,
    float16 (default: float32 on CPU, the checkpoint's own on a GPU).
    """
    from openrlhf_bonesoup.evaluate import vllm_usable

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is not None and dtype != "auto" and dtype not in DTYPES:
        raise BoneSoupError(f"--dtype takes auto, {', '.join(DTYPES)}; got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BoneSoupError(f"--device {device}, but no CUDA GPU is visible")
    if device.startswith("cuda") and vllm_usable():
        if soup.lora:
            return VllmBackend(soup, dtype=dtype, max_batch_size=max_batch_size)
        log.warning("vLLM serves LoRA soups only: this full-weight soup is served by the transformers backend")
    return TransformersBackend(soup, device=device, dtype=dtype, max_batch_size=max_batch_size)


# ---------------------------------------------------------------------------------------------- HTTP


class _Body(BaseModel):
    # strict: "0.3" is not a number; forbid: a field we do not implement is refused, not ignored
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    model: str = MODEL
    preference: list[float] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    user: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str] = Field(min_length=1)


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status == 400 else "server_error"
    body = {"message": message.splitlines()[0] if message else kind, "type": kind, "param": param, "code": None}
    return JSONResponse({"error": body}, status_code=status)


def build_app(backend: TransformersBackend | VllmBackend) -> FastAPI:
    """The OpenAI-compatible routes in front of one backend."""
    app = FastAPI(title="openrlhf-bonesoup serve")
    soup, tokenizer = backend.soup, backend.tokenizer

    @app.exception_handler(BoneSoupError)
    async def bad_input(request, exc: BoneSoupError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = str(first["loc"][1]) if len(first["loc"]) > 1 else None
        if first["type"] == "extra_forbidden":
            return _error(400, f"{param}: not supported by this server", param)
        if first["type"] == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first['msg']}")
        return _error(400, f"{param or 'body'}: {first['msg']}", param)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        about = {
            "n": soup.n,
            "objectives": soup.objectives,
            "beta": float(soup.matrix[0, 0]),
            "alpha": soup.alpha,
            "default_preference": list(soup.default),
            "lora": soup.lora,
            "backend": backend.name,
        }
        card = {"id": MODEL, "object": "model", "created": 0, "owned_by": "openrlhf-bonesoup", "bonesoup": about}
        return {"object": "list", "data": [card]}

    def preference(body: _Body) -> tuple[float, ...]:
        name, sep, text = body.model.partition(":")
        if name != MODEL:
            raise BoneSoupError(
                f"unknown model {body.model!r}: this server serves {MODEL!r} and '{MODEL}:mu_1,...,mu_n'"
            )
        if sep and body.preference is not None:
            raise BoneSoupError("the preference is given twice (model name and 'preference'): give it once")
        if sep:
            return soup.preference(parse_floats(text, "the preference in the model name"))
        return soup.default if body.preference is None else soup.preference(body.preference)

    async def respond(body: _Body, prompts: list[list[int]], max_tokens: int | None, chat: bool):
        mu = preference(body)
        _, info = soup.plan(mu)
        for ids in prompts:
            if not ids:
                raise BoneSoupError("the prompt is empty")
            wanted = len(ids) + (max_tokens or 1)
            if backend.context and wanted > backend.context:
                raise BoneSoupError(
                    f"this model's maximum context length is {backend.context} tokens; the request needs {wanted} "
                    f"({len(ids)} in the prompt, {max_tokens or 1} to generate)"
                )
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def budget(ids: list[int]) -> int:  # chat without max_tokens: the rest of the context
            return max_tokens or (backend.context - len(ids) if backend.context else COMPLETION_MAX_TOKENS)

        jobs = [Job(ids, mu, budget(ids), body.temperature, body.top_p, emit, index=i) for i, ids in enumerate(prompts)]
        backend.submit(jobs)
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "created": int(time.time()),
            "model": f"{MODEL}:{','.join(repr(x) for x in mu)}",
        }
        kind = ("chat.completion" if chat else "text_completion") + (".chunk" if body.stream and chat else "")

        async def run():  # (kind, index, payload...) until every job ended; an error ends all
            left = len(jobs)
            try:
                while left:
                    event = await events.get()
                    left -= event[0] != "text"
                    yield event
                    if event[0] == "error":
                        return
            finally:
                for job in jobs:  # a client that left stops its rows
                    job.done = True

        if not body.stream:
            texts, finish, generated = [""] * len(jobs), [None] * len(jobs), 0
            async with contextlib.aclosing(run()) as events_:
                async for event, i, *rest in events_:
                    if event == "error":
                        return _error(*rest)
                    if event == "text":
                        texts[i] += rest[0]
                    else:
                        finish[i] = rest[0]
                        generated += rest[1]
            choices = [
                {"index": i, "finish_reason": f, "logprobs": None}
                | ({"message": {"role": "assistant", "content": t}} if chat else {"text": t})
                for i, (t, f) in enumerate(zip(texts, finish, strict=True))
            ]
            prompt_tokens = sum(map(len, prompts))
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated}
            usage["total_tokens"] = prompt_tokens + generated
            return {**head, "object": kind, "choices": choices, "usage": usage, "bonesoup": info}

        def chunk(i: int, delta: dict, finish: str | None = None) -> str:
            choice = {"index": i, "finish_reason": finish, "logprobs": None}
            choice |= {"delta": delta} if chat else {"text": delta.get("content", "")}
            return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice], 'bonesoup': info})}\n\n"

        async def stream():
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, {"role": "assistant", "content": ""})
            async with contextlib.aclosing(run()) as events_:
                async for event, i, *rest in events_:
                    if event == "error":
                        yield f"data: {_error(*rest).body.decode()}\n\n"
                        return
                    yield chunk(i, {"content": rest[0]}) if event == "text" else chunk(i, {}, rest[0])
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        ids = [tokenizer(p).input_ids for p in prompts]
        return await respond(body, ids, body.max_tokens or COMPLETION_MAX_TOKENS, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        if not tokenizer.chat_template:
            raise BoneSoupError("the model's tokenizer has no chat template: use /v1/completions")
        for m in body.messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BoneSoupError("messages: every message needs a string 'role' and a string 'content'")
        try:
            text = tokenizer.apply_chat_template(body.messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (roles, order) raise jinja errors
            raise BoneSoupError(f"messages: the chat template refused them: {e}") from None
        ids = [tokenizer(text, add_special_tokens=False).input_ids]  # the template writes its special tokens
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise BoneSoupError("give max_tokens or max_completion_tokens, not both")
        return await respond(body, ids, body.max_tokens or body.max_completion_tokens, chat=True)

    return app


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """The server's socket, bound before the model loads: a busy port is one line at once, not after it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise BoneSoupError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(backend: TransformersBackend | VllmBackend, sock: socket.socket) -> None:
    """Serve on sock until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(build_app(backend), log_level="warning")).run(sockets=[sock])
