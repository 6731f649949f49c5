"""Merging: backbone checkpoints -> one merged HF checkpoint per preference, streamed and atomic.

The engine (`merge_checkpoints`) knows only merge plans: output k = sum_i weights[k][i] * input_i,
tensor by tensor, so Bone Soup, Rewarded Soup, MORLHF interpolation and SFT extrapolation are the
same code. `merge_soup` turns preferences into plans (lambda = B^-T mu, coefficients.py) and
`after_training` is the post-training hook: register a finished backbone, merge once all are in.

Full weights: inputs are read lazily with safetensors' `safe_open`, a chunk of rows at a time, summed
in fp32 and cast back to the input dtype; one pass over the inputs writes all K outputs. The output
file is written by hand (an 8-byte length, a JSON header, then the raw tensor bytes: the safetensors
format) because `safetensors.torch.save_file` needs a whole shard in RAM: here the header is known
before any tensor is computed, so each chunk goes to its byte offset at once, memory stays at a few
chunks whatever the model size, n or K, and worker processes can fill disjoint byte ranges of the
same files. Shard names and the index follow HF (huggingface_hub's shard split, as save_pretrained uses).

LoRA adapters (PEFT folders): the merged adapter is exact by rank concatenation,
sum_j w_j s_j B_j A_j = [w_1 s_1 B_1 ... w_n s_n B_n] [A_1; ...; A_n] with s_j PEFT's scaling,
saved with lora_alpha = r so that PEFT's own scaling is 1; or densified into full weights of the
base model. An adapter merge is base + sum_j w_j delta_j: the model average when the weights sum to
1, and SFT extrapolation away from the base model when they sum to 1 + alpha.

Outputs are written into a hidden temporary folder beside the target and renamed at the end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from openrlhf_bonesoup import soup
from openrlhf_bonesoup.coefficients import (
    BoneSoupError,
    check_matrix,
    merge_coefficients,
    parse_preferences,
    soup_weights,
)

log = logging.getLogger(__name__)

PROVENANCE = "bonesoup_merge.json"
FORMAT = "openrlhf-bonesoup/merge/v1"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hub's usual shard size; transformers 5 itself defaults to 50GB
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Elements per fp32 accumulator chunk (4 MiB): the accumulator stays in the CPU cache across its
# n + 3 passes (measured: 4x faster than 16 MiB chunks on 2 cores), and memory is a few chunks.
CHUNK_ELEMENTS = 1 << 20
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# config.json keys that legitimately differ between a backbone and its SFT model (OpenRLHF turns
# use_cache off for training; versions and load paths differ); any other difference is refused.
_CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "use_cache", "dtype", "torch_dtype"}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


# ---------------------------------------------------------------------------------------------- inputs


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (from its index when sharded), never pickles."""
    if not path.is_dir():
        raise BoneSoupError(f"checkpoint {path} does not exist (or is not a folder)")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        names = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise BoneSoupError(f"{indexes[0]} names shards that are missing: {missing[:3]}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
    if (path / ADAPTER_CONFIG).is_file() and pickles:
        raise BoneSoupError(
            f"{path} has only pickled adapter weights ({', '.join(pickles[:3])}) and this tool never unpickles: "
            f'convert once where you trust the file: python -c "import torch, safetensors.torch as s; '
            f"s.save_file(torch.load('{path}/adapter_model.bin', weights_only=True), "
            f"'{path}/adapter_model.safetensors')\""
        )
    if pickles:
        raise BoneSoupError(
            f"{path} has only pickled weights ({', '.join(pickles[:3])}) and this tool never unpickles: "
            f'convert once where you trust the file: python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" and merge that folder"
        )
    raise BoneSoupError(f"{path} has no *.safetensors weights")


def _layout(path: Path) -> dict[str, tuple[str, str, list[int]]]:
    """name -> (file, safetensors dtype, shape) for every tensor of a checkpoint, from headers only."""
    layout: dict[str, tuple[str, str, list[int]]] = {}
    for file in _weight_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in layout:
                    raise BoneSoupError(f"tensor {name!r} appears twice in {path}")
                s = f.get_slice(name)
                layout[name] = (str(file), s.get_dtype(), list(s.get_shape()))
    return layout


def _config(path: Path) -> dict:
    file = path / "config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _check_layouts(inputs: Sequence[Path], layouts: list[dict]) -> None:
    """Same tensor names, dtypes and shapes in every input; only dtypes the engine can average."""
    # transformers omits lm_head.weight for a tied model, OpenRLHF's save writes it: for a tied model
    # we keep what transformers writes (the loader ties lm_head to the embedding anyway).
    config = _config(inputs[0])
    if config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)):
        for layout in layouts:
            for name in [k for k in layout if k == "lm_head.weight" or k.endswith(".lm_head.weight")]:
                del layout[name]
    first = layouts[0]
    for path, layout in zip(inputs[1:], layouts[1:], strict=True):
        if layout.keys() != first.keys():
            only, other = sorted(layout.keys() - first.keys()), sorted(first.keys() - layout.keys())
            raise BoneSoupError(
                f"{path} and {inputs[0]} hold different tensors: only in the first {only[:3]}, only in the second "
                f"{other[:3]} ({len(only)} and {len(other)} in all)"
            )
        for name, (_, dtype, shape) in layout.items():
            if (dtype, shape) != tuple(first[name][1:]):
                raise BoneSoupError(
                    f"tensor {name!r} is {dtype}{shape} in {path} but {first[name][1]}{first[name][2]} in {inputs[0]}"
                )
    for name, (_, dtype, _) in first.items():
        if dtype not in _DTYPES:
            raise BoneSoupError(f"tensor {name!r} of {inputs[0]} has dtype {dtype}, which cannot be averaged")


def _side_files(sources: Sequence[Path], skip: Sequence[str] = ()) -> list[Path]:
    """config, generation config, tokenizer...: taken from sources[0], checked against the others.

    A config.json that differs (beyond the keys in _CONFIG_KEYS_IGNORED) is refused: it would mean
    different architectures. Other differing files (tokenizer, generation config) get a warning.
    """
    files = [
        f
        for f in sorted(sources[0].iterdir())
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_WEIGHT_SUFFIXES)
        if f.name not in (PROVENANCE, *skip)
    ]
    for other in sources[1:]:
        for f in files:
            twin = other / f.name
            if not twin.is_file():
                log.warning("%s has no %s; using the one of %s", other, f.name, sources[0])
            elif f.name == "config.json":
                a, b = json.loads(f.read_text()), json.loads(twin.read_text())
                diff = sorted(k for k in a.keys() | b.keys() if k not in _CONFIG_KEYS_IGNORED and a.get(k) != b.get(k))
                if diff:
                    raise BoneSoupError(
                        f"config.json of {other} differs from {sources[0]} in {diff[:5]}: these are not the same model"
                    )
            elif f.read_bytes() != twin.read_bytes():
                log.warning("%s differs between %s and %s; using the first", f.name, sources[0], other)
    return files


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
    progress: bool = True,
    densify: bool = False,
    base: str | os.PathLike | None = None,
) -> list[Path]:
    """Write outputs[k] = sum_i weights[k][i] * inputs[i] for every k, reading each input tensor once.

    inputs: HF safetensors checkpoint folders (single file or sharded with an index), or all PEFT
    LoRA adapter folders. provenance[k] is merged into outputs[k]/bonesoup_merge.json. workers > 1
    splits the tensors across spawned processes (a script needs the usual `if __name__ ==
    "__main__":` guard), or across Ray tasks when Ray is initialised (the folders must then be on a
    shared filesystem). densify (adapters only): write full weights of the base model (`base`,
    default: the adapters' base_model_name_or_path) instead of one adapter.
    Returns the output folders; raises BoneSoupError on bad input and leaves no output behind.
    """
    inputs, outputs = [Path(p) for p in inputs], [Path(p) for p in outputs]
    weights = _check_plan(weights, len(inputs), len(outputs))
    if provenance is not None and len(provenance) != len(outputs):
        raise BoneSoupError(f"{len(provenance)} provenance records for {len(outputs)} outputs")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BoneSoupError(f"workers must be an integer >= 1, got {workers!r}")
    for p in inputs:
        _weight_files(p)  # existence and the no-pickle rule, before anything else
    _check_outputs(inputs, outputs, overwrite)
    adapters = [(p / ADAPTER_CONFIG).is_file() for p in inputs]
    if any(adapters) and not all(adapters):
        raise BoneSoupError("inputs mix LoRA adapter folders and full checkpoints: merge one kind at a time")
    if densify and not all(adapters):
        raise BoneSoupError("densify applies to LoRA adapter inputs only")
    records = [
        {
            "format": FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "inputs": [{"path": str(p.resolve()), "fingerprint": soup.checkpoint_fingerprint(p)} for p in inputs],
            "weights": list(w),
            **(provenance[k] if provenance else {}),
        }
        for k, w in enumerate(weights)
    ]

    tmps: list[Path] = []
    try:
        with _sigterm_as_exit():
            tmps.extend(_temp_dir(out) for out in outputs)
            if not all(adapters):
                side = _side_files(inputs)
                _stream(inputs, weights, tmps, max_shard_size, workers, progress)
            elif densify:
                base = _adapter_base(inputs[0], base)
                side = _side_files([base])
                merged, config, _ = _merge_adapters(inputs, weights)
                _stream(
                    [base], [[1.0]] * len(outputs), tmps, max_shard_size, workers, progress, _deltas(merged, config)
                )
                for record in records:
                    record["lora"] = "densified"
                    record["base"] = {"path": str(base.resolve()), "fingerprint": soup.checkpoint_fingerprint(base)}
            else:
                side = _side_files(inputs, skip=(ADAPTER_CONFIG,))
                merged, config, dtype = _merge_adapters(inputs, weights)
                _save_adapters(merged, config, dtype, tmps)
                for record in records:
                    record["lora"] = "concatenated rank"
            for tmp, record in zip(tmps, records, strict=True):
                for f in side:
                    shutil.copy2(f, tmp / f.name)
                (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
                _fsync_folder(tmp)
            for tmp, out in zip(tmps, outputs, strict=True):
                _publish(tmp, out, overwrite)
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


def _check_outputs(inputs: Sequence[Path], outputs: Sequence[Path], overwrite: bool) -> None:
    resolved = [o.resolve() for o in outputs]
    if len(set(resolved)) != len(resolved):
        raise BoneSoupError("two outputs have the same path")
    for out in resolved:
        if any(out == p.resolve() or p.resolve() in out.parents or out in p.resolve().parents for p in inputs):
            raise BoneSoupError(f"output {out} overlaps an input folder: choose another --output")
        if out.exists() and not overwrite:
            raise BoneSoupError(f"output {out} exists: pass --overwrite to replace it")


def _temp_dir(out: Path) -> Path:
    """A fresh hidden folder beside out, named after this host and process."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # A merge killed with SIGKILL cannot clean up; the next merge to the same target does, for temp
    # folders of this host whose process is gone (other hosts may still be writing on a shared disk).
    prefix = f".{out.name}.partial-{socket.gethostname()}-"
    for stale in out.parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix) :]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    # SIGTERM (a scheduler cancelling the job) would end Python without running `finally`; as an
    # exception it removes the temporary folders on its way out. Only the main thread may set handlers.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fsync_folder(folder: Path) -> None:
    # Data on disk before the rename makes the output visible: a crash never shows a half-written file.
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise BoneSoupError(f"output {out} appeared during the merge: pass --overwrite to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def _stream(
    inputs: Sequence[Path],
    weights: list[list[float]],
    tmps: Sequence[Path],
    max_shard_size: int | str,
    workers: int,
    progress: bool,
    deltas: list[dict] | None = None,
) -> None:
    """The streaming merge of full checkpoints into the folders tmps (one per weight row)."""
    layouts = [_layout(p) for p in inputs]
    _check_layouts(inputs, layouts)
    spec = {name: (dtype, shape) for name, (_, dtype, shape) in layouts[0].items()}
    for delta in deltas or []:
        for name, (a, b, transposed) in delta.items():
            shape = [a.shape[1], b.shape[0]] if transposed else [b.shape[0], a.shape[1]]
            if name not in spec or spec[name][1] != shape:
                raise BoneSoupError(f"the adapters change {name!r} {shape}, which the base model {inputs[0]} lacks")
    sizes = {name: _nbytes(dtype, shape) for name, (dtype, shape) in spec.items()}
    try:
        # HF's own shard split (as save_pretrained does), fed byte sizes instead of tensors.
        split = split_state_dict_into_shards_factory(
            sizes, get_storage_size=int, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
    except ValueError as e:
        raise BoneSoupError(f"bad max shard size {max_shard_size!r}: {e}") from None

    # Create every output file with its header and full size, so workers write at fixed offsets.
    where: dict[str, tuple[int, int]] = {}
    shard_names = list(split.filename_to_tensors)
    for s, (filename, names) in enumerate(split.filename_to_tensors.items()):
        header, offsets, size = _header(spec, names)
        where.update({name: (s, offset) for name, offset in offsets.items()})
        for tmp in tmps:
            with open(tmp / filename, "wb") as f:
                f.write(header)
                f.truncate(size)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        for tmp in tmps:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # Jobs: runs of tensors of about equal bytes; several per worker so the bar moves and loads balance.
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
    jobs = [
        {
            "inputs": [str(p) for p in inputs],
            "names": group,
            "tensors": {name: (spec[name][0], spec[name][1], where[name][1]) for name in group},
            "sources": [{name: layout[name][0] for name in group} for layout in layouts],
            "outputs": [[str(tmp / shard_names[where[name][0]]) for name in group] for tmp in tmps],
            "weights": weights,
            "deltas": [{n: d[n] for n in group if n in d} for d in deltas] if deltas else None,
        }
        for group in groups
    ]

    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"merge -> {len(tmps)} output(s)", disable=not progress
    ) as bar:
        if workers == 1:
            _write_tensors(jobs[0], bar)
        else:
            for done in _run_parallel(jobs, workers):
                bar.update(done)


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * _DTYPES[dtype].itemsize


def _header(spec: dict, names: Sequence[str]) -> tuple[bytes, dict[str, int], int]:
    """safetensors header for one shard: (header bytes, file offset of each tensor, file size).

    Larger items first, as safetensors itself orders them, so every tensor is aligned to its item size.
    """
    entries: dict = {"__metadata__": {"format": "pt"}}
    position: dict[str, int] = {}
    pos = 0
    for name in sorted(names, key=lambda n: (-_DTYPES[spec[n][0]].itemsize, n)):
        dtype, shape = spec[name]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + _nbytes(dtype, shape)]}
        position[name] = pos
        pos += _nbytes(dtype, shape)
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, {n: start + p for n, p in position.items()}, start + pos


def _run_parallel(jobs: list[dict], workers: int) -> Iterator[int]:
    """Run jobs on Ray tasks when Ray is initialised, else on a spawned process pool; yield bytes done."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        task = ray.remote(num_cpus=1)(_write_tensors)
        pending = [task.remote(job) for job in jobs]
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
        futures = [pool.submit(_write_tensors, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _write_tensors(job: dict, bar: tqdm | None = None) -> int:
    """Compute job's tensors for every output and write them at their offsets; return bytes done.

    Rows are processed in chunks: the n input chunks are read once and reused for all K outputs
    through one fp32 accumulator, so memory is a few chunks whatever the model size, n or K.
    """
    # One torch thread: each step is memory-bound, and where other processes share the cores two
    # OpenMP threads wait on each other (measured on 2 busy cores: 1.8 s with one thread, 4-14 s with
    # two). Parallelism comes from workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    handles: dict[str, object] = {}
    fds: dict[str, int] = {}
    acc_buffer = torch.empty(0, dtype=torch.float32)
    done = 0
    try:
        for j, name in enumerate(job["names"]):
            dtype, shape, offset = job["tensors"][name]
            for source in job["sources"]:
                if source[name] not in handles:
                    handles[source[name]] = safe_open(source[name], framework="pt")
            inputs = [handles[source[name]] for source in job["sources"]]
            slices = [h.get_slice(name) for h in inputs]
            row = math.prod(shape[1:])
            step = max(1, CHUNK_ELEMENTS // max(row, 1))
            item = _DTYPES[dtype].itemsize
            for start in range(0, shape[0], step) if shape else [0]:
                end = min(shape[0], start + step) if shape else 1
                xs = [s[start:end] for s in slices] if shape else [h.get_tensor(name) for h in inputs]
                floating = xs[0].is_floating_point()
                # Integer/bool tensors (masks, ids) cannot be averaged: they must agree and are copied.
                if not floating and not all(torch.equal(xs[0], x) for x in xs[1:]):
                    raise BoneSoupError(f"integer tensor {name!r} differs between the inputs; cannot merge it")
                if floating and acc_buffer.numel() < xs[0].numel():
                    acc_buffer = torch.empty(xs[0].numel(), dtype=torch.float32)
                for k, w in enumerate(job["weights"]):
                    out = xs[0]
                    if floating:
                        acc = acc_buffer[: xs[0].numel()].view(xs[0].shape).zero_()
                        for x, wi in zip(xs, w, strict=True):
                            acc.add_(x, alpha=wi)
                        if job["deltas"] and name in job["deltas"][k]:
                            acc.add_(_delta_rows(*job["deltas"][k][name], start, end))
                        out = acc.to(xs[0].dtype)
                        # NaN/inf in any input (even at weight 0) or an overflow of the output dtype
                        # makes the sum non-finite; a sum is 2x cheaper than isfinite(), which only
                        # decides the rare case of finite values whose fp32 sum overflows.
                        if not torch.isfinite(out.sum(dtype=torch.float32)) and not torch.isfinite(out).all():
                            raise _non_finite(job, name, xs, k)
                    path = job["outputs"][k][j]
                    if path not in fds:
                        fds[path] = os.open(path, os.O_WRONLY)
                    data = out.reshape(-1).view(torch.uint8).numpy()
                    if os.pwrite(fds[path], data, offset + start * row * item) != data.nbytes:
                        raise OSError(f"short write to {path}")
                if bar is not None:
                    bar.update((end - start) * row * item)
            done += math.prod(shape) * item
    finally:
        torch.set_num_threads(threads)
        for fd in fds.values():
            os.close(fd)
    return done


def _non_finite(job: dict, name: str, xs: list[torch.Tensor], k: int) -> BoneSoupError:
    for path, x in zip(job["inputs"], xs, strict=True):
        if not torch.isfinite(x).all():
            return BoneSoupError(f"tensor {name!r} of {path} has NaN/inf values; refusing to merge it")
    return BoneSoupError(f"tensor {name!r} overflows its dtype in output {k} (weights {job['weights'][k]})")


# ---------------------------------------------------------------------------------------------- LoRA


def _merge_adapters(inputs: Sequence[Path], weights: list[list[float]]) -> tuple[list[dict], dict, torch.dtype]:
    """Rank-concatenated adapters in fp32, one tensor dict per weight row; their adapter_config and dtype.

    Adapters are a fraction of a percent of the model, so they are loaded whole (safetensors load_file).
    PEFT applies delta = s * B A with s = lora_alpha / r (lora_alpha / sqrt(r) with rslora); we fold
    w_j s_j into B_j and save lora_alpha = r = sum_j r_j, so that PEFT's own scaling is 1.
    """
    configs = [json.loads((p / ADAPTER_CONFIG).read_text()) for p in inputs]
    for path, c in zip(inputs, configs, strict=True):
        if c.get("peft_type", "LORA") != "LORA":
            raise BoneSoupError(f"{path} is a {c.get('peft_type')} adapter; only LoRA adapters can be merged")
        for key in ("rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "modules_to_save"):
            if c.get(key):
                raise BoneSoupError(f"{path}: adapters with {key} are not supported by the merge")
        if c.get("fan_in_fan_out") != configs[0].get("fan_in_fan_out"):
            raise BoneSoupError(f"{path} and {inputs[0]} differ in fan_in_fan_out")
    scales = [c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"]) for c in configs]
    for p in inputs:
        if not (p / ADAPTER_WEIGHTS).is_file():
            raise BoneSoupError(f"{p} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    tensors = [load_file(p / ADAPTER_WEIGHTS) for p in inputs]
    for path, t in zip(inputs, tensors, strict=True):
        if t.keys() != tensors[0].keys():
            raise BoneSoupError(f"{path} and {inputs[0]} adapt different modules")
        for name, x in t.items():
            match = _LORA_KEY.match(name)
            if not match:
                raise BoneSoupError(f"{path}: tensor {name!r} is not a LoRA A/B matrix; cannot merge it")
            ref = tensors[0][name]
            rank_dim = 0 if match["kind"].endswith("A") else 1
            same = x.dtype == ref.dtype and x.ndim == ref.ndim
            if not same or [d for i, d in enumerate(x.shape) if i != rank_dim] != [
                d for i, d in enumerate(ref.shape) if i != rank_dim
            ]:
                raise BoneSoupError(
                    f"tensor {name!r} is {x.dtype}{list(x.shape)} in {path} but {ref.dtype}{list(ref.shape)} in "
                    f"{inputs[0]}"
                )
            if not torch.isfinite(x).all():
                raise BoneSoupError(f"tensor {name!r} of {path} has NaN/inf values; refusing to merge it")
    merged = []
    for row in weights:
        out = {}
        for name in tensors[0]:
            if _LORA_KEY.match(name)["kind"].endswith("A"):
                out[name] = torch.cat([t[name].float() for t in tensors], dim=0)
            else:
                out[name] = torch.cat(
                    [t[name].float() * (w * s) for t, w, s in zip(tensors, row, scales, strict=True)], dim=1
                )
        merged.append(out)
    rank = sum(c["r"] for c in configs)
    config = dict(configs[0], r=rank, lora_alpha=rank, use_rslora=False)
    return merged, config, next(iter(tensors[0].values())).dtype


def _save_adapters(merged: list[dict], config: dict, dtype: torch.dtype, tmps: Sequence[Path]) -> None:
    for tensors, tmp in zip(merged, tmps, strict=True):
        out = {name: x.to(dtype).contiguous() for name, x in tensors.items()}
        if not all(torch.isfinite(x).all() for x in out.values()):
            raise BoneSoupError(f"the merged adapter overflows {dtype}")
        save_file(out, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _adapter_base(adapter: Path, base: str | os.PathLike | None) -> Path:
    name = base or json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not name or not Path(name).is_dir():
        raise BoneSoupError(
            f"densifying needs the base model as a local folder (--lora.base); {adapter} names {name!r}"
        )
    return Path(name)


def _deltas(merged: list[dict], config: dict) -> list[dict[str, tuple[torch.Tensor, torch.Tensor, bool]]]:
    """Per merged adapter: base tensor name -> (A, B, transposed), delta = B A (or its transpose).

    PEFT stores Embedding deltas and fan_in_fan_out (GPT-2 Conv1D) deltas transposed.
    """
    deltas = []
    for tensors in merged:
        out = {}
        for name, a in tensors.items():
            match = _LORA_KEY.match(name)
            if not match["kind"].endswith("A"):
                continue
            if a.ndim != 2:
                raise BoneSoupError(f"densifying supports Linear and Embedding LoRA layers, not {name!r}")
            b = tensors[name.replace(match["kind"], match["kind"][:-1] + "B")]
            module = match["module"].removeprefix("base_model.model.")
            transposed = match["kind"] == "lora_embedding_A" or bool(config.get("fan_in_fan_out"))
            out[module + ".weight"] = (a, b, transposed)
        deltas.append(out)
    return deltas


def _delta_rows(a: torch.Tensor, b: torch.Tensor, transposed: bool, start: int, end: int) -> torch.Tensor:
    return (b @ a[:, start:end]).T if transposed else b[start:end] @ a


# ---------------------------------------------------------------------------------------------- Bone Soup


def merge_soup(
    backbones: Sequence[str | os.PathLike],
    matrix: np.ndarray | Sequence[Sequence[float]],
    preferences: Sequence[Sequence[float]],
    outputs: Sequence[str | os.PathLike],
    *,
    sft: str | os.PathLike | None = None,
    alpha: float | Sequence[float] = 0.0,
    **engine_kw,
) -> list[Path]:
    """Bone Soup: outputs[k] = (1 + alpha) sum_j lambda_j theta_j - alpha theta_sft, lambda = B^-T mu_k.

    alpha is one extrapolation strength or one per objective (`--alpha auto`'s search result); see
    coefficients.soup_weights. Rewarded Soup is matrix = identity. With LoRA backbones the extrapolation
    is away from their base model (an adapter of zero), so sft may be omitted, or must be that base model.
    engine_kw go to merge_checkpoints (max_shard_size, overwrite, workers, progress, densify, base).
    """
    matrix = check_matrix(matrix)
    n = matrix.shape[0]
    if len(backbones) != n:
        raise BoneSoupError(f"{len(backbones)} backbones for a {n} x {n} matrix B")
    if len(preferences) != len(outputs):
        raise BoneSoupError(f"{len(preferences)} preferences for {len(outputs)} outputs")
    plans = [soup_weights(matrix, mu, alpha) for mu in preferences]  # also validates mu and alpha
    extrapolates = bool(np.any(np.asarray(alpha, dtype=np.float64)))
    inputs = [Path(b) for b in backbones]
    lora = all((p / ADAPTER_CONFIG).is_file() for p in inputs)
    if lora and sft is not None and extrapolates:
        base = json.loads((inputs[0] / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base or Path(base).resolve() != Path(sft).resolve():
            raise BoneSoupError(
                f"LoRA backbones extrapolate from their base model ({base!r}), not from {sft}: omit --sft"
            )
    use_sft = extrapolates and not lora
    if use_sft and sft is None:
        raise BoneSoupError("alpha > 0 extrapolates away from the SFT model: give its checkpoint (--sft)")
    if use_sft:
        inputs.append(Path(sft))
    weights = [[*backbone_w.tolist(), sft_w] if use_sft else backbone_w.tolist() for backbone_w, sft_w in plans]
    provenance = [
        {
            "method": "bone soup",
            "preference": [float(x) for x in mu],
            "beta": float(matrix[0, 0]),
            "matrix": matrix.tolist(),
            "lambda": merge_coefficients(matrix, mu).tolist(),
            "alpha": np.asarray(alpha, dtype=np.float64).tolist(),
            "sft": str(Path(sft).resolve()) if use_sft else None,
        }
        for mu in preferences
    ]
    return merge_checkpoints(inputs, weights, outputs, provenance=provenance, **engine_kw)


def preference_name(mu: Sequence[float]) -> str:
    """A readable folder name for a preference: [0.3, 0.7] -> 'mu_0.30_0.70' (4 decimals when needed)."""
    return "mu_" + "_".join(f"{x:.4f}".rstrip("0").ljust(4, "0") for x in mu)


def sweep_outputs(root: str | os.PathLike, preferences: Sequence[Sequence[float]]) -> list[Path]:
    """One sub-folder of root per preference, named by preference_name; refuses two equal names."""
    names = [preference_name(mu) for mu in preferences]
    if len(set(names)) != len(names):
        raise BoneSoupError(f"two preferences give the same folder name: {names}")
    return [Path(root) / name for name in names]


def after_training(
    soup_dir: str | os.PathLike,
    backbone_index: int,
    checkpoint: str | os.PathLike,
    merge_preferences: str | Sequence[Sequence[float]] | None = None,
    merge_output: str | os.PathLike | None = None,
    **engine_kw,
) -> list[Path]:
    """The post-training hook: register a finished backbone; merge once all n are trained.

    Call it after OpenRLHF's final save with the folder it saved (args.ckpt.output_dir), or from a
    workflow step once a training job succeeded:
        after_training("soup/", 1, "ckpt/backbone1", merge_preferences="0,1;0.5,0.5;1,0")
    When merge_preferences is given and every backbone of the soup is trained, writes one merged
    checkpoint per preference into merge_output (default <soup_dir>/merged)/mu_..., and returns them;
    else returns []. Exactly one of several concurrently finishing backbones sees the soup complete.
    """
    _weight_files(Path(checkpoint))  # a clear error (e.g. pickles to convert) before it enters the manifest
    manifest = soup.register_backbone(soup_dir, backbone_index, status="trained", checkpoint=str(checkpoint))
    if not merge_preferences:
        return []
    if isinstance(merge_preferences, str):
        merge_preferences = parse_preferences(merge_preferences, manifest["n"])
    backbones = soup.trained_backbones(manifest)
    if backbones is None:
        waiting = [j for j, e in enumerate(manifest["backbones"]) if not (e and e.get("status") == "trained")]
        log.info("backbone %d registered; waiting for backbones %s before merging", backbone_index, waiting)
        return []
    root = Path(merge_output) if merge_output is not None else Path(soup_dir) / "merged"
    return merge_soup(
        backbones, manifest["matrix"], merge_preferences, sweep_outputs(root, merge_preferences), **engine_kw
    )
