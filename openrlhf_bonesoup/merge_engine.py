"""The streaming merge engine: outputs[k] = sum_i weights[k][i] * inputs[i], tensor by tensor.

(Over 400 lines on purpose: the pipeline's threads (readers, the flusher) and both devices share one chunk
schedule and its buffers; split, each part would reach into the others' state.)

It knows only merge plans (one weight per input, per output), so Bone Soup, Rewarded Soup, MORLHF
interpolation and SFT extrapolation are the same code; merge.py turns preferences into plans.
The arithmetic is an fp32 accumulation in input order, one fused multiply-add per term, rounded once to
the checkpoint dtype: on CPU by the compiled kernel of kernel.py, on a GPU (and in a server that
reuses it) by `weighted_sum`, with the same bytes.

The pipeline for full-weight checkpoints (checkpoints.py reads and writes the safetensors files):
- read: every input file is mmap'd once and each chunk (a run of one tensor's elements) is viewed
  in place, without a copy (measured cheaper here than preadv/readinto into a buffer: no copy out of
  the page cache, and the faults map 16 pages at a time);
- sum: one worker thread per core takes chunks in file order; per chunk, kernel.weighted_sums reads
  the n input views once and writes all K outputs, cast and checked finite, into the thread's output
  buffer, which is pwritten at its final offset (the one copy into the page cache; writing through a
  shared mmap of the output instead was 5x more system time: a zeroed page and a fault per 4 KiB).
  Memory stays a few chunks per thread whatever the model size, n or K. The CPU path imports no torch
  (2 s of start-up) unless LoRA deltas are densified;
- write: a flusher thread fdatasyncs the output files over and over while they are written, so the
  disk writes during the arithmetic and the final fsync (before the rename) waits only for the tail;
- device="cuda": the same chunks go through pinned host buffers and are summed and cast on the GPU,
  one CUDA stream per worker thread, so one thread's copies overlap another's arithmetic.
LoRA adapters go to lora.py (rank concatenation), or through this pipeline with their deltas added
(densify).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import itertools
import json
import math
import mmap
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from openrlhf_bonesoup import checkpoints, lora, soup
from openrlhf_bonesoup.checkpoints import ITEMSIZE, PROVENANCE
from openrlhf_bonesoup.coefficients import clean
from openrlhf_bonesoup.errors import BoneSoupError

if TYPE_CHECKING:
    import torch

FORMAT = "openrlhf-bonesoup/merge/v1"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hub's usual shard size; transformers 5 itself defaults to 50GB
# Elements per chunk. CPU: large enough that Python's per-chunk work (views, a kernel call, K pwrites)
# is small, small enough that a chunk's outputs stay in the core's cache until they are pwritten
# (`benchmarks/merge.py --chunks` measures the choice). CUDA: large enough that kernel launches are
# small next to the host copies (not measured on a GPU yet).
CHUNK_ELEMENTS = 1 << 18
CUDA_CHUNK_ELEMENTS = 1 << 20


def weighted_sum(xs: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor) -> torch.Tensor:
    """out = sum_i weights[i] * xs[i], accumulated in fp32 in input order; returns out.

    out: an fp32 tensor of xs[0]'s shape, on the device of the xs. Each term is one fused multiply-add
    rounded to fp32 (torch's add_ with alpha, on CPU and CUDA alike): the chain of the CPU merge's
    kernel (kernel.py), so `--device cuda` and a server's sums give the merge's bytes; callers cast
    the result to the checkpoint dtype (one rounding).
    """
    import torch  # here, not at the top: the CPU merge never needs it (2 s of start-up)

    if out.dtype != torch.float32 or not xs or len(xs) != len(weights) or any(x.shape != out.shape for x in xs):
        shapes = sorted({tuple(x.shape) for x in xs})
        raise ValueError(
            f"weighted_sum needs an fp32 out of the xs' shape and one weight per x: out {out.dtype}"
            f"{tuple(out.shape)}, xs of shapes {shapes}, {len(weights)} weights for {len(xs)} xs"
        )
    out.zero_()
    for x, w in zip(xs, weights, strict=True):
        out.add_(x, alpha=w)
    return out


# ---------------------------------------------------------------------------------------------- engine


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike],
    weights: Sequence[Sequence[float]],
    outputs: Sequence[str | os.PathLike],
    *,
    provenance: Sequence[dict] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    workers: int = 1,
    device: str = "cpu",
    progress: bool = True,
    densify: bool = False,
    base: str | os.PathLike | None = None,
) -> list[Path]:
    """Write outputs[k] = sum_i weights[k][i] * inputs[i] for every k, reading each input tensor once.

    inputs: HF safetensors checkpoint folders (single file or sharded with an index), or all PEFT
    LoRA adapter folders. provenance[k] is merged into outputs[k]/bonesoup_merge.json. The merge uses
    every core of this process; workers > 1 splits the tensors across spawned processes (a script
    needs the usual `if __name__ == "__main__":` guard), or across Ray tasks when Ray is initialised
    (the folders must then be on a shared filesystem). device: "cpu", or "cuda[:N]" to sum the chunks
    on a GPU (bit-identical output). densify (adapters only): write full weights of the base model
    (`base`, default: the adapters' base_model_name_or_path) instead of one adapter.
    Returns the output folders; raises BoneSoupError on bad input and leaves no output behind.
    """
    inputs, outputs = [Path(p) for p in inputs], [Path(p) for p in outputs]
    weights = _check_plan(weights, len(inputs), len(outputs))
    if provenance is not None and len(provenance) != len(outputs):
        raise BoneSoupError(f"{len(provenance)} provenance records for {len(outputs)} outputs")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BoneSoupError(f"workers must be an integer >= 1, got {workers!r}")
    device = _check_device(device, workers)
    for p in inputs:
        checkpoints.weight_files(p)  # existence and the no-pickle rule, before anything else
    checkpoints.check_outputs(inputs, outputs, overwrite)
    adapters = [lora.is_adapter(p) for p in inputs]
    if any(adapters) and not all(adapters):
        raise BoneSoupError("inputs mix LoRA adapter folders and full checkpoints: merge one kind at a time")
    if densify and not all(adapters):
        raise BoneSoupError("densify applies to LoRA adapter inputs only")
    identities = [{"path": str(p.resolve()), **soup.checkpoint_identity(p)} for p in inputs]
    records = [
        {
            "format": FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "inputs": identities,
            "weights": list(w),
            **(provenance[k] if provenance else {}),
        }
        for k, w in enumerate(weights)
    ]

    tmps: list[Path] = []
    stream = dict(max_shard_size=max_shard_size, workers=workers, device=device, progress=progress)
    try:
        with checkpoints.sigterm_as_exit():
            tmps.extend(checkpoints.temp_dir(out) for out in outputs)
            if not all(adapters):
                side = checkpoints.side_files(inputs)
                _stream(inputs, weights, tmps, **stream)
            elif densify:
                base = lora.base_model(inputs[0], base)
                side = checkpoints.side_files([base])
                merged, config, _ = lora.concatenate(inputs, weights)
                _stream([base], [[1.0]] * len(outputs), tmps, deltas=lora.deltas(merged, config), **stream)
                for record in records:
                    record["lora"] = "densified"
                    record["base"] = {"path": str(base.resolve()), **soup.checkpoint_identity(base)}
            else:
                side = checkpoints.side_files(inputs, skip=(lora.ADAPTER_CONFIG,))
                merged, config, dtype = lora.concatenate(inputs, weights)
                lora.save(merged, config, dtype, tmps)
                for record in records:
                    record["lora"] = "concatenated rank"
            for tmp, record in zip(tmps, records, strict=True):
                for f in side:
                    shutil.copy2(f, tmp / f.name)
                (tmp / PROVENANCE).write_text(json.dumps(clean(record), indent=2) + "\n")
                checkpoints.fsync_folder(tmp)
            for tmp, out in zip(tmps, outputs, strict=True):
                checkpoints.publish(tmp, out, overwrite)
    except BaseException:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return outputs


def _check_plan(weights: Sequence[Sequence[float]], n: int, k: int) -> list[list[float]]:
    plan = [[float(w) for w in row] for row in weights]
    if not plan or len(plan) != k:
        raise BoneSoupError(f"a merge plan needs one weight row per output: {len(plan)} rows for {k} outputs")
    for row in plan:
        if len(row) != n or not all(math.isfinite(w) for w in row):
            raise BoneSoupError(f"each weight row needs {n} finite numbers (one per input), got {row}")
    return plan


def _check_device(device: str, workers: int) -> str:
    if device == "cpu":
        return device
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise BoneSoupError(f"device must be cpu or cuda[:N], got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BoneSoupError(f"--device {device}: no CUDA device is available to torch {torch.__version__}")
    if kind == "cuda" and workers > 1:
        raise BoneSoupError("--workers applies to CPU merges; with --device cuda give --workers 1")
    return str(device) if kind == "cuda" else "cpu"


# ---------------------------------------------------------------------------------------------- streaming


def _stream(
    inputs: Sequence[Path],
    weights: list[list[float]],
    tmps: Sequence[Path],
    *,
    max_shard_size: int | str,
    workers: int,
    device: str,
    progress: bool,
    deltas: list[dict] | None = None,
) -> None:
    """The streaming merge of full checkpoints into the folders tmps (one per weight row)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    layouts = [checkpoints.read_layout(p) for p in inputs]
    checkpoints.check_layouts(inputs, layouts)
    spec = {name: (dtype, shape) for name, (_, dtype, shape, _) in layouts[0].items()}
    for delta in deltas or []:
        for name, (a, b, transposed) in delta.items():
            shape = [a.shape[1], b.shape[0]] if transposed else [b.shape[0], a.shape[1]]
            if name not in spec or spec[name][1] != shape:
                raise BoneSoupError(f"the adapters change {name!r} {shape}, which the base model {inputs[0]} lacks")
    sizes = {name: checkpoints.nbytes(dtype, shape) for name, (dtype, shape) in spec.items()}
    try:
        # HF's own shard split (as save_pretrained does), fed byte sizes instead of tensors.
        split = split_state_dict_into_shards_factory(
            sizes, get_storage_size=int, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
    except ValueError as e:
        raise BoneSoupError(f"bad max shard size {max_shard_size!r}: {e}") from None

    # Create every output file with its header and full size, so workers write at fixed offsets.
    where: dict[str, tuple[str, int]] = {}
    for filename, names in split.filename_to_tensors.items():
        header, offsets, size = checkpoints.header(spec, names)
        where.update({name: (filename, offset) for name, offset in offsets.items()})
        for tmp in tmps:
            with open(tmp / filename, "wb") as f:
                f.write(header)
                f.truncate(size)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        for tmp in tmps:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # Jobs: runs of tensors in output order, of about equal bytes, one per worker process (several
    # per process so the bar moves and loads balance); within a job, threads share the chunks.
    order = sorted(spec, key=lambda name: where[name])
    total = sum(sizes.values())
    per_job = total / (1 if workers == 1 else 4 * workers)
    groups: list[list[str]] = [[]]
    filled = 0
    for name in order:
        if groups[-1] and filled + sizes[name] > per_job:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += sizes[name]
    threads = max(1, len(os.sched_getaffinity(0)) // workers if hasattr(os, "sched_getaffinity") else 1)
    jobs = [
        {
            "inputs": [str(p) for p in inputs],
            "tensors": [
                {
                    "name": name,
                    "dtype": spec[name][0],
                    "shape": spec[name][1],
                    "sources": [(layout[name][0], layout[name][3]) for layout in layouts],
                    "outputs": [(str(tmp / where[name][0]), where[name][1]) for tmp in tmps],
                    "deltas": [d.get(name) for d in deltas] if deltas else None,
                }
                for name in group
            ],
            "weights": weights,
            "threads": threads,
            "device": device,
        }
        for group in groups
    ]

    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"merge -> {len(tmps)} output(s)", disable=not progress
    ) as bar:
        if workers == 1:
            _run_job(jobs[0], bar)
        else:
            for done in _run_parallel(jobs, workers):
                bar.update(done)


def _run_parallel(jobs: list[dict], workers: int) -> Iterator[int]:
    """Run jobs on Ray tasks when Ray is initialised, else on a spawned process pool; yield bytes done."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        task = ray.remote(num_cpus=1)(_run_job)  # one core per task: a cluster's nodes may be smaller than this one
        pending = [task.remote(dict(job, threads=1)) for job in jobs]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield ray.get(ready[0])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        return
    # spawn, not fork: forking a process that already ran torch's thread pools can deadlock.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _chunks(job: dict, chunk: int) -> list[tuple[int, int, int]]:
    """(tensor index, first element, end element) in file order; rows whole where a LoRA delta is added."""
    items = []
    for t, tensor in enumerate(job["tensors"]):
        numel = math.prod(tensor["shape"])
        step = chunk
        if tensor["deltas"] and any(tensor["deltas"]):
            row = math.prod(tensor["shape"][1:])
            step = max(1, chunk // row) * row
        items.extend((t, start, min(numel, start + step)) for start in range(0, numel, step))
    return items


def _run_job(job: dict, bar: tqdm | None = None) -> int:
    """Compute job's tensors for every output and write them at their offsets; return bytes done.

    Worker threads take chunks in file order; a chunk's n input views are read once for all K outputs.
    """
    cuda = job["device"] != "cpu"
    items = _chunks(job, CUDA_CHUNK_ELEMENTS if cuda else CHUNK_ELEMENTS)
    longest = max((end - start for _, start, end in items), default=0)
    maps: dict[str, np.ndarray] = {}
    for tensor in job["tensors"]:
        for file, _ in tensor["sources"]:
            if file not in maps:
                with open(file, "rb") as f:  # a private mapping: writable views (torch wants them), never written
                    maps[file] = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), np.uint8)
    fds = {path: os.open(path, os.O_WRONLY) for tensor in job["tensors"] for path, _ in tensor["outputs"]}
    write = _writer(fds)
    position, lock, stop, errors = itertools.count(), threading.Lock(), threading.Event(), []
    done = [0]

    def work() -> None:
        try:
            step = (_cuda_step if cuda else _cpu_step)(job, maps, write, longest)
            while not stop.is_set():
                i = next(position)  # atomic: each chunk goes to one thread
                if i >= len(items):
                    return
                nbytes = step(*items[i])
                with lock:
                    done[0] += nbytes
                    if bar is not None:
                        bar.update(nbytes)
        except BaseException as e:  # noqa: B036  (re-raised by the calling thread)
            errors.append(e)
            stop.set()

    def flush() -> None:
        # The disk writes what the workers wrote while they go on summing: the final fsync (before
        # the rename) then waits only for the tail. A thread of its own, so no worker waits on the disk.
        try:
            while not flushed.wait(0.05):
                for fd in fds.values():
                    _datasync(fd)
        except OSError as e:  # a full or failing disk
            errors.append(e)
            stop.set()

    # torch (CUDA, LoRA deltas) runs one thread inside each worker: no OpenMP barriers, which stall
    # when other processes share the cores.
    uses_torch = cuda or _densified(job)
    if uses_torch:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    pool = [threading.Thread(target=work, daemon=True) for _ in range(job["threads"])]
    flushed = threading.Event()
    flusher = threading.Thread(target=flush, daemon=True)
    started: list[threading.Thread] = []
    try:
        # SIGTERM and Ctrl-C wait until every thread has started: one raised between two starts
        # would leave a running thread that the clean-up below does not join.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for thread in [*pool, flusher]:
                thread.start()
                started.append(thread)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for thread in pool:
            thread.join()
    finally:
        stop.set()  # an exception here (SIGTERM, Ctrl-C) stops the workers after their current chunk
        flushed.set()
        for thread in started:
            thread.join()
        if uses_torch:
            torch.set_num_threads(threads)
        for fd in fds.values():
            os.close(fd)
    if errors:
        raise errors[0]
    return done[0]


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _densified(job: dict) -> bool:
    return any(t["deltas"] and any(t["deltas"]) for t in job["tensors"])


def _bytes(maps: dict, source: tuple[str, int], dtype: str, start: int, end: int) -> np.ndarray:
    """The bytes of elements start:end of a tensor whose data begins at byte source[1] of file source[0]."""
    item = ITEMSIZE[dtype]
    return maps[source[0]][source[1] + start * item : source[1] + end * item]


def _writer(fds: dict[str, int]) -> Callable[[str, np.ndarray, int], None]:
    """write(path, data, offset): pwrite a contiguous array into one of the job's output files."""

    def write(path: str, data: np.ndarray, offset: int) -> None:
        if os.pwrite(fds[path], data, offset) != data.nbytes:
            raise OSError(f"short write to {path} at byte {offset}")

    return write


def _copy_or_refuse(tensor: dict, raw: list[np.ndarray], write, start: int) -> None:
    """Integer/bool tensors (masks, ids) cannot be averaged: they must agree and are copied."""
    if not all(np.array_equal(raw[0], r) for r in raw[1:]):
        raise BoneSoupError(f"integer tensor {tensor['name']!r} differs between the inputs; cannot merge it")
    for path, offset in tensor["outputs"]:
        write(path, raw[0], offset + start * ITEMSIZE[tensor["dtype"]])


def _non_finite(job: dict, tensor: dict, raw: list[np.ndarray], k: int) -> BoneSoupError:
    """The error for a chunk whose output k is not finite: an input's NaN/inf, else an overflow."""
    from openrlhf_bonesoup.kernel import STORAGE

    for path, r in zip(job["inputs"], raw, strict=False):
        x = r.view(STORAGE[tensor["dtype"]])
        exponent = {np.uint16: 0x7F80, np.int16: 0x7C00}.get(x.dtype.type)  # bf16, fp16: all ones = inf/NaN
        if not (np.isfinite(x).all() if exponent is None else ((x & exponent) != exponent).all()):
            return BoneSoupError(f"tensor {tensor['name']!r} of {path} has NaN/inf values; refusing to merge it")
    return BoneSoupError(f"tensor {tensor['name']!r} overflows its dtype in output {k} (weights {job['weights'][k]})")


def _deltas(tensor: dict, start: int, end: int) -> list[torch.Tensor] | None:
    """Rows start:end of each output's LoRA delta (fp32, flat) when densifying, else None."""
    if not (tensor["deltas"] and any(tensor["deltas"])):
        return None
    # concatenate() gives every output the same adapted modules: all K deltas exist, or none.
    row = math.prod(tensor["shape"][1:])
    return [lora.delta_rows(*delta, start // row, end // row).reshape(-1) for delta in tensor["deltas"]]


def _cpu_step(job: dict, maps: dict, write, longest: int):
    """One worker thread's chunk function on CPU; its output buffer lives as long as the thread.

    kernel.weighted_sums reads the n input views in place (the mapped page cache) and writes the K
    cast chunks into the buffer, which go to the page cache with one pwrite each: no other copy.
    """
    from openrlhf_bonesoup import kernel  # numba: compiled on first use, then loaded from its disk cache

    weights = np.asarray(job["weights"], dtype=np.float32)  # torch's add_ rounds alpha to fp32 too
    buffer = np.empty(len(job["weights"]) * longest * _width(job), dtype=np.uint8)
    no_extra = np.empty((0, 0), dtype=np.float32)

    def step(t: int, start: int, end: int) -> int:
        tensor = job["tensors"][t]
        dtype, size = tensor["dtype"], (end - start) * ITEMSIZE[tensor["dtype"]]
        raw = [_bytes(maps, source, dtype, start, end) for source in tensor["sources"]]
        if dtype not in kernel.STORAGE:
            _copy_or_refuse(tensor, raw, write, start)
            return size
        xs = tuple(r.view(kernel.STORAGE[dtype]) for r in raw)  # unaligned views too (files not from safetensors)
        out = buffer[: len(weights) * size].view(xs[0].dtype).reshape(len(weights), end - start)
        deltas = _deltas(tensor, start, end)
        extra = no_extra if deltas is None else np.stack([d.numpy() for d in deltas])
        bad = kernel.weighted_sums(xs, weights, out, extra)
        if bad >= 0:
            raise _non_finite(job, tensor, raw, bad)
        for (path, offset), chunk in zip(tensor["outputs"], out, strict=True):
            write(path, chunk, offset + start * ITEMSIZE[dtype])
        return size

    return step


def _cuda_step(job: dict, maps: dict, write, longest: int):
    """One worker thread's chunk function on a GPU: pinned staging buffers and its own CUDA stream.

    The thread copies the chunk's inputs into pinned memory; its stream moves them to the GPU, sums,
    casts, and brings the cast chunk and its sum back; only then does the thread wait. The other
    threads' streams run meanwhile, so copies overlap arithmetic. LoRA deltas are computed on the
    CPU, as in a CPU merge, so that densified outputs are bit-identical too.
    """
    import torch

    floats = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    device, width = torch.device(job["device"]), _width(job)
    stream = torch.cuda.Stream(device)
    slots = len(job["inputs"]) + 1  # the inputs and a LoRA delta
    host_in = [torch.empty(longest * width, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
    gpu_in = [torch.empty(longest * width, dtype=torch.uint8, device=device) for _ in range(slots)]
    host_out = torch.empty(longest * width, dtype=torch.uint8, pin_memory=True)
    gpu_out = torch.empty(longest * width, dtype=torch.uint8, device=device)
    acc = torch.empty(longest, dtype=torch.float32, device=device)
    total = torch.empty(1, dtype=torch.float32, pin_memory=True)

    def to_gpu(x: torch.Tensor, slot: int) -> torch.Tensor:
        size = x.numel() * x.element_size()
        host = host_in[slot][:size].view(x.dtype).copy_(x)
        return gpu_in[slot][:size].view(x.dtype).copy_(host, non_blocking=True)

    def step(t: int, start: int, end: int) -> int:
        tensor = job["tensors"][t]
        size = (end - start) * ITEMSIZE[tensor["dtype"]]
        raw = [_bytes(maps, source, tensor["dtype"], start, end) for source in tensor["sources"]]
        if tensor["dtype"] not in floats:
            _copy_or_refuse(tensor, raw, write, start)
            return size
        dtype = floats[tensor["dtype"]]
        deltas = _deltas(tensor, start, end)
        with torch.cuda.stream(stream):
            gpu_xs = [to_gpu(torch.from_numpy(r).view(dtype), i) for i, r in enumerate(raw)]
            for k, ((path, offset), w) in enumerate(zip(tensor["outputs"], job["weights"], strict=True)):
                terms, ws = (gpu_xs, w) if deltas is None else ([*gpu_xs, to_gpu(deltas[k], len(raw))], [*w, 1.0])
                o = gpu_out[:size].view(dtype).copy_(weighted_sum(terms, ws, acc[: end - start]))
                total.copy_(o.sum(dtype=torch.float32).reshape(1), non_blocking=True)
                host = host_out[:size].view(dtype).copy_(o, non_blocking=True)
                stream.synchronize()  # the buffers are reused by the next output and the next chunk
                if not math.isfinite(total.item()) and not torch.isfinite(host).all():
                    raise _non_finite(job, tensor, raw, k)
                write(path, host_out[:size].numpy(), offset + start * ITEMSIZE[tensor["dtype"]])
        return size

    return step


def _width(job: dict) -> int:
    """Bytes per element of the widest floating tensor of the job (4 for a LoRA delta's fp32 rows)."""
    widths = [ITEMSIZE[t["dtype"]] for t in job["tensors"] if t["dtype"] in ("F64", "F32", "F16", "BF16")]
    return max([*widths, 4 if _densified(job) else 1])
