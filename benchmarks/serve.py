"""Serving benchmark: requests/s at 1, 2 and 8 distinct preferences, side by side in one run.

    .venv/bin/python benchmarks/serve.py --old /tmp/old-serve     # ~15 minutes on 2 busy CPU cores
    .venv/bin/python benchmarks/serve.py --requests 16              # a quick look, without today's server

Servers, each a whole process on 127.0.0.1, talked to with the official `openai` client:
- yardstick: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on one checkpoint
  `merge` wrote for one preference: what a single trade-off costs to serve;
- `openrlhf-bonesoup serve` (this checkout) on a full-weight soup (n = 2 bf16 backbones + the SFT model,
  alpha 0.2) and on a LoRA soup (two r = 16 adapters on every linear layer of the base model);
- with --old DIR (a checkout of the hand-written server: `git worktree add /tmp/old-serve f776604`): that
  server on the same two soups, with transformers on the CPU and OMP_NUM_THREADS=1, as its docs advise.

Random LLaMA-shaped checkpoints (--size hidden x layers, head size 64, the tests' tokenizer: vocabulary 320).
CONCURRENCY requests in flight, request i asking for preference i mod k (k = 1, 2, 8), greedy, MAX_TOKENS new
tokens each (ignore_eos on vLLM, so every request generates them all); requests/s over the wall time of
--requests requests, the better of 2 rounds after a warm-up round at the same preferences (LoRA adapters
resolved). vLLM servers get --vllm_flags (default --enforce-eager: no torch.compile warm-up on CPU, the same
for all). A switch of the full-weight soup's weights: the time of a request at a new preference minus one at
the preference in place, median of 5 (printed). /proc/loadavg is printed before and after each server: the
machine is shared.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import tiny_models  # noqa: E402  (the tests' tokenizer, trained offline)
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from openrlhf_bonesoup.coefficients import backbone_matrix  # noqa: E402
from openrlhf_bonesoup.merge import merge_soup  # noqa: E402
from openrlhf_bonesoup.tiny import CORPUS  # noqa: E402

CONCURRENCY = 8
MAX_TOKENS = 32
PROMPTS = CORPUS
B = backbone_matrix(0.7, 2)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def checkpoint(folder: Path, tok, hidden: int, layers: int, seed: int, dtype=torch.bfloat16) -> int:
    """A random LLaMA checkpoint with the tests' tokenizer; returns its parameter count."""
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(shape, generator=gen) * 0.02).to(dtype) for k, shape in shapes.items()}
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return sum(x.numel() for x in state.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [*cmd[:1], *cmd[1:], "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env
    )
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while True:
        if proc.poll() is not None:
            sys.exit(f"{shlex.join(cmd)} failed:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            time.sleep(0.5)
    print(f"  started in {time.perf_counter() - started:.0f} s", flush=True)
    return proc, url


def switch_cost(client) -> float:
    """A full-weight soup's switch: a 1-token request at a new preference minus the same at the one in place."""
    new, same = [], []
    for r in range(5):
        mu = [0.3 + 0.01 * r, 0.7 - 0.01 * r]
        for times in (new, same):
            t = time.perf_counter()
            client.completions.create(model="bonesoup", prompt=PROMPTS[0], max_tokens=1, extra_body={"preference": mu})
            times.append(time.perf_counter() - t)
    cost = statistics.median(new) - statistics.median(same)
    print(
        f"  a switch: {cost * 1000:.0f} ms (median of 5 requests of 1 token: {statistics.median(new) * 1000:.0f} ms "
        f"at a new preference, {statistics.median(same) * 1000:.0f} ms at the one in place)",
        flush=True,
    )
    return cost


def measure(label, cmd, env, log, requests, *, soup: bool, vllm: bool, switch: bool = False) -> dict:
    """requests/s at 1, 2 and 8 preferences (and a full-weight soup's switch)."""
    from openai import OpenAI

    print(f"{label}: load {loadavg()}", flush=True)
    proc, url = start(cmd, env, log)
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    extra = {"ignore_eos": True} if vllm else {}  # today's server refuses fields it does not implement

    def ask(i: int, prefs: list) -> int:
        body = {**extra, "preference": prefs[i % len(prefs)]} if soup else extra
        r = client.completions.create(
            model="bonesoup", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS, temperature=0, extra_body=body
        )
        return r.usage.completion_tokens

    out = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            for k in (1, 2, 8):
                prefs = [[(j + 1) / (k + 1), 1 - (j + 1) / (k + 1)] for j in range(k)]
                rounds = []
                for _ in range(3):  # the first round warms up (this preference set's adapters, caches)
                    t = time.perf_counter()
                    tokens = sum(pool.map(lambda i, prefs=prefs: ask(i, prefs), range(requests)))
                    rounds.append((time.perf_counter() - t, tokens))
                wall, tokens = min(rounds[1:])
                out[k] = requests / wall
                print(
                    f"  {k} preference(s): {requests / wall:6.2f} requests/s, {tokens / wall:7.1f} tokens/s "
                    f"(rounds {', '.join(f'{w:.2f}' for w, _ in rounds)} s, the first a warm-up)",
                    flush=True,
                )
        if switch:
            out["switch"] = switch_cost(client)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        print(f"  load after: {loadavg()}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512x4", help="hidden x layers of the served model")
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--old", default=None, help="a checkout of the hand-written server (f776604) to compare")
    parser.add_argument("--vllm_flags", default="--enforce-eager", help="vLLM flags for every vLLM server")
    parser.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bonesoup-serve-bench-", dir=args.workdir))
    hidden, layers = map(int, args.size.split("x"))
    try:
        tok = tiny_models.make_tokenizer(root / "tok", "llama")
        paths = {name: root / name for name in ("b0", "b1", "sft", "base")}
        params = [checkpoint(p, tok, hidden, layers, seed) for seed, p in enumerate(paths.values())][0]
        adapters = [root / f"a{j}" for j in range(2)]
        for j, a in enumerate(adapters):
            tiny_models.make_lora_adapter(a, paths["base"], r=16, lora_alpha=32, seed=j)
        full = [str(paths["b0"]), str(paths["b1"])]
        (merged,) = merge_soup(full, B, [[0.5, 0.5]], [root / "merged"], sft=paths["sft"], alpha=0.2, progress=False)
        print(
            f"{params / 1e6:.1f} M parameters (bf16), {CONCURRENCY} in flight, {MAX_TOKENS} tokens per request, "
            f"{args.requests} requests per round; cpus {os.cpu_count()}",
            flush=True,
        )
        vllm_flags = shlex.split(args.vllm_flags)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        bonesoup = [sys.executable, "-m", "openrlhf_bonesoup.cli", "serve"]
        soups = {
            "full weights": ["--backbones", ",".join(full), "--sft", str(paths["sft"]), "--alpha", "0.2"],
            "LoRA": ["--backbones", ",".join(map(str, adapters)), "--alpha", "0.2"],
        }
        yardstick = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(merged)]
        yardstick += ["--served-model-name", "bonesoup", "--kv-cache-memory-bytes", "1G", *vllm_flags]
        label = "vLLM, one pre-merged checkpoint"
        results = {label: measure(label, yardstick, env, root / "yardstick.log", args.requests, soup=False, vllm=True)}
        for kind, soup in soups.items():
            label = f"serve on vLLM, {kind}"
            cmd = [*bonesoup, *soup, "--", *vllm_flags]
            switch = kind == "full weights"
            results[label] = measure(
                label, cmd, env, root / "serve.log", args.requests, soup=True, vllm=True, switch=switch
            )
        if args.old:
            old_env = {**env, "PYTHONPATH": str(Path(args.old).resolve()), "OMP_NUM_THREADS": "1"}
            for kind, soup in soups.items():
                label = f"today's serve (transformers), {kind}"
                cmd = [*bonesoup, *soup, "--device", "cpu", "--max_batch_size", str(CONCURRENCY)]
                results[label] = measure(label, cmd, old_env, root / "old.log", args.requests, soup=True, vllm=False)
        base = results["vLLM, one pre-merged checkpoint"]
        print("\nrequests/s, and the ratio to vLLM serving one pre-merged checkpoint (1 / 2 / 8 preferences):")
        for label, r in results.items():
            cells = " | ".join(f"{r[k]:.2f} ({r[k] / base[k]:.2f}x)" for k in (1, 2, 8))
            print(f"| {label} | {cells} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
