"""Checkpoint folders on disk: the safetensors format read and written by hand, and atomic outputs.

Reading: `read_layout` parses every safetensors header of a folder (`read_header`: an 8-byte length,
JSON, then raw bytes) into tensor name -> (file, dtype, shape, byte offset), checked against the file
size. The merge engine views tensors in place through mmap at those offsets: safetensors' `safe_open`
does not expose them, and copies every slice it reads.
Writing: `header` builds one shard's header before any tensor is computed, so the engine can write
each chunk at its final offset. Pickled weights are never loaded (`weight_files` refuses them).

Outputs are written into a hidden `.NAME.partial-HOST-PID` folder beside the target (`temp_dir`),
fsynced and renamed or swapped in (`publish`); `sigterm_as_exit` lets a cancelled job remove it on its way
out, and the next merge to the same target cleans up after a killed one (`recover`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from openrlhf_bonesoup import files, lora
from openrlhf_bonesoup.errors import BoneSoupError

log = logging.getLogger(__name__)

PROVENANCE = "bonesoup_merge.json"
# safetensors dtype -> bytes per element, for the dtypes a merge can handle (floats averaged, the rest copied).
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# config.json keys that legitimately differ between a backbone and its SFT model (OpenRLHF turns
# use_cache off for training; versions and load paths differ); any other difference is refused.
_CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "use_cache", "dtype", "torch_dtype"}


def weight_files(path: Path) -> list[Path]:
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
    if (path / lora.ADAPTER_CONFIG).is_file() and pickles:
        raise BoneSoupError(
            f"{path} has only pickled adapter weights ({', '.join(pickles[:3])}) and this tool never unpickles: "
            f'convert once where you trust the file: python -c "import torch, safetensors.torch as s; '
            f"s.save_file(torch.load('{path}/adapter_model.bin', weights_only=True), "
            f"'{path}/adapter_model.safetensors')\" (the post-training hook does this for OpenRLHF's ZeRO-3 saves)"
        )
    if pickles:
        raise BoneSoupError(
            f"{path} has only pickled weights ({', '.join(pickles[:3])}) and this tool never unpickles: "
            f'convert once where you trust the file: python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" and merge that folder"
        )
    raise BoneSoupError(f"{path} has no *.safetensors weights")


def read_header(file: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (safetensors dtype, shape, byte offset of its data in the file), checked against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= size - 8:
            raise BoneSoupError(f"{file} is not a safetensors file (header length {length}, file size {size})")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise BoneSoupError(f"{file} is not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise BoneSoupError(f"{file}: the header entry of tensor {name!r} is malformed") from None
        if dtype in ITEMSIZE and not (0 <= begin and end - begin == nbytes(dtype, shape) and 8 + length + end <= size):
            raise BoneSoupError(f"{file}: tensor {name!r} does not fit its byte range (a truncated file?)")
        tensors[name] = (dtype, shape, 8 + length + begin)
    return tensors


def read_layout(path: Path) -> dict[str, tuple[str, str, list[int], int]]:
    """name -> (file, safetensors dtype, shape, data offset) for every tensor of a checkpoint."""
    layout: dict[str, tuple[str, str, list[int], int]] = {}
    for file in weight_files(path):
        for name, (dtype, shape, offset) in read_header(file).items():
            if name in layout:
                raise BoneSoupError(f"tensor {name!r} appears twice in {path}")
            layout[name] = (str(file), dtype, shape, offset)
    return layout


def _config(path: Path) -> dict:
    file = path / "config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def check_layouts(inputs: Sequence[Path], layouts: list[dict]) -> None:
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
        for name, (_, dtype, shape, _) in layout.items():
            if (dtype, shape) != tuple(first[name][1:3]):
                raise BoneSoupError(
                    f"tensor {name!r} is {dtype}{shape} in {path} but {first[name][1]}{first[name][2]} in {inputs[0]}"
                )
    for name, (_, dtype, _, _) in first.items():
        if dtype not in ITEMSIZE:
            raise BoneSoupError(f"tensor {name!r} of {inputs[0]} has dtype {dtype}, which cannot be averaged")


def side_files(sources: Sequence[Path], skip: Sequence[str] = ()) -> list[Path]:
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


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


def header(spec: dict, names: Sequence[str]) -> tuple[bytes, dict[str, int], int]:
    """safetensors header for one shard: (header bytes, file offset of each tensor, file size).

    Larger items first, as safetensors itself orders them, so every tensor is aligned to its item size.
    """
    entries: dict = {"__metadata__": {"format": "pt"}}
    position: dict[str, int] = {}
    pos = 0
    for name in sorted(names, key=lambda n: (-ITEMSIZE[spec[n][0]], n)):
        dtype, shape = spec[name]
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes(dtype, shape)]}
        position[name] = pos
        pos += nbytes(dtype, shape)
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, {n: start + p for n, p in position.items()}, start + pos


def check_outputs(inputs: Sequence[Path], outputs: Sequence[Path], overwrite: bool) -> None:
    resolved = [o.resolve() for o in outputs]
    if len(set(resolved)) != len(resolved):
        raise BoneSoupError("two outputs have the same path")
    for out in resolved:
        if any(out == p.resolve() or p.resolve() in out.parents or out in p.resolve().parents for p in inputs):
            raise BoneSoupError(f"output {out} overlaps an input folder: choose another --output")
        if out.exists() and not overwrite:
            raise BoneSoupError(f"output {out} exists: pass --overwrite to replace it")


def temp_dir(out: Path) -> Path:
    """A fresh hidden folder beside out, named after this host and process."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = out.parent / f".{out.name}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def recover(out: Path) -> None:
    """What a merge to `out` killed on this host (SIGKILL, power loss) left: its temporary folder is removed,
    and a previous output it had moved aside (`publish` where folders cannot be swapped) is put back when
    no new output took its place, else removed. Leftovers of other hosts on a shared disk are theirs."""
    host = socket.gethostname()
    for kind in ("old", "partial"):
        prefix = f".{out.name}.{kind}-{host}-"
        for stale in sorted(out.parent.glob(f"{prefix}*")):
            pid = stale.name[len(prefix) :]
            if not pid.isdigit() or files.alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.rename(stale, out)
                files.fsync_dir(out.parent)
            else:
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
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


def fsync_folder(folder: Path) -> None:
    # Data on disk before the rename makes the output visible: a crash never shows a half-written file.
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    files.fsync_dir(folder)  # and the folder's own entries


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Make the finished, fsynced folder tmp the output `out`; a crash at any point leaves the old output
    or the new one there. A replacement swaps the two folders in one step (`files.exchange`), then removes
    the old one, now under tmp's name (which the next merge removes if this one dies first). Where folders
    cannot be swapped, the old one is moved aside first; the next merge puts it back if the new one never
    arrived (`recover`)."""
    if out.exists():
        if not overwrite:
            raise BoneSoupError(f"output {out} appeared during the merge: pass --overwrite to replace it")
        if not files.exchange(tmp, out):
            old = out.parent / f".{out.name}.old-{socket.gethostname()}-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            tmp = old
        files.fsync_dir(out.parent)
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, out)
        files.fsync_dir(out.parent)
