"""Merge benchmark: the streaming engine against plain I/O and a reference-style in-RAM merge.

Run by hand, not in CI (it writes ~25 GB in all and takes minutes):

    .venv/bin/python benchmarks/merge.py                 # n = 2 backbones + SFT, ~1.5 GB each
    .venv/bin/python benchmarks/merge.py --layers 4      # a smaller model, for a quick look

It generates LLaMA-shaped bf16 checkpoints (HF shards + index + config.json) in a temporary folder,
runs every variant in its own subprocess, samples that process's RssAnon (anonymous memory: mmap'd
safetensors pages are file-backed and not counted) every 5 ms from /proc/self/status, prints the
ratios in one run, and deletes everything. Every variant fsyncs its output before the clock stops, so
all times are "until the bytes are on disk"; `sync` runs before each variant. The inputs mostly sit
in the page cache (they were just written and fit in RAM). The short variants run ROUNDS times,
interleaved, and the fastest run counts (all are printed); the K = 11 sweep and the 11 single merges
(outputs kept, like the sweep's) run once. --workers 2 runs its work in child processes, whose
memory this sampler does not see: only its time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GRID = 11
ROUNDS = 3
WEIGHTS = [0.42, 0.78, -0.2]  # (1 + alpha) lambda and -alpha for beta = 0.7, mu = (0.4, 0.6), alpha = 0.2


def _anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def generate(folder: Path, layers: int, seed: int) -> None:
    """A random bf16 LLaMA checkpoint (hidden 2048, MLP 5632, vocab 32000) saved as HF shards."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        names = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for k, shape in names.items()}
    folder.mkdir(parents=True)
    save_torch_state_dict(state, str(folder), max_shard_size="1GB")
    config.save_pretrained(str(folder))


def variant(name: str, inputs: list[Path], out: Path) -> None:
    """One measured variant, in this (sub)process; prints a JSON line with seconds and memory."""
    import torch  # noqa: F401  (imports before the baseline, so they are not counted as the merge's memory)

    from openrlhf_bonesoup import coefficients, merge

    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon_kib())
            time.sleep(0.005)

    base = _anon_kib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if name == "io":
        # Read every input byte and write one output's bytes: the floor for any merge.
        size = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors"))
        buffer = bytearray(64 << 20)
        for path in inputs:
            for f in sorted(path.glob("*.safetensors")):
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buffer):
                        pass
        out.mkdir()
        with open(out / "model.safetensors", "wb", buffering=0) as fh:
            for _ in range(0, size, len(buffer)):
                fh.write(buffer)
        _fsync_tree(out)
    elif name in ("merge", "merge_workers2"):
        merge.merge_checkpoints(inputs, [WEIGHTS], [out], workers=2 if name == "merge_workers2" else 1, progress=False)
    elif name == "singles":
        matrix = coefficients.backbone_matrix(0.7, 2)
        # Outputs are kept, as the sweep keeps its K: both then leave the same bytes in the page cache.
        prefs = coefficients.preference_grid(GRID)
        for mu, single in zip(prefs, merge.sweep_outputs(out, prefs), strict=True):
            merge.merge_soup(inputs[:2], matrix, [mu], [single], sft=inputs[2], alpha=0.2, progress=False)
    elif name == "sweep":
        prefs = coefficients.preference_grid(GRID)
        outs = merge.sweep_outputs(out, prefs)
        matrix = coefficients.backbone_matrix(0.7, 2)
        merge.merge_soup(inputs[:2], matrix, prefs, outs, sft=inputs[2], alpha=0.2, progress=False)
    elif name == "reference":
        # What the reference scripts do: every model fully in RAM through from_pretrained, state dicts
        # summed in the model dtype, save_pretrained.
        from transformers import AutoModelForCausalLM

        models = [AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.bfloat16) for p in inputs]
        states = [m.state_dict() for m in models]
        merged = {k: sum(w * s[k] for w, s in zip(WEIGHTS, states, strict=True)) for k in states[0]}
        models[0].load_state_dict(merged)
        models[0].save_pretrained(str(out))
        _fsync_tree(out)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "peak_anon_mib": peak[0] / 1024, "base_anon_mib": base / 1024}))


def run(name: str, inputs: list[Path], out: Path) -> dict:
    os.sync()  # no variant pays for the previous one's dirty pages
    cmd = [sys.executable, __file__, "--variant", name, "--out", str(out), *map(str, inputs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    memory = f"peak RssAnon {result['peak_anon_mib']:6.0f} MiB (after imports {result['base_anon_mib']:.0f} MiB)"
    if name == "merge_workers2":
        memory = "(its memory is in the worker processes: not sampled)"
    print(f"  {name:15s} {result['seconds']:8.2f} s   {memory}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (12: ~1.5 GB per checkpoint)")
    parser.add_argument("--small_layers", type=int, default=3, help="a smaller model, for memory vs model size")
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temporary folder)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        variant(args.variant, [Path(p) for p in args.inputs], Path(args.out))
        return

    root = Path(tempfile.mkdtemp(prefix="bonesoup-merge-bench-", dir=args.workdir))
    try:
        print(f"cpus {os.cpu_count()}, workdir {root}", flush=True)
        inputs = [root / name for name in ("backbone0", "backbone1", "sft")]
        t = time.perf_counter()
        for seed, path in enumerate(inputs):
            generate(path, args.layers, seed)
        size = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors"))
        print(
            f"generated 3 checkpoints of {size / 1e9:.2f} GB ({args.layers} layers) in {time.perf_counter() - t:.0f} s"
        )
        out = root / "out"
        # Interleaved rounds of the short variants, the fastest run of each counts: page-cache and
        # writeback state left by whatever ran before (other users of the machine too) then weigh less.
        r: dict[str, dict] = {}
        for _ in range(ROUNDS):
            for name in ("io", "merge", "merge_workers2", "reference"):
                result = run(name, inputs, out)
                if name not in r or result["seconds"] < r[name]["seconds"]:
                    r[name] = result
        r["singles"] = run("singles", inputs, out)
        r["sweep"] = run("sweep", inputs, out)

        small = [root / f"small_{p.name}" for p in inputs]
        for seed, path in enumerate(small):
            generate(path, args.small_layers, seed)
        small_size = sum(f.stat().st_size for f in small[0].glob("*.safetensors"))
        print(f"smaller model: {small_size / 1e9:.2f} GB per checkpoint ({args.small_layers} layers)")
        r["merge_small"] = run("merge", small, out)

        def extra(name: str) -> float:
            return r[name]["peak_anon_mib"] - r[name]["base_anon_mib"]

        def ratio(a: str, b: str) -> float:
            return r[a]["seconds"] / r[b]["seconds"]

        print("\nresults (goal in brackets)")
        print(f"  merge time / plain read+write time        {ratio('merge', 'io'):.2f}  [<= 1.5]")
        print(f"  speed-up over reference in-RAM merge      {ratio('reference', 'merge'):.2f}x [>= 3]")
        print(f"  --workers 2 / --workers 1 on this machine {ratio('merge_workers2', 'merge'):.2f}")
        print(f"  K = {GRID} sweep time / {GRID} single merges    {ratio('sweep', 'singles'):.2f}")
        print(
            f"  anonymous memory above imports: merge {extra('merge'):.0f} MiB "
            f"({size / 2**20:.0f} MiB model), same merge of a {small_size / 2**20:.0f} MiB model "
            f"{extra('merge_small'):.0f} MiB, K = {GRID} sweep {extra('sweep'):.0f} MiB, "
            f"reference {extra('reference'):.0f} MiB"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
