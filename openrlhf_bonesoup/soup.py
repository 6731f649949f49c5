"""The soup manifest: `<soup_dir>/soup.json`, the contract between training, merging and evaluation.

It records the objectives, beta and B, the SFT checkpoint, and one entry per backbone j (its
checkpoint, how it was launched, its size and a sampled content hash, its status). Each backbone's
launch writes its own entry; backbones are often launched at the same time, so every update is a read-modify-write
under an exclusive lock, written durably (files.write_durably: a reader or a crash never sees half a file).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from openrlhf_bonesoup import files
from openrlhf_bonesoup.coefficients import check_matrix, clean
from openrlhf_bonesoup.errors import BoneSoupError

MANIFEST = "soup.json"
FORMAT = "openrlhf-bonesoup/soup/v1"
SAMPLE_BLOCKS, SAMPLE_BLOCK = 64, 4096  # checkpoint_identity reads 256 KiB of tensor data per file


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(soup_dir: Path) -> Iterator[None]:
    soup_dir.mkdir(parents=True, exist_ok=True)
    with open(soup_dir / ".soup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(soup_dir: Path, manifest: dict) -> None:
    # fsync, rename, fsync the folder: after a power loss soup.json is the old manifest or the new one,
    # never an empty file (it alone records which backbones exist).
    files.write_durably(soup_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def checkpoint_path(path: str | os.PathLike, what: str, *, hub_ok: bool = False) -> str:
    """A policy checkpoint named on a command line (the SFT model, a backbone), checked from its config.json
    alone: an existing folder holding a model, not a reward model or classifier; returned absolute (a soup
    is read from other directories and nodes). hub_ok: a hub id (a name that does not look local) passes
    as it is."""
    text = str(path)
    candidate = Path(text).expanduser()
    if not candidate.exists():
        looks_local = text.startswith((".", "/", "~")) or str(candidate.parent) != "." and candidate.parent.is_dir()
        if hub_ok and not looks_local:
            return text
        raise BoneSoupError(f"{what} {text} does not exist: give a checkpoint folder")
    if (candidate / "adapter_config.json").is_file():  # a LoRA backbone
        return str(candidate.resolve())
    if not (candidate / "config.json").is_file():
        raise BoneSoupError(f"{what} {text} has no config.json: it is not a checkpoint folder")
    config = json.loads((candidate / "config.json").read_text())
    heads = [
        a
        for a in config.get("architectures") or []
        if a.endswith(("ForSequenceClassification", "ForTokenClassification"))
    ]
    if heads or "value_head_prefix" in config:
        kind = heads[0] if heads else "an OpenRLHF reward model (value_head_prefix)"
        raise BoneSoupError(f"{what} {text} is {kind}, not a policy model")
    return str(candidate.resolve())


def read_soup(soup_dir: str | os.PathLike) -> dict:
    """The manifest of soup_dir, validated (format, B); BoneSoupError when missing or malformed."""
    path = Path(soup_dir) / MANIFEST
    if not path.is_file():
        raise BoneSoupError(
            f"no soup manifest at {path}: give the --soup_dir of a training launch, or make one with "
            "`openrlhf-bonesoup soup init` and `soup register`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BoneSoupError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise BoneSoupError(f"{path} is not a soup manifest (format {manifest.get('format')!r}, want {FORMAT!r})")
    check_matrix(manifest["matrix"])
    return manifest


def init_soup(
    soup_dir: str | os.PathLike,
    *,
    objectives: Sequence[dict],
    beta: float,
    matrix: np.ndarray,
    sft: str | None,
) -> dict:
    """Create soup_dir's manifest, or check that an existing one describes the same soup.

    Every backbone of one soup must share objectives, B and SFT model, or lambda = B^-1 mu means
    nothing; a launch that disagrees is refused instead of silently mixing soups.
    """
    soup_dir = Path(soup_dir)
    wanted = {
        "format": FORMAT,
        "objectives": [dict(o) for o in objectives],
        "beta": float(beta),
        "n": int(matrix.shape[0]),
        "matrix": clean(matrix),
        "sft": sft,
    }
    with _locked(soup_dir):
        if (soup_dir / MANIFEST).is_file():
            manifest = read_soup(soup_dir)
            for key, value in wanted.items():
                if key != "objectives" and manifest.get(key) != value:
                    raise BoneSoupError(
                        f"{soup_dir / MANIFEST} has {key} = {manifest.get(key)!r}, this launch has {value!r}: "
                        "use another --soup_dir for a different soup"
                    )
            names = [o.get("name") for o in manifest["objectives"]]
            if names != [o.get("name") for o in wanted["objectives"]]:
                raise BoneSoupError(
                    f"{soup_dir / MANIFEST} has objectives {names}, this launch has "
                    f"{[o.get('name') for o in wanted['objectives']]}: use another --soup_dir"
                )
            return manifest
        manifest = {**wanted, "created": _now(), "backbones": [None] * wanted["n"]}
        _write(soup_dir, manifest)
        return manifest


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def register_backbone(soup_dir: str | os.PathLike, index: int, **fields) -> dict:
    """Update backbone `index`'s entry with `fields` (status, checkpoint, launch_args, ...).

    A launch (status "launched") of a backbone that is already trained, into another folder, is kept beside
    its entry as `pending_launch`: the trained status and checkpoint stay, so a relaunch stopped before its
    end never hides a trained backbone from merge. A relaunch into the trained checkpoint's own folder
    overwrites it: the entry becomes "launched" (merging refused) until the new checkpoint is registered.
    Registering the checkpoint a pending launch writes ends it (its launch_args and output_dir become the
    entry's); registering another keeps it pending."""
    soup_dir = Path(soup_dir)
    with _locked(soup_dir):
        manifest = read_soup(soup_dir)
        if not 0 <= index < manifest["n"]:
            raise BoneSoupError(f"backbone index {index} is outside 0..{manifest['n'] - 1}")
        if "checkpoint" in fields and fields["checkpoint"] is not None:
            fields["checkpoint"] = str(Path(fields["checkpoint"]).resolve())
            fields = {**checkpoint_identity(fields["checkpoint"]), **fields}
        entry = dict(manifest["backbones"][index] or {"index": index})
        relaunch = fields.get("status") == "launched" and entry.get("status") == "trained"
        pending_dir = _resolved(entry.get("pending_launch", {}).get("output_dir"))
        if relaunch and _resolved(fields.get("output_dir")) != _resolved(entry.get("checkpoint")):
            pending = {k: v for k, v in fields.items() if k != "status"}
            fields = {"pending_launch": {**pending, "updated": _now()}}
        elif relaunch:
            entry.pop("pending_launch", None)
        elif fields.get("checkpoint") and fields["checkpoint"] == pending_dir:
            fields = {**entry.pop("pending_launch"), **fields}
        entry.update(fields, updated=_now())
        manifest["backbones"][index] = entry
        _write(soup_dir, manifest)
        return manifest


def trained_backbones(manifest: dict) -> list[str] | None:
    """The n backbone checkpoints in row order once every one is trained, else None."""
    entries = manifest["backbones"]
    if all(e and e.get("status") == "trained" and e.get("checkpoint") for e in entries):
        return [e["checkpoint"] for e in entries]
    return None


def require_trained(soup_dir: str | os.PathLike) -> tuple[dict, list[str]]:
    """The manifest and its n trained backbone checkpoints, or a one-line error naming what is missing."""
    manifest = read_soup(soup_dir)
    backbones = trained_backbones(manifest)
    if backbones is None:
        status = [(e or {}).get("status", "missing") for e in manifest["backbones"]]
        raise BoneSoupError(
            f"not every backbone of {soup_dir} is trained yet (status {status}): register each finished one "
            "with `openrlhf-bonesoup soup register`"
        )
    return manifest, backbones


def checkpoint_identity(path: str | os.PathLike) -> dict:
    """What tells two checkpoints apart in a record, cheaply: `bytes`, the safetensors files' total size, and
    `sha256_headers_and_samples`, a sha256 over every safetensors header (tensor names, dtypes, shapes,
    byte ranges), the index, and 64 blocks of 4 KiB spread evenly over each file's tensor data.

    Backbones trained from one SFT model share their headers; their weights differ in every block, so
    the samples tell them apart. An edit between the sampled blocks is not seen: this is an identity
    for records, not an integrity check. It reads about 256 KiB per file, whatever the model's size.
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    if not files:
        raise BoneSoupError(f"{path} has no *.safetensors files")
    digest, size = hashlib.sha256(), 0
    for f in files:
        with open(f, "rb") as fh:
            if f.suffix != ".safetensors":
                digest.update(f.name.encode() + fh.read())
                continue
            end = f.stat().st_size
            size += end
            head = fh.read(8)
            start = 8 + int.from_bytes(head, "little")
            digest.update(f.name.encode() + head + fh.read(start - 8))
            span = max(0, end - start - SAMPLE_BLOCK)
            for k in range(SAMPLE_BLOCKS):
                fh.seek(start + span * k // (SAMPLE_BLOCKS - 1))
                digest.update(fh.read(SAMPLE_BLOCK))
    return {"bytes": size, "sha256_headers_and_samples": digest.hexdigest()}
