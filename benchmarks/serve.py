"""Serving benchmark: preference switch latency against model size, and throughput at 1, 2 and 8 preferences.

    .venv/bin/python benchmarks/serve.py                          # ~10 minutes on 2 busy CPU cores
    .venv/bin/python benchmarks/serve.py --sizes 512x4 --requests 16   # a quick look

Switch latency (in this process, on the server's own objects), per model size, random LLaMA-shaped
checkpoints (the tests' tiny tokenizer, so vocabulary 320; sizes are printed in parameters):
- full weights: `TransformersBackend.switch` to another preference, n = 2 bf16 backbones and the bf16
  SFT model resident (alpha 0.2), served in fp32; against the baseline without `serve`: `merge_soup`
  of that preference to disk, then `from_pretrained` of the merged folder.
- LoRA (r = 16 per backbone, all linear layers): `TransformersBackend.adapter` for a new preference
  (rank concatenation in memory, PEFT add); against `merge_soup` of the adapter folder, then
  `PeftModel.load_adapter` into the running model.
Each is the fastest of ROUNDS alternating runs (all printed).

Throughput (whole processes): the real `openrlhf-bonesoup serve` command on 127.0.0.1 and the official
`openai` client, CONCURRENCY requests in flight, request i asking for preference i mod k (k = 1, 2,
8 distinct preferences), greedy, MAX_TOKENS new tokens each; requests/s and completion tokens/s over
the wall time of all requests, the better of 2 rounds (the second finds LoRA adapters cached).
/proc/loadavg is printed before and after each part: the machine is shared. --threads (default 1)
sets torch's threads here and OMP_NUM_THREADS in the server: on a 2-core VM shared with other jobs,
two OpenMP threads wait on each other and CPU generation of these small models ran 5-20x slower.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import os
import shutil
import socket
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
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from openrlhf_bonesoup import serve  # noqa: E402
from openrlhf_bonesoup.coefficients import backbone_matrix  # noqa: E402
from openrlhf_bonesoup.merge import merge_soup  # noqa: E402

ROUNDS = 3
CONCURRENCY = 8
MAX_TOKENS = 32
PROMPTS = tiny_models.CORPUS
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
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
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


def best(seconds: list[float]) -> str:
    return f"{min(seconds):8.3f} s  (runs: {', '.join(f'{s:.3f}' for s in seconds)})"


def switch_latency(root: Path, tok, hidden: int, layers: int) -> None:
    paths = [root / f"{name}_{hidden}x{layers}" for name in ("b0", "b1", "sft")]
    params = [checkpoint(p, tok, hidden, layers, seed) for seed, p in enumerate(paths)][0]
    gb = sum(f.stat().st_size for f in paths[0].glob("*.safetensors")) / 1e9
    backend = serve.TransformersBackend(serve.Soup(paths[:2], B, sft=paths[2], alpha=0.2), device="cpu")
    prefs = [(0.3, 0.7), (0.7, 0.3)]
    served, baseline = [], []
    for r in range(ROUNDS):
        mu = prefs[r % 2]
        t = time.perf_counter()
        backend.switch(mu)
        served.append(time.perf_counter() - t)
        t = time.perf_counter()
        kw = dict(sft=paths[2], alpha=0.2, overwrite=True, progress=False)
        (out,) = merge_soup(paths[:2], B, [mu], [root / "merged"], **kw)
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        baseline.append(time.perf_counter() - t)
        del model
    print(f"full weights, {params / 1e6:7.1f} M parameters ({gb:.2f} GB bf16 per checkpoint), load {loadavg()}")
    print(f"  serve: switch in place      {best(served)}")
    print(f"  merge to disk + from_pretrained {best(baseline)}   ratio {min(baseline) / min(served):.1f}x")
    del backend
    gc.collect()
    for p in [*paths, root / "merged"]:
        shutil.rmtree(p, ignore_errors=True)


def lora_latency(root: Path, tok, hidden: int, layers: int) -> None:
    base = root / f"base_{hidden}x{layers}"
    params = checkpoint(base, tok, hidden, layers, 0, dtype=torch.float32)
    adapters = [root / f"a{j}_{hidden}x{layers}" for j in range(2)]
    for j, a in enumerate(adapters):
        tiny_models.make_lora_adapter(a, base, r=16, lora_alpha=32, seed=j)
    mb = (adapters[0] / "adapter_model.safetensors").stat().st_size / 1e6
    backend = serve.TransformersBackend(serve.Soup(adapters, B, alpha=0.2), device="cpu")
    served, baseline = [], []
    for r in range(ROUNDS):
        mu = (0.1 + 0.1 * r, 0.9 - 0.1 * r)  # a new preference every time: no cached adapter
        t = time.perf_counter()
        backend.adapter(mu)
        served.append(time.perf_counter() - t)
        mu = (0.15 + 0.1 * r, 0.85 - 0.1 * r)
        t = time.perf_counter()
        (out,) = merge_soup(adapters, B, [mu], [root / "merged_lora"], alpha=0.2, overwrite=True, progress=False)
        backend.model.load_adapter(str(out), adapter_name=f"baseline{r}")
        baseline.append(time.perf_counter() - t)
        backend.model.delete_adapter(f"baseline{r}")
    print(f"LoRA r=16 x 2 on {params / 1e6:7.1f} M parameters ({mb:.1f} MB fp32 per adapter), load {loadavg()}")
    print(f"  serve: adapter in memory    {best(served)}")
    print(f"  merge to disk + load_adapter {best(baseline)}   ratio {min(baseline) / min(served):.1f}x")
    del backend
    gc.collect()
    for p in [base, *adapters, root / "merged_lora"]:
        shutil.rmtree(p, ignore_errors=True)


def throughput(root: Path, tok, hidden: int, layers: int, requests: int, threads: int) -> None:
    from openai import OpenAI

    paths = [root / f"t_{name}" for name in ("b0", "b1", "base")]
    for seed, p in enumerate(paths):
        checkpoint(p, tok, hidden, layers, seed, dtype=torch.float32)
    adapters = [root / f"t_a{j}" for j in range(2)]
    for j, a in enumerate(adapters):
        tiny_models.make_lora_adapter(a, paths[2], r=16, lora_alpha=32, seed=j)
    soups = {"full weights": paths[:2], "LoRA": adapters}
    for kind, backbones in soups.items():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "openrlhf_bonesoup.cli", "serve", "--backbones", ",".join(map(str, backbones))]
        cmd += ["--device", "cpu", "--port", str(port), "--max_batch_size", str(CONCURRENCY)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in the server
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            while True:
                if proc.poll() is not None:
                    sys.exit(f"serve failed: {proc.stderr.read()[-2000:]}")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                    break
                except OSError:
                    time.sleep(0.3)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)

            def ask(i: int, prefs: list, client=client) -> int:
                r = client.completions.create(
                    model="bonesoup",
                    prompt=PROMPTS[i % len(PROMPTS)],
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    extra_body={"preference": prefs[i % len(prefs)]},
                )
                return r.usage.completion_tokens

            print(f"throughput, {kind}, {hidden}x{layers}, {CONCURRENCY} in flight, load {loadavg()}")
            with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(lambda i: ask(i, [[0.5, 0.5]]), range(CONCURRENCY)))  # warm-up
                for k in (1, 2, 8):
                    prefs = [[(j + 1) / (k + 1), 1 - (j + 1) / (k + 1)] for j in range(k)]
                    rounds = []
                    for _ in range(2):
                        t = time.perf_counter()
                        tokens = sum(pool.map(lambda i, prefs=prefs: ask(i, prefs), range(requests)))
                        rounds.append((time.perf_counter() - t, tokens))
                    wall, tokens = min(rounds)
                    print(
                        f"  {k} preference(s): {requests / wall:6.2f} requests/s, {tokens / wall:7.1f} tokens/s "
                        f"({requests} requests, {tokens} tokens, {wall:.2f} s; rounds "
                        f"{', '.join(f'{w:.2f}' for w, _ in rounds)} s)"
                    )
            print(f"  load after: {loadavg()}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512x4,1024x8,2048x8", help="hidden x layers of each switch-latency model")
    parser.add_argument("--throughput_size", default="512x4", help="hidden x layers of the served model")
    parser.add_argument("--requests", type=int, default=32, help="requests per throughput measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server (see above)")
    parser.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bonesoup-serve-bench-", dir=args.workdir))
    try:
        torch.set_num_threads(args.threads)
        tok = tiny_models.make_tokenizer(root / "tok", "llama")
        print(f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, load {loadavg()}", flush=True)
        for size in args.sizes.split(","):
            hidden, layers = map(int, size.split("x"))
            switch_latency(root, tok, hidden, layers)
            lora_latency(root, tok, hidden, layers)
        hidden, layers = map(int, args.throughput_size.split("x"))
        throughput(root, tok, hidden, layers, args.requests, args.threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
