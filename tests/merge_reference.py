"""An independent reference for the merge engine's bytes, in numpy float64 (no torch arithmetic).

Output element = cast(acc_n), acc_0 = +0, acc_i = fma(x_i, w_i, acc_{i-1}) rounded once to fp32, in
input order, w_i rounded to fp32: the fp32 accumulation of `acc.add_(x, alpha=w)` (torch's CPU and
CUDA kernels fuse the multiply-add; mergekit 0.1.5 gives the same bytes). Here the product is exact
in float64 (24 + 24 bits), the sum is rounded to odd (TwoSum gives its error), and rounding that to
fp32 is the correctly rounded fma (53 >= 24 + 2 bits). Casts are round-to-nearest-even on the bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tiny_models
import torch
from safetensors.torch import load_file

FLOATS = {"BF16", "F16", "F32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_models(root: Path) -> dict:
    """Per (dtype, "single" | "sharded"): three tiny LLaMA checkpoints (two backbones and an SFT model);
    "tied": a GPT-2 pair saved as transformers does (no lm_head.weight) and as OpenRLHF does (with it)."""
    tok = tiny_models.make_tokenizer(root / "tok", "llama")
    paths: dict = {}
    for name, dtype in DTYPES.items():
        for j in range(3):
            model = tiny_models.make_llama_lm(root / f"{name}_{j}", tok, seed=70 + j, dtype=dtype)
            model.save_pretrained(str(root / f"{name}_{j}_sharded"), max_shard_size="20KB")
            tok.save_pretrained(str(root / f"{name}_{j}_sharded"))
            paths.setdefault((name, "single"), []).append(root / f"{name}_{j}")
            paths.setdefault((name, "sharded"), []).append(root / f"{name}_{j}_sharded")
    gtok = tiny_models.make_tokenizer(root / "gtok", "gpt2")
    tiny_models.make_gpt2_lm(root / "gpt2_hf", gtok, seed=80)
    model = tiny_models.make_gpt2_lm(root / "gpt2_scratch", gtok, seed=81)
    model.save_pretrained(str(root / "gpt2_cloned"), state_dict={k: v.clone() for k, v in model.state_dict().items()})
    gtok.save_pretrained(str(root / "gpt2_cloned"))
    paths["tied"] = [root / "gpt2_hf", root / "gpt2_cloned"]
    return paths


def read(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (safetensors dtype, raw values: float32 for BF16/F16/F32, as stored otherwise)."""
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, t in load_file(file).items():
            if t.dtype == torch.bfloat16:
                bits = t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
                tensors[name] = ("BF16", bits.view(np.float32))
            elif t.dtype == torch.float16:
                tensors[name] = ("F16", t.view(torch.int16).numpy().view(np.float16).astype(np.float32))
            elif t.dtype == torch.float32:
                tensors[name] = ("F32", t.numpy())
            else:
                tensors[name] = (str(t.dtype), t.numpy())
    return tensors


def fma32(x: np.ndarray, w: float, acc: np.ndarray) -> np.ndarray:
    """fp32(x * fp32(w) + acc), rounded once, for fp32 arrays x and acc."""
    a, b = acc.astype(np.float64), np.float64(np.float32(w)) * x.astype(np.float64)
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    toward = np.nextafter(s, np.where(err > 0, np.inf, -np.inf))
    s = np.where((err != 0) & ((s.view(np.int64) & 1) == 0), toward, s)  # round to odd
    return s.astype(np.float32)


def cast(acc: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        u = acc.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
    if dtype == "F16":
        return acc.astype(np.float16).tobytes()
    return acc.astype(np.float32).tobytes()


def expected(inputs: list[Path], weights: list[float]) -> dict[str, bytes]:
    """name -> the bytes a merge must write: weights over inputs, every tensor of the first input
    (lm_head.weight left out of a tied model, as transformers saves one)."""
    states = [read(p) for p in inputs]
    config = json.loads((Path(inputs[0]) / "config.json").read_text()) if (inputs[0] / "config.json").is_file() else {}
    out = {}
    for name, (dtype, first) in states[0].items():
        if config.get("tie_word_embeddings") and name.endswith("lm_head.weight"):
            continue
        if dtype not in FLOATS:
            out[name] = first.tobytes()
            continue
        acc = np.zeros(first.shape, np.float32)
        for state, w in zip(states, weights, strict=True):
            acc = fma32(state[name][1], w, acc)
        out[name] = cast(acc, dtype)
    return out


def merged(folder: Path) -> dict[str, bytes]:
    """name -> the bytes of every tensor of a merged checkpoint, as stored."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, t in load_file(file).items():
            out[name] = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return out
