"""Serving benchmark: requests/s at 1, 2 and 8 distinct preferences, side by side in one run.

    .venv/bin/python benchmarks/serve.py --old /tmp/old-serve     # ~15 minutes on 2 busy CPU cores
    .venv/bin/python benchmarks/serve.py --requests 16 --rounds 1   # a quick look, without today's server

Servers, each a whole process on 127.0.0.1, all started together and talked to with the official `openai`
client:
- the yardstick, vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on the one
  checkpoint `merge` wrote for one preference: what serving a single trade-off costs;
- vLLM's own server on the base model with the one adapter `merge` wrote for one preference (vLLM's LoRA:
  what a LoRA soup costs before any soup logic);
- `openrlhf-bonesoup serve` (this checkout) on a full-weight soup (n = 2 bf16 backbones + the SFT model,
  alpha 0.2) and on a LoRA soup (two r = 16 adapters on every linear layer of the base model);
- with --old DIR (a copy of the hand-written server: `mkdir /tmp/old-serve && git archive f776604 | tar -x
  -C /tmp/old-serve`): that server on the same two soups, transformers on the CPU, OMP_NUM_THREADS=1 as its
  docs advised.

Random LLaMA-shaped checkpoints (--size hidden x layers, head size 64, the tests' tokenizer: vocabulary 320).
CONCURRENCY requests in flight, request i asking for preference i mod k (k = 1, 2, 8), greedy, MAX_TOKENS new
tokens each (ignore_eos on vLLM, so that every request generates them all). Per k: one warm-up round per
server (LoRA adapters resolved), then --rounds rounds that alternate between the servers, so that the drifting
load of a shared machine hits them alike; requests/s of the best round. vLLM servers get --vllm_flags
(default --enforce-eager: no torch.compile warm-up on CPU, the same for all) and a 256 MiB KV cache. Then a
full-weight switch: a 1-token request at a new preference minus the same at the preference in place, median
of 5.
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
from openrlhf_bonesoup.demo.tiny import CORPUS  # noqa: E402
from openrlhf_bonesoup.merge import merge_soup  # noqa: E402

CONCURRENCY = 8
MAX_TOKENS = 32
PROMPTS = CORPUS
B = backbone_matrix(0.7, 2)
YARDSTICK = "vLLM, one pre-merged checkpoint"


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
    config.architectures = ["LlamaForCausalLM"]
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
    at = cmd.index("--") if "--" in cmd else len(cmd)  # serve's own flags before vLLM's
    cmd = [*cmd[:at], "--port", str(port), *cmd[at:]]
    # run from the log's folder: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    return proc, f"http://127.0.0.1:{port}"


def wait(label: str, proc: subprocess.Popen, url: str, log: Path) -> None:
    while True:
        if proc.poll() is not None:
            sys.exit(f"{label} failed:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return
        except OSError:
            time.sleep(0.5)


def one_round(client, requests: int, prefs: list, server: dict) -> tuple[float, int]:
    """CONCURRENCY clients, request i at prefs[i % k]: (wall seconds, completion tokens)."""
    extra = {"ignore_eos": True} if server["vllm"] else {}  # today's server refuses fields it does not implement

    def ask(i: int) -> int:
        body = {**extra, "preference": prefs[i % len(prefs)]} if server["soup"] else extra
        r = client.completions.create(
            model=server["model"], prompt=PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS, temperature=0,
            extra_body=body,
        )  # fmt: skip
        return r.usage.completion_tokens

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        tokens = sum(pool.map(ask, range(requests)))
    return time.perf_counter() - t, tokens


def switch_cost(client) -> None:
    """A full-weight soup's switch: a 1-token request at a new preference minus the same at the one in place."""
    new, same = [], []
    for r in range(5):
        mu = [0.3 + 0.01 * r, 0.7 - 0.01 * r]
        for times in (new, same):
            t = time.perf_counter()
            client.completions.create(model="bonesoup", prompt=PROMPTS[0], max_tokens=1, extra_body={"preference": mu})
            times.append(time.perf_counter() - t)
    new_ms, same_ms = statistics.median(new) * 1000, statistics.median(same) * 1000
    print(
        f"a switch of the full-weight soup: {new_ms - same_ms:.0f} ms (median of 5 requests of 1 token: "
        f"{new_ms:.0f} ms at a new preference, {same_ms:.0f} ms at the one in place)",
        flush=True,
    )


def main() -> None:
    from openai import OpenAI

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512x4", help="hidden x layers of the served model")
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per server and preference count")
    parser.add_argument("--old", default=None, help="a checkout of the hand-written server (f776604) to compare")
    parser.add_argument("--vllm_flags", default="--enforce-eager", help="vLLM flags for every vLLM server")
    parser.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bonesoup-serve-bench-", dir=args.workdir))
    hidden, layers = map(int, args.size.split("x"))
    procs = []
    try:
        tok = tiny_models.make_tokenizer(root / "tok", "llama")
        paths = {name: root / name for name in ("b0", "b1", "sft", "base")}
        params = [checkpoint(p, tok, hidden, layers, seed) for seed, p in enumerate(paths.values())][0]
        adapters = [root / f"a{j}" for j in range(2)]
        for j, a in enumerate(adapters):
            tiny_models.make_lora_adapter(a, paths["base"], r=16, lora_alpha=32, seed=j)
        full = [str(paths["b0"]), str(paths["b1"])]
        (merged,) = merge_soup(full, B, [[0.5, 0.5]], [root / "merged"], sft=paths["sft"], alpha=0.2, progress=False)
        (adapter,) = merge_soup(adapters, B, [[0.5, 0.5]], [root / "merged_lora"], alpha=0.2, progress=False)
        print(
            f"{params / 1e6:.1f} M parameters (bf16), {CONCURRENCY} in flight, {MAX_TOKENS} tokens per request, "
            f"{args.requests} requests per round; cpus {os.cpu_count()}, load {loadavg()}",
            flush=True,
        )
        vllm_flags = shlex.split(args.vllm_flags)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        bonesoup = [sys.executable, "-m", "openrlhf_bonesoup.cli", "serve"]
        soups = {
            "full weights": ["--backbones", ",".join(full), "--sft", str(paths["sft"]), "--alpha", "0.2"],
            "LoRA": ["--backbones", ",".join(map(str, adapters)), "--alpha", "0.2"],
        }
        vllm = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--served-model-name", "bonesoup"]
        vllm += ["--kv-cache-memory-bytes", "256M", *vllm_flags]
        lora = ["--enable-lora", "--max-lora-rank", "32", "--max-loras", str(CONCURRENCY)]
        servers = {
            YARDSTICK: {"cmd": [*vllm, "--model", str(merged)], "env": env, "soup": False, "model": "bonesoup"},
            "vLLM, one pre-merged adapter": {
                "cmd": [*vllm, "--model", str(paths["base"]), *lora, "--lora-modules", f"merged={adapter}"],
                "env": env, "soup": False, "model": "merged",
            },
        }  # fmt: skip
        for kind, soup in soups.items():
            cmd = [*bonesoup, *soup, "--", "--kv-cache-memory-bytes", "256M", *vllm_flags]
            servers[f"serve on vLLM, {kind}"] = {"cmd": cmd, "env": env, "soup": True, "model": "bonesoup"}
        for server in servers.values():
            server["vllm"] = True
        if args.old:
            old_env = {**env, "PYTHONPATH": str(Path(args.old).resolve()), "OMP_NUM_THREADS": "1"}
            for kind, soup in soups.items():
                cmd = [*bonesoup, *soup, "--device", "cpu", "--max_batch_size", str(CONCURRENCY)]
                servers[f"today's serve (transformers), {kind}"] = {
                    "cmd": cmd, "env": old_env, "soup": True, "model": "bonesoup", "vllm": False
                }  # fmt: skip
        # All servers up at once, rounds alternating between them: the machine's load drifts, and each ratio
        # then compares rounds measured minutes apart at most.
        started = time.perf_counter()
        urls = {}
        for k, (label, server) in enumerate(servers.items()):
            log = root / f"server{k}.log"
            proc, url = start(server["cmd"], server["env"], log)
            procs.append(proc)
            urls[label] = (proc, url, log)
        for label, (proc, url, log) in urls.items():
            wait(label, proc, url, log)
        print(f"{len(servers)} servers started in {time.perf_counter() - started:.0f} s, load {loadavg()}", flush=True)
        clients = {label: OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
                   for label, (_, url, _) in urls.items()}  # fmt: skip
        best: dict[tuple[str, int], tuple[float, int]] = {}
        for k in (1, 2, 8):
            prefs = [[(j + 1) / (k + 1), 1 - (j + 1) / (k + 1)] for j in range(k)]
            for label, server in servers.items():  # warm-up: adapters resolved, caches filled
                one_round(clients[label], args.requests, prefs, server)
            for _ in range(args.rounds):
                for label, server in servers.items():
                    wall, tokens = one_round(clients[label], args.requests, prefs, server)
                    best[label, k] = min(best.get((label, k), (wall, tokens)), (wall, tokens))
            print(f"{k} preference(s) measured, load {loadavg()}", flush=True)
        switch_cost(clients["serve on vLLM, full weights"])
        print(f"\nrequests/s (best of {args.rounds} rounds) and the ratio to vLLM on one pre-merged checkpoint:")
        print("| server | 1 preference | 2 preferences | 8 preferences |\n|---|---|---|---|")
        for label in servers:
            cells = []
            for k in (1, 2, 8):
                rate = args.requests / best[label, k][0]
                ratio = best[YARDSTICK, k][0] / best[label, k][0]
                cells.append(f"{rate:.2f} ({ratio:.2f}x, {best[label, k][1] / best[label, k][0]:.0f} tokens/s)")
            print(f"| {label} | {' | '.join(cells)} |")
        print(f"load at the end: {loadavg()}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=120)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
