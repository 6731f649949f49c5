"""Merge benchmark: whole processes timed from outside, against plain I/O, mergekit and a reference merge.

Run by hand, not in CI (it writes ~150 GB in all and takes 20-40 minutes; keep --workdir on the disk
you want to measure, e.g. /tmp):

    .venv/bin/python benchmarks/merge.py --rounds 5 --max_load 2 --workdir /tmp
    .venv/bin/python benchmarks/merge.py --chunks 65536,262144,1048576 --small_layers 0   # chunk size

It generates two random bf16 LLaMA checkpoints per size (hidden 2048, MLP 5632, vocab 32000, HF shards
of 1 GB + index + config.json: 23 layers = 2.6 GB each, 6 layers (--small_layers) = 0.88 GB), then
runs every variant as its own process, timed from outside with a wall clock, until its output is
fsynced (`sync` runs before each run, outside the clock), and takes its CPU seconds (user + system,
its children included) from wait4. Each round runs every variant once, in a rotated order; a round
starts only when the 1-minute load average is below --max_load (or after --load_timeout seconds). It
prints medians over rounds, the median of the per-round ratios (paired runs), and the load average at
each round's start and end. The page cache is warm: every input was read in the previous round.

Variants (lambda = B^-1 (0, 1) with beta = 5/6, i.e. (-0.25, 1.25)):
- plain I/O, the floor of any merge, four ways (the fastest is the baseline): `cat` of both inputs
  to /dev/null, then `cat` of input 0 into the output, `sync` of it; the same with the output written
  by os.copy_file_range or os.sendfile (in the kernel, no user-space copy); and copy_file_range with
  the merge's own overlap of disk writes (a thread fdatasyncs the output while it is written);
- merge: `openrlhf-bonesoup merge` (the CLI, start-up included; `--device cuda` too where CUDA is);
- mergekit 0.1.5 `mergekit-yaml` linear, normalize false, dtype bfloat16, then `sync` of its output;
  installed into .bench-venv (torch pinned to ours) when missing;
- reference: what reference scripts do: from_pretrained x2, a state-dict sum, save_pretrained, fsync;
- at the smaller size, a K = 11 sweep (`merge --grid 11`) against the plain I/O of reading both inputs
  once and writing 11 outputs (`cat`, then `sync` of all 11);
- start-up: the merge CLI on two 4 KiB checkpoints, beside `python -c "import torch"`.
Outside the clock it checks that the merge writes mergekit's bytes, and samples peak anonymous memory
(RssAnon of /proc/PID/status: mmap'd file pages are not anonymous) for both sizes and a K = 11 sweep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".bench-venv"
BETA = 5 / 6  # B^-1 (0, 1) = (-0.25, 1.25)
CLI = [sys.executable, "-m", "openrlhf_bonesoup.cli"]
SWEEP = 11

# Plain I/O in Python, for the variants that write with a system call instead of `cat`.
PLAIN_IO = """
import os, sys, threading
mode, out, n0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
inputs = sys.argv[4:]
buf = bytearray(8 << 20)
for f in inputs:  # read both inputs, as `cat ... > /dev/null`
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
os.mkdir(out)
fd = os.open(os.path.join(out, "model.safetensors"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
done = threading.Event()
def flush():  # the merge's own overlap: fdatasync over and over while the file is written
    while not done.wait(0.05):
        os.fdatasync(fd)
flusher = threading.Thread(target=flush)
if mode == "flusher":
    flusher.start()
pos = 0
for f in inputs[:n0]:  # write input 0's bytes once more
    src, off, size = os.open(f, os.O_RDONLY), 0, os.path.getsize(f)
    while off < size:
        if mode == "sendfile":
            n = os.sendfile(fd, src, off, min(size - off, 64 << 20))
        else:
            n = os.copy_file_range(src, fd, min(size - off, 64 << 20), off, pos)
        off += n
        pos += n
    os.close(src)
done.set()
if mode == "flusher":
    flusher.join()
os.fsync(fd)
os.close(fd)
"""

REFERENCE = """
import os, sys, torch
from transformers import AutoModelForCausalLM
a, b, out, w0, w1 = sys.argv[1:6]
models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16) for p in (a, b)]
states = [m.state_dict() for m in models]
merged = {k: float(w0) * states[0][k] + float(w1) * states[1][k] for k in states[0]}
models[0].load_state_dict(merged)
models[0].save_pretrained(out)
for f in os.listdir(out):
    fd = os.open(os.path.join(out, f), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""

# The merge's fixed memory: the engine's imports and its compiled kernel, loaded, nothing merged.
KERNEL_ONLY = """
import numpy as np
from openrlhf_bonesoup import cli, kernel, merge_engine
x = np.zeros(8, np.uint16)
kernel.weighted_sums((x, x), np.ones((1, 2), np.float32), np.empty((1, 8), np.uint16), np.empty((0, 0), np.float32))
"""

CHUNKED_MERGE = """
import sys
from openrlhf_bonesoup import merge_engine
merge_engine.CHUNK_ELEMENTS = int(sys.argv[1])
from openrlhf_bonesoup.cli import main_entry
sys.argv = ["openrlhf-bonesoup", *sys.argv[2:]]
main_entry()
"""


def generate(folder: Path, layers: int, seed: int) -> None:
    """A random bf16 LLaMA checkpoint (hidden 2048, MLP 5632, vocab 32000) saved as 1 GB HF shards."""
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
        architectures=["LlamaForCausalLM"],  # mergekit reads the architecture from config.json
    )
    with torch.device("meta"):
        names = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for k, shape in names.items()}
    folder.mkdir(parents=True)
    save_torch_state_dict(state, str(folder), max_shard_size="1GB")
    config.save_pretrained(str(folder))


def mergekit_yaml() -> Path:
    """mergekit-yaml of mergekit 0.1.5 in .bench-venv, installed when missing (torch pinned to ours)."""
    import torch

    exe = BENCH_VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        print(f"installing mergekit 0.1.5 into {BENCH_VENV} (a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", torch_pin, "mergekit==0.1.5"], check=True)
    return exe


def mergekit_cmd(config: Path, out: Path) -> list[str]:
    """mergekit-yaml, then an fsync of what it wrote (it does not fsync by itself)."""
    return ["sh", "-c", f'"{BENCH_VENV}/bin/mergekit-yaml" "{config}" "{out}" > /dev/null 2>&1 && sync "{out}"/*']


def commands(inputs: list[Path], out: Path, weights: list[float], config: Path, variants: list[str]) -> dict:
    shards = [sorted(str(f) for f in p.glob("*.safetensors")) for p in inputs]
    n0 = str(len(shards[0]))
    merge = [*CLI, "merge", "--backbones", f"{inputs[0]},{inputs[1]}", "--beta", repr(BETA), "--preference", "0,1"]
    plain = [sys.executable, "-I", "-S", "-c", PLAIN_IO]
    # `cat` both inputs, then input 0's shards once more into the output (or into each of 11), and fsync.
    files, first = " ".join(f'"{f}"' for f in shards[0] + shards[1]), " ".join(f'"{f}"' for f in shards[0])
    cat = f'cat {files} > /dev/null && mkdir "{out}" && cat {first} > "{out}/model.safetensors"'
    sweep_dirs = " ".join(f'"{out}/{k}"' for k in range(SWEEP))
    cat_sweep = (
        f'cat {files} > /dev/null && mkdir -p {sweep_dirs} && for d in {sweep_dirs}; do cat {first} > "$d/m"; done'
    )
    all_variants = {
        "io_cat": ["sh", "-c", f'{cat} && sync "{out}/model.safetensors"'],
        "io_copy_file_range": [*plain, "copy_file_range", str(out), n0, *shards[0], *shards[1]],
        "io_sendfile": [*plain, "sendfile", str(out), n0, *shards[0], *shards[1]],
        "io_flusher": [*plain, "flusher", str(out), n0, *shards[0], *shards[1]],
        "merge": [*merge, "--output", str(out)],
        "merge_cuda": [*merge, "--output", str(out), "--device", "cuda"],
        "mergekit": mergekit_cmd(config, out),
        "reference": [sys.executable, "-c", REFERENCE, str(inputs[0]), str(inputs[1]), str(out), *map(repr, weights)],
        "sweep_io_cat": ["sh", "-c", f'{cat_sweep} && sync "{out}"/*/m'],
        "sweep_merge": [*merge[:-2], "--grid", str(SWEEP), "--output", str(out)],
    }
    for name in variants:
        if name.startswith("merge_chunk_"):
            chunk = name.removeprefix("merge_chunk_")
            all_variants[name] = [sys.executable, "-c", CHUNKED_MERGE, chunk, *merge[3:], "--output", str(out)]
    return {name: all_variants[name] for name in variants}


def run(cmd: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and the children it waited for)."""
    os.sync()  # no run pays for the previous one's dirty pages
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a progress bar never blocks on it
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"{cmd[:3]} failed:\n{err.read().decode(errors='replace')[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return seconds, usage.ru_utime + usage.ru_stime


def peak_anon_mib(cmd: list[str]) -> float:
    """Peak RssAnon of the command's process, sampled from outside every 10 ms (an untimed run)."""
    os.sync()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.01)
    if proc.wait() != 0:
        sys.exit(f"{cmd[:3]} failed")
    return peak / 1024


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_load(max_load: float, timeout: float) -> float:
    deadline = time.time() + timeout
    while load() >= max_load and time.time() < deadline:
        time.sleep(15)
    return load()


def same_tensors(a: Path, b: Path) -> str:
    """Whether two checkpoints hold the same tensors, bit for bit (read whole, tensor by tensor)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return f"different tensor names ({len(ia.keys() ^ ib.keys())} differ)"
    differ = 0
    for name in ia:
        with safe_open(ia[name], framework="pt") as fa, safe_open(ib[name], framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or not torch.equal(x.view(torch.int16), y.view(torch.int16)):
            differ += 1
    return f"{len(ia) - differ} of {len(ia)} tensors bit-identical"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of a's time / b's time in the same round."""
    return median([x / y for x, y in zip(times[a], times[b], strict=True)])


def rounds(cmds: dict[str, list[str]], out: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """Run every command once per round, in a rotated order; print each round; return wall and CPU seconds."""
    times: dict[str, list[float]] = {name: [] for name in cmds}
    cpus: dict[str, list[float]] = {name: [] for name in cmds}
    loads = []
    for r in range(args.rounds):
        seen = wait_for_load(args.max_load, args.load_timeout)
        loads.append(seen)
        order = list(cmds)[r % len(cmds) :] + list(cmds)[: r % len(cmds)]
        line = []
        for name in order:
            seconds, cpu = run(cmds[name], out)
            times[name].append(seconds)
            cpus[name].append(cpu)
            line.append(f"{name} {seconds:.2f}")
        print(f"  round {r + 1} (load {seen:.2f} at start, {load():.2f} at end): " + ", ".join(line), flush=True)
        loads.append(load())
    print(
        f"  medians over {args.rounds} rounds (1-min load average at round starts and ends: "
        f"{min(loads):.2f}-{max(loads):.2f}):"
    )
    for name, ts in times.items():
        print(
            f"    {name:20s} {median(ts):7.2f} s, CPU {median(cpus[name]):6.2f} s   "
            f"(runs: {', '.join(f'{t:.2f}' for t in ts)})"
        )
    return times, cpus


def startup(root: Path, args: argparse.Namespace) -> None:
    """The merge CLI's fixed cost: a merge of two 4 KiB checkpoints, beside `import torch` alone."""
    import torch
    from safetensors.torch import save_file

    tiny = [root / "tiny_b0", root / "tiny_b1"]
    for seed, path in enumerate(tiny):
        path.mkdir()
        gen = torch.Generator().manual_seed(seed)
        save_file({"w": torch.randn(2048, generator=gen).to(torch.bfloat16)}, str(path / "model.safetensors"))
    out = root / "out"
    merge = [*CLI, "merge", "--backbones", f"{tiny[0]},{tiny[1]}", "--beta", repr(BETA), "--preference", "0,1"]
    print("\n== start-up: the merge CLI on two 4 KiB checkpoints", flush=True)
    rounds(
        {"merge_tiny": [*merge, "--output", str(out)], "import_torch": [sys.executable, "-c", "import torch"]},
        out,
        args,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=23, help="decoder layers (23: 2.6 GB per checkpoint)")
    parser.add_argument("--small_layers", type=int, default=6, help="the smaller size (6: 0.88 GB; 0: skip it)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max_load", type=float, default=0.7, help="start a round only below this 1-minute load")
    parser.add_argument("--load_timeout", type=float, default=1800, help="seconds to wait for that load per round")
    parser.add_argument("--chunks", default=None, help="only time the merge at these CHUNK_ELEMENTS values")
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    from openrlhf_bonesoup import coefficients

    lam = coefficients.merge_coefficients(coefficients.backbone_matrix(BETA, 2), [0.0, 1.0]).tolist()
    if args.chunks:
        variants = [f"merge_chunk_{c}" for c in args.chunks.split(",")]
    else:
        variants = ["io_cat", "io_copy_file_range", "io_sendfile", "io_flusher", "merge", "mergekit", "reference"]
        variants += ["merge_cuda"] if torch.cuda.is_available() else []
        mergekit_yaml()
    mem = Path("/proc/meminfo").read_text().split()[1]
    cpu = next(
        (ln.split(":")[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln), "?"
    )
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {os.cpu_count()} CPUs ({cpu}), {int(mem) / 2**20:.0f} GiB RAM, "
        f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}, "
        f"load average {Path('/proc/loadavg').read_text().strip()}",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="bonesoup-merge-bench-", dir=args.workdir))
    try:
        if not args.chunks:
            startup(root, args)
        sizes = [("large", args.layers)] + ([("small", args.small_layers)] if args.small_layers else [])
        for label, layers in sizes:
            inputs = [root / f"{label}_b0", root / f"{label}_b1"]
            for seed, path in enumerate(inputs):
                generate(path, layers, seed)
            size = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors"))
            config = root / f"{label}_mergekit.yml"
            config.write_text(
                "merge_method: linear\nparameters:\n  normalize: false\ndtype: bfloat16\nmodels:\n"
                + "".join(
                    f"  - model: {p}\n    parameters:\n      weight: {w!r}\n" for p, w in zip(inputs, lam, strict=True)
                )
            )
            out = root / "out"
            sweep = label == sizes[-1][0] and not args.chunks  # the smaller size only: 11 outputs per run
            cmds = commands(inputs, out, lam, config, variants + (["sweep_io_cat", "sweep_merge"] if sweep else []))
            print(f"\n== {label}: 2 inputs of {size / 1e9:.2f} GB ({layers} layers), lambda {lam}", flush=True)

            if not args.chunks:  # outside the clock: the merge writes mergekit's bytes; memory
                check = [*cmds["merge"][:-1], str(root / "check_merge")]
                subprocess.run(check, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run(mergekit_cmd(config, root / "check_kit"), check=True)
                print(f"  merge output vs mergekit output: {same_tensors(root / 'check_merge', root / 'check_kit')}")
                shutil.rmtree(root / "check_merge")
                shutil.rmtree(root / "check_kit")
                memory = {"merge": peak_anon_mib(cmds["merge"])}
                shutil.rmtree(out, ignore_errors=True)
                if sweep:
                    memory[f"K = {SWEEP} sweep"] = peak_anon_mib(cmds["sweep_merge"])
                    shutil.rmtree(out, ignore_errors=True)
                memory["python + the engine's imports, kernel loaded"] = peak_anon_mib(
                    [sys.executable, "-c", KERNEL_ONLY]
                )
                print("  peak RssAnon: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in memory.items()), flush=True)

            times, cpus = rounds(cmds, out, args)
            if args.chunks:
                continue
            io = min((n for n in times if n.startswith("io_")), key=lambda n: median(times[n]))
            goal = 1.5 if label == "small" else 1.25
            mib_s = (3 * size / 1e6) / median(times[io])  # the floor reads 2 inputs and writes 1 of the same size
            print(f"  plain I/O baseline: {io} (the fastest of the four): {mib_s:.0f} MB/s read + written")
            print(f"  merge / plain I/O                 {paired(times, 'merge', io):5.2f}  [goal <= {goal}]")
            print(f"  merge / plain I/O with `cat`      {paired(times, 'merge', 'io_cat'):5.2f}")
            print(
                f"  mergekit / merge                  {paired(times, 'mergekit', 'merge'):5.2f}x [goal >= 6 at 0.88 GB]"
            )
            print(f"  reference / merge                 {paired(times, 'reference', 'merge'):5.2f}x")
            print(
                f"  CPU s: merge {median(cpus['merge']):.2f}, {io} {median(cpus[io]):.2f}, "
                f"mergekit {median(cpus['mergekit']):.2f}, reference {median(cpus['reference']):.2f}"
            )
            if "merge_cuda" in times:
                print(f"  merge --device cuda / plain I/O   {paired(times, 'merge_cuda', io):5.2f}")
            if sweep:
                ratio = paired(times, "sweep_merge", "sweep_io_cat")
                print(f"  K = {SWEEP} sweep / its plain I/O      {ratio:5.2f}  [goal <= 1.5]")
            for path in inputs:
                shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
