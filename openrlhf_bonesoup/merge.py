"""Bone Soup merge plans: preferences -> one weight per input checkpoint -> the merge engine.

For a preference mu, lambda = B^-T mu (coefficients.py) and the merged model is
(1 + alpha) sum_j lambda_j theta_j - alpha theta_sft: `soup_inputs` and `soup_row` are that plan (the
inputs, one weight row per preference), shared with `serve`; `merge_soup` hands K rows to
merge_engine.merge_checkpoints, which writes all K outputs in one pass and records this provenance.
`sweep_outputs` names a sweep's folders (mu_0.30_0.70, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openrlhf_bonesoup import lora
from openrlhf_bonesoup.coefficients import check_matrix, clean, merge_coefficients, soup_weights
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.merge_engine import merge_checkpoints


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
    coefficients.soup_weights. Rewarded Soup is matrix = identity. engine_kw go to merge_checkpoints
    (max_shard_size, overwrite, workers, device, progress, densify, base).
    """
    matrix, inputs, sft = soup_inputs(backbones, matrix, sft=sft, alpha=alpha)
    if len(preferences) != len(outputs):
        raise BoneSoupError(f"{len(preferences)} preferences for {len(outputs)} outputs")
    weights = [soup_row(matrix, mu, alpha, sft) for mu in preferences]  # also validates mu and alpha
    provenance = [
        {
            "method": "bone soup",
            "preference": [float(x) for x in mu],
            "beta": float(matrix[0, 0]),
            "matrix": matrix.tolist(),
            "lambda": clean(merge_coefficients(matrix, mu)),
            "alpha": np.asarray(alpha, dtype=np.float64).tolist(),
            "sft": str(sft.resolve()) if sft else None,
        }
        for mu in preferences
    ]
    return merge_checkpoints(inputs, weights, outputs, provenance=provenance, **engine_kw)


def soup_inputs(
    backbones: Sequence[str | os.PathLike],
    matrix: np.ndarray | Sequence[Sequence[float]],
    *,
    sft: str | os.PathLike | None = None,
    alpha: float | Sequence[float] = 0.0,
) -> tuple[np.ndarray, list[Path], Path | None]:
    """B checked, the inputs of every merge of this soup, and the SFT model when it is one of them.

    Full weights extrapolate away from the SFT model, which is then the last input. LoRA backbones
    extrapolate away from their base model (an adapter of zero): no SFT input, and a given sft must be
    that base model. `merge_soup` and `serve` plan with this, so a served preference is a merged one.
    """
    matrix = check_matrix(matrix)
    n = matrix.shape[0]
    if len(backbones) != n:
        raise BoneSoupError(f"{len(backbones)} backbones for a {n} x {n} matrix B")
    soup_weights(matrix, np.full(n, 1.0 / n), alpha)  # a bad alpha fails here, before any input is read
    extrapolates = bool(np.any(np.asarray(alpha, dtype=np.float64)))
    inputs = [Path(b) for b in backbones]
    adapters = all(lora.is_adapter(p) for p in inputs)
    if adapters and sft is not None and extrapolates:
        base = json.loads((inputs[0] / lora.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base or Path(base).resolve() != Path(sft).resolve():
            raise BoneSoupError(
                f"LoRA backbones extrapolate from their base model ({base!r}), not from {sft}: omit --sft"
            )
    if not extrapolates or adapters:
        return matrix, inputs, None
    if sft is None:
        raise BoneSoupError("alpha > 0 extrapolates away from the SFT model: give its checkpoint (--sft)")
    return matrix, [*inputs, Path(sft)], Path(sft)


def soup_row(matrix: np.ndarray, mu: Sequence[float], alpha: float | Sequence[float], sft: Path | None) -> list[float]:
    """The weight of each input of soup_inputs for preference mu: (1 + alpha) lambda, then -alpha."""
    backbone_w, sft_w = soup_weights(matrix, mu, alpha)
    return [*backbone_w.tolist(), sft_w] if sft else backbone_w.tolist()


def preference_name(mu: Sequence[float]) -> str:
    """A readable folder name for a preference: [0.3, 0.7] -> 'mu_0.30_0.70' (4 decimals when needed)."""
    return "mu_" + "_".join(f"{x:.4f}".rstrip("0").ljust(4, "0") for x in mu)


def sweep_outputs(root: str | os.PathLike, preferences: Sequence[Sequence[float]]) -> list[Path]:
    """One sub-folder of root per preference, named by preference_name; refuses two equal names."""
    names = [preference_name(mu) for mu in preferences]
    if len(set(names)) != len(names):
        raise BoneSoupError(f"two preferences give the same folder name: {names}")
    return [Path(root) / name for name in names]
