"""The merge engine's bytes equal an independent fp32-accumulate reference (tests/merge_reference.py).

bf16, fp16 and fp32 checkpoints, single-file and sharded, tied embeddings, n = 2 and n = 3 with an
SFT input, a K = 11 sweep; with the default chunk and with a small odd chunk, so that chunks cut
tensors at arbitrary elements and the worker threads share every tensor.
"""

from __future__ import annotations

import json

import merge_reference
import numpy as np
import pytest
import torch

from openrlhf_bonesoup import cli, coefficients, merge_engine
from openrlhf_bonesoup.merge import merge_soup, sweep_outputs
from openrlhf_bonesoup.merge_engine import merge_checkpoints, weighted_sum

DTYPES = merge_reference.DTYPES


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    return merge_reference.build_models(tmp_path_factory.mktemp("exact"))


@pytest.fixture(params=["default chunk", "chunk 777"])
def chunk(request, monkeypatch) -> None:
    if request.param == "chunk 777":
        monkeypatch.setattr(merge_engine, "CHUNK_ELEMENTS", 777)


def assert_same_bytes(out, want: dict[str, bytes]) -> None:
    got = merge_reference.merged(out)
    assert got.keys() == want.keys()
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"{len(differ)} tensors differ from the reference, e.g. {differ[:3]}"


def test_weighted_sum_is_the_reference_fma_chain():
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES.values():
        for n in (1, 2, 3, 4):
            xs = [(torch.randn(4099, generator=gen) * 0.02).to(dtype) for _ in range(n)]
            xs[0][:8] = torch.tensor([0.0, -0.0, 0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0]).to(dtype)
            weights = [-0.25, 1.25, 0.1, 1 / 3][:n]
            out = weighted_sum(xs, weights, torch.empty(4099))
            acc = np.zeros(4099, np.float32)
            for x, w in zip(xs, weights, strict=True):
                acc = merge_reference.fma32(x.float().numpy(), w, acc)
            assert out.numpy().tobytes() == acc.tobytes(), (dtype, n)
    with pytest.raises(ValueError, match="fp32 out"):
        weighted_sum([torch.ones(3)], [1.0], torch.empty(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="fp32 out"):
        weighted_sum([torch.ones(1, 3)], [1.0], torch.empty(2, 3))  # no silent broadcasting


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_n2_and_n3_with_sft_are_bit_identical(models, tmp_path, chunk, dtype, layout):
    b0, b1, sft = models[(dtype, layout)]
    shard = {"max_shard_size": "30KB"} if layout == "sharded" else {}
    plans = [[0.3, 0.7], [1.4, -0.4]]
    outs = merge_checkpoints([b0, b1], plans, [tmp_path / "a", tmp_path / "b"], progress=False, **shard)
    for out, plan in zip(outs, plans, strict=True):
        assert_same_bytes(out, merge_reference.expected([b0, b1], plan))
        assert (len(list(out.glob("*.safetensors"))) > 1) == (layout == "sharded")
    matrix, mu = coefficients.backbone_matrix(0.7, 2), [0.4, 0.6]
    (out,) = merge_soup([b0, b1], matrix, [mu], [tmp_path / "sft"], sft=sft, alpha=0.2, progress=False, **shard)
    lam, sft_weight = coefficients.soup_weights(matrix, mu, 0.2)
    assert_same_bytes(out, merge_reference.expected([b0, b1, sft], [*lam.tolist(), sft_weight]))


def test_tied_embeddings_are_bit_identical(models, tmp_path, chunk):
    (out,) = merge_checkpoints(models["tied"], [[0.6, 0.4]], [tmp_path / "tied"], progress=False)
    want = merge_reference.expected(models["tied"], [0.6, 0.4])
    assert "lm_head.weight" not in want and "transformer.wte.weight" in want
    assert_same_bytes(out, want)


def test_k11_sweep_is_bit_identical(models, tmp_path, chunk):
    b0, b1, sft = models[("bf16", "sharded")]
    matrix, prefs = coefficients.backbone_matrix(0.7, 2), coefficients.preference_grid(11)
    outs = merge_soup([b0, b1], matrix, prefs, sweep_outputs(tmp_path, prefs), sft=sft, alpha=0.2, progress=False)
    assert len(outs) == 11
    for mu, out in zip(prefs, outs, strict=True):
        lam, sft_weight = coefficients.soup_weights(matrix, mu, 0.2)
        assert_same_bytes(out, merge_reference.expected([b0, b1, sft], [*lam.tolist(), sft_weight]))
        assert json.loads((out / "bonesoup_merge.json").read_text())["preference"] == [round(x, 12) for x in mu]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_and_exit_2(models, tmp_path, capsys):
    b0, b1, _ = models[("bf16", "single")]
    args = ["merge", "--backbones", f"{b0},{b1}", "--preference", "0.3,0.7", "--output", str(tmp_path / "o")]
    assert cli.main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("openrlhf-bonesoup: error: --device cuda: no CUDA device"), err
    assert cli.main([*args, "--device", "tpu"]) == 2
    assert "device must be cpu or cuda" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
