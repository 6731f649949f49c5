"""The post-training hook: register a finished backbone in the soup, and merge once all n are trained.

`register_checkpoint` is what happens when a backbone's training ends: OpenRLHF's LoRA save under
ZeRO-3 (`--ds.zero_stage 3`) leaves only `adapter_model.bin`, a pickle; it is converted once to
`adapter_model.safetensors` with `torch.load(weights_only=True)` (tensors and containers only, never
code) and refused unless it holds a dict of tensors. The weights are checked before soup.json changes.
`after_training` registers, then runs the sweep when the soup is complete. The drop-in launcher
calls it after OpenRLHF's final save; a workflow can call it after each training job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from openrlhf_bonesoup import checkpoints, files, lora, soup
from openrlhf_bonesoup.coefficients import parse_preferences
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.merge import merge_soup, sweep_outputs

log = logging.getLogger(__name__)

ADAPTER_PICKLE = "adapter_model.bin"  # what OpenRLHF's save writes for LoRA under ZeRO-3


def register_checkpoint(soup_dir: str | os.PathLike, backbone_index: int, checkpoint: str | os.PathLike) -> dict:
    """Register `checkpoint` as backbone `backbone_index`'s trained weights; return the soup manifest.

    A LoRA folder with only adapter_model.bin is converted to safetensors first. Every safetensors
    header is read (a clear error, e.g. pickles to convert, before the checkpoint enters the manifest).
    """
    path = Path(checkpoint)
    if lora.is_adapter(path) and not (path / lora.ADAPTER_WEIGHTS).is_file() and (path / ADAPTER_PICKLE).is_file():
        _convert_adapter_pickle(path)
    checkpoints.read_layout(path)
    return soup.register_backbone(soup_dir, backbone_index, status="trained", checkpoint=str(checkpoint))


def _convert_adapter_pickle(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    source = folder / ADAPTER_PICKLE
    try:
        state = torch.load(source, weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        # torch's message is a page of advice; the reason follows "WeightsUnpickler error:".
        reason = " ".join(str(e).split("WeightsUnpickler error:")[-1].split()).split(". ")[0]
        raise BoneSoupError(f"{source} holds more than tensors ({reason[:160]}); not loading it") from None
    if not isinstance(state, dict) or not state:
        raise BoneSoupError(
            f"{source} holds {type(state).__name__} {state!r:.40}, not a dict of tensors; not converting it"
        )
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise BoneSoupError(
            f"{source} holds non-tensor entries ({bad[0]!r}: {type(state[bad[0]]).__name__}, {len(bad)} in all), "
            "not a dict of tensors; not converting it"
        )
    target = folder / lora.ADAPTER_WEIGHTS
    partial = folder / f".{lora.ADAPTER_WEIGHTS}.partial-{os.getpid()}"
    try:
        tensors = {name: x.detach().clone().contiguous() for name, x in state.items()}  # no shared storage
        save_file(tensors, str(partial), metadata={"format": "pt"})
        files.replace_durably(partial, target)  # readers see no safetensors file, or the whole one
    finally:
        partial.unlink(missing_ok=True)
    log.info("converted %s to %s", source, target)


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
    manifest = register_checkpoint(soup_dir, backbone_index, checkpoint)
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
