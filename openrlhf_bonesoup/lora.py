"""Merging PEFT LoRA adapters: exact by rank concatenation, or densified into full weights.

An adapter merge is base + sum_j w_j delta_j: the model average when the weights sum to 1, and SFT
extrapolation away from the base model when they sum to 1 + alpha. PEFT applies delta_j = s_j B_j A_j
with s_j = lora_alpha / r (lora_alpha / sqrt(r) with rslora), so
    sum_j w_j s_j B_j A_j = [w_1 s_1 B_1 ... w_n s_n B_n] [A_1; ...; A_n],
one adapter of rank sum_j r_j saved with lora_alpha = r, so that PEFT's own scaling is 1 (`concatenate`,
`save`). Densifying streams the base model through the merge engine with B'A' added to each adapted
weight (`deltas`, `delta_rows`). Adapters are a fraction of a percent of the model: loaded whole.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from openrlhf_bonesoup.errors import BoneSoupError

if TYPE_CHECKING:  # torch is imported where adapters are loaded: a full-weight CPU merge never needs it
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


def is_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def concatenate(inputs: Sequence[Path], weights: list[list[float]]) -> tuple[list[dict], dict, torch.dtype]:
    """Rank-concatenated adapters in fp32, one tensor dict per weight row; their adapter_config and dtype.

    w_j s_j is folded into B_j, and lora_alpha = r = sum_j r_j is saved, so that PEFT's own scaling is 1.
    """
    import torch
    from safetensors.torch import load_file

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


def save(merged: list[dict], config: dict, dtype: torch.dtype, folders: Sequence[Path]) -> None:
    """Each merged adapter, cast to the adapters' dtype, with its adapter_config, into its folder."""
    import torch
    from safetensors.torch import save_file

    for tensors, folder in zip(merged, folders, strict=True):
        out = {name: x.to(dtype).contiguous() for name, x in tensors.items()}
        if not all(torch.isfinite(x).all() for x in out.values()):
            raise BoneSoupError(f"the merged adapter overflows {dtype}")
        save_file(out, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def base_model(adapter: Path, base: str | os.PathLike | None) -> Path:
    """The base model folder to densify onto: `base`, or the adapter's base_model_name_or_path."""
    name = base or json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not name or not Path(name).is_dir():
        raise BoneSoupError(
            f"densifying needs the base model as a local folder (--lora.base); {adapter} names {name!r}"
        )
    return Path(name)


def deltas(merged: list[dict], config: dict) -> list[dict[str, tuple[torch.Tensor, torch.Tensor, bool]]]:
    """Per merged adapter: base tensor name -> (A, B, transposed), delta = B A (or its transpose).

    PEFT stores Embedding deltas and fan_in_fan_out (GPT-2 Conv1D) deltas transposed.
    """
    out_all = []
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
        out_all.append(out)
    return out_all


def delta_rows(a: torch.Tensor, b: torch.Tensor, transposed: bool, start: int, end: int) -> torch.Tensor:
    """Rows start:end of the dense delta B A (of (B A)^T when transposed), in fp32 on the CPU."""
    return (b @ a[:, start:end]).T if transposed else b[start:end] @ a
