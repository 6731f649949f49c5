"""Test helpers for the reward path: real `openrlhf.cli.serve_rm` servers, and rollouts made the way
OpenRLHF's rollout workers make them (its SingleTurnAgentExecutor and SamplesGenerator), with the tiny
policy generating through HF `generate` (vLLM cannot run on CPU; the executor only needs an engine
with `generate(prompt_ids, params)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, queries: list[str]) -> list[float]:
    data = json.dumps({"query": queries, "prompts": queries, "labels": [None] * len(queries)}).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["rewards"]


@contextlib.contextmanager
def serve_rm(*checkpoints) -> Iterator[list[str]]:
    """One real `python -m openrlhf.cli.serve_rm` per checkpoint on 127.0.0.1 (started together);
    yields their /get_reward URLs once each answers."""
    procs, urls = [], []
    try:
        for path in checkpoints:
            port = free_port()
            cmd = [sys.executable, "-m", "openrlhf.cli.serve_rm", "--reward.model_name_or_path", str(path)]
            cmd += ["--port", str(port), "--host", "127.0.0.1", "--ds.attn_implementation", "eager"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            urls.append(f"http://127.0.0.1:{port}/get_reward")
        deadline = time.time() + 180
        for proc, url in zip(procs, urls, strict=True):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve_rm for {url} exited: {proc.stderr.read()[-2000:]}")
                try:
                    post(url, ["hello"])
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"serve_rm at {url} did not answer within 180 s") from None
                    time.sleep(0.5)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def reference_rm(path, text: str) -> float:
    """One OpenRLHF RM, one sample, no padding, fp32: OpenRLHF's loader and RewardDataset's formatting
    (text + " " + eos, eos forced last), written out independently of the plugin's scoring code."""
    from openrlhf.models import get_llm_for_sequence_regression

    model = get_llm_for_sequence_regression(str(path), "reward", attn_implementation="eager").float().eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok(text.rstrip("\n") + " " + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids[-1] = tok.eos_token_id
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()


class HFEngine:
    """The tiny policy behind the one call SingleTurnAgentExecutor makes: generate(prompt_ids, params)."""

    def __init__(self, path):
        self.model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt_token_ids]), max_new_tokens=sampling_params.max_tokens, do_sample=False
            )[0, len(prompt_token_ids) :].tolist()
        finish = "stop" if out[-1] == self.tokenizer.eos_token_id else "length"
        text = self.tokenizer.decode(out, skip_special_tokens=False)
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=out, text=text, finish_reason=finish, logprobs=None)])


def execute(executor, engine: HFEngine, prompt: str, label=None, max_new_tokens: int = 6) -> dict:
    """One rollout through OpenRLHF's executor, as its vLLM engine actor runs it."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, logprobs=None)
    return asyncio.run(executor.execute(prompt, label, params, 64, engine.tokenizer, engine))
