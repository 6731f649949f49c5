"""`merge --device cuda`: chunks summed on the GPU, bytes identical to the CPU merge and to the reference.

The independent reference is tests/merge_reference.py (numpy float64, fused multiply-add rounded to
fp32). Needs a CUDA GPU: skipped without one.
"""

from __future__ import annotations

import merge_reference
import pytest
import tiny_models
import torch
from safetensors.torch import load_file, save_file

from openrlhf_bonesoup import cli, coefficients, merge_engine
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.merge import merge_soup, sweep_outputs
from openrlhf_bonesoup.merge_engine import merge_checkpoints, weighted_sum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    return merge_reference.build_models(tmp_path_factory.mktemp("cuda"))


@pytest.fixture(params=["default chunk", "chunk 777"])
def chunk(request, monkeypatch) -> None:
    if request.param == "chunk 777":
        monkeypatch.setattr(merge_engine, "CUDA_CHUNK_ELEMENTS", 777)


def assert_same_as_cpu(gpu_out, cpu_out) -> None:
    """Every weight file and the index byte for byte (bonesoup_merge.json differs: its time stamp)."""
    names = sorted(p.name for p in cpu_out.iterdir() if p.name.startswith("model"))
    assert names and names == sorted(p.name for p in gpu_out.iterdir() if p.name.startswith("model"))
    for name in names:
        assert (gpu_out / name).read_bytes() == (cpu_out / name).read_bytes(), name


def test_weighted_sum_on_cuda_equals_cpu():
    gen = torch.Generator().manual_seed(1)
    for dtype in merge_reference.DTYPES.values():
        xs = [(torch.randn(1 << 20, generator=gen) * 0.02).to(dtype) for _ in range(3)]
        weights = [-0.25, 1.25, 1 / 3]
        cpu = weighted_sum(xs, weights, torch.empty(1 << 20))
        gpu = weighted_sum([x.cuda() for x in xs], weights, torch.empty(1 << 20, device="cuda"))
        assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32)), dtype


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("dtype", list(merge_reference.DTYPES))
def test_cuda_merge_is_bit_identical(models, tmp_path, chunk, dtype, layout):
    b0, b1, sft = models[(dtype, layout)]
    kw = dict(progress=False, **({"max_shard_size": "30KB"} if layout == "sharded" else {}))
    plans = [[0.3, 0.7], [1.4, -0.4]]
    outs = merge_checkpoints([b0, b1], plans, [tmp_path / "a", tmp_path / "b"], device="cuda", **kw)
    cpu = merge_checkpoints([b0, b1], plans, [tmp_path / "cpu_a", tmp_path / "cpu_b"], **kw)
    for out, cpu_out, plan in zip(outs, cpu, plans, strict=True):
        assert merge_reference.merged(out) == merge_reference.expected([b0, b1], plan)
        assert_same_as_cpu(out, cpu_out)
    matrix, mu = coefficients.backbone_matrix(0.7, 2), [0.4, 0.6]
    (out,) = merge_soup([b0, b1], matrix, [mu], [tmp_path / "sft"], sft=sft, alpha=0.2, device="cuda", **kw)
    lam, sft_weight = coefficients.soup_weights(matrix, mu, 0.2)
    assert merge_reference.merged(out) == merge_reference.expected([b0, b1, sft], [*lam.tolist(), sft_weight])


def test_cuda_tied_embeddings_and_k11_sweep(models, tmp_path, chunk):
    (out,) = merge_checkpoints(models["tied"], [[0.6, 0.4]], [tmp_path / "tied"], device="cuda", progress=False)
    assert merge_reference.merged(out) == merge_reference.expected(models["tied"], [0.6, 0.4])
    b0, b1, sft = models[("bf16", "sharded")]
    matrix, prefs = coefficients.backbone_matrix(0.7, 2), coefficients.preference_grid(11)
    outs = sweep_outputs(tmp_path / "sweep", prefs)
    merge_soup([b0, b1], matrix, prefs, outs, sft=sft, alpha=0.2, device="cuda:0", progress=False)
    for mu, out in zip(prefs, outs, strict=True):
        lam, sft_weight = coefficients.soup_weights(matrix, mu, 0.2)
        assert merge_reference.merged(out) == merge_reference.expected([b0, b1, sft], [*lam.tolist(), sft_weight])


def test_cuda_densified_lora_equals_cpu(tmp_path, chunk):
    tok = tiny_models.make_tokenizer(tmp_path / "tok", "llama")
    tiny_models.make_llama_lm(tmp_path / "base", tok, seed=90)
    adapters = []
    for j, kw in enumerate([dict(r=2, lora_alpha=4), dict(r=4, lora_alpha=16, use_rslora=True)]):
        tiny_models.make_lora_adapter(tmp_path / f"adapter{j}", tmp_path / "base", seed=91 + j, **kw)
        adapters.append(tmp_path / f"adapter{j}")
    kw = dict(densify=True, progress=False)
    (gpu,) = merge_checkpoints(adapters, [[0.5, 0.8]], [tmp_path / "gpu"], device="cuda", **kw)
    (cpu,) = merge_checkpoints(adapters, [[0.5, 0.8]], [tmp_path / "cpu"], **kw)
    assert_same_as_cpu(gpu, cpu)
    assert merge_reference.merged(gpu) != merge_reference.merged(tmp_path / "base")  # the deltas were added


def test_cuda_refuses_nan_inputs_and_the_cli_flag_works(models, tmp_path, capsys):
    b0, b1, _ = models[("fp32", "single")]
    bad = tmp_path / "nan"
    bad.mkdir()
    tensors = load_file(str(b1 / "model.safetensors"))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_bytes((b1 / "config.json").read_bytes())
    with pytest.raises(BoneSoupError, match="has NaN/inf values"):
        merge_checkpoints([b0, bad], [[0.5, 0.5]], [tmp_path / "o"], device="cuda", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]
    args = ["merge", "--backbones", f"{b0},{b1}", "--preference", "0.3,0.7", "--output"]
    assert cli.main([*args, str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    assert cli.main([*args, str(tmp_path / "cpu")]) == 0
    assert_same_as_cpu(tmp_path / "gpu", tmp_path / "cpu")
