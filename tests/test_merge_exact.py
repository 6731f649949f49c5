"""The merge engine's bytes equal an independent fp32-accumulate reference (tests/merge_reference.py).

bf16, fp16 and fp32 checkpoints, single-file and sharded, tied embeddings, n = 2 and n = 3 with an
SFT input, a K = 11 sweep; with the default chunk and with a small odd chunk, so that chunks cut
tensors at arbitrary elements and the worker threads share every tensor. The CPU kernel (kernel.py)
and torch's `weighted_sum` (serving, CUDA) are each checked against the reference, on edge values too.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import merge_reference
import numpy as np
import pytest
import torch

from openrlhf_bonesoup import cli, coefficients, kernel, merge_engine
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


def _edge_values(dtype: torch.dtype, m: int, seed: int) -> torch.Tensor:
    """Random values of every magnitude, the largest value below each power of two (a sum of it times
    a weight just above 1 rounds up across the binade), signed zeros and subnormals."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, generator=gen, dtype=torch.float64) * torch.exp2(torch.randint(-30, 30, (m,), generator=gen))
    info = torch.finfo(torch.float32 if dtype == torch.float64 else dtype)  # the sums are fp32
    below = [torch.nextafter(torch.tensor(2.0**e), torch.tensor(0.0)).to(dtype).item() for e in range(-8, 9)]
    x[: len(below)] = torch.tensor(below, dtype=torch.float64)
    x[20:26] = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max / 2], dtype=torch.float64)
    return x.clamp(-info.max / 4, info.max / 4).to(dtype)


def _storage(x: torch.Tensor) -> np.ndarray:
    return {
        torch.bfloat16: lambda: x.view(torch.int16).numpy().view(np.uint16),
        torch.float16: lambda: x.view(torch.int16).numpy(),
    }.get(x.dtype, x.numpy)()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_kernel_is_the_reference_fma_chain_on_edge_values(dtype):
    """n = 1..4 inputs, K = 3 outputs, lengths across tiles, an fp32 extra term (LoRA deltas): every
    byte equals the reference, and nothing finite is reported as NaN/inf (an OR of exponents did: 1.99 -> 2.0)."""
    m = 2 * kernel.TILE + 5
    # n = 1, outputs 0 and 1: the largest bf16 / fp16 values below 2^e, times these weights, round up to 2^e.
    weights = np.array(
        [[1 + 2**-10, -0.25, 1 / 3, 1.4], [1 + 3 * 2**-13, 0.5, -0.2, 0.1], [-1.0, 2.0, 0, 1e-3]], np.float32
    )
    for n in (1, 2, 3, 4):
        xs = [_edge_values(dtype, m, seed) for seed in range(n)]
        extra = (torch.randn(3, m, generator=torch.Generator().manual_seed(9)) * 1e-3).numpy()
        for ex in (np.empty((0, 0), np.float32), extra):
            out = np.empty((3, m), _storage(xs[0]).dtype)
            assert kernel.weighted_sums(tuple(_storage(x) for x in xs), weights[:, :n].copy(), out, ex) == -1
            for k in range(3):
                acc = np.zeros(m, np.float32)
                for x, w in zip(xs, weights[k, :n], strict=True):
                    acc = merge_reference.fma32(x.float().numpy(), w, acc)
                if len(ex):
                    acc = merge_reference.fma32(ex[k], 1.0, acc)
                want = (
                    acc.astype(np.float64).tobytes()
                    if dtype == torch.float64
                    else merge_reference.cast(
                        acc, {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
                    )
                )
                assert out[k].tobytes() == want, (dtype, n, k, len(ex))


@pytest.mark.parametrize("m", [1, kernel.TILE - 1, kernel.TILE, kernel.TILE + 1, 3 * kernel.TILE + 1])
def test_kernel_writes_every_element_up_to_the_last_tile(m):
    """Lengths around the tile size, a last tile of one element included (m = 1, TILE + 1, 3 TILE + 1):
    every element of every output is summed and written. The outputs start as NaN, so an element the
    kernel skips shows as a byte that differs from the reference."""
    gen = torch.Generator().manual_seed(m)
    xs = [(torch.randn(m, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(3)]
    weights = np.array([[0.3, 0.7, 0.0], [1.4, -0.4, 0.0], [0.5, 0.25, 0.25]], np.float32)
    out = np.full((3, m), 0x7FC0, np.uint16)  # bf16 quiet NaN
    assert kernel.weighted_sums(tuple(_storage(x) for x in xs), weights, out, np.empty((0, 0), np.float32)) == -1
    for k in range(3):
        acc = np.zeros(m, np.float32)
        for x, w in zip(xs, weights[k], strict=True):
            acc = merge_reference.fma32(x.float().numpy(), w, acc)
        assert out[k].tobytes() == merge_reference.cast(acc, "BF16"), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_reports_the_first_output_that_is_not_finite(dtype):
    info = torch.finfo(dtype)
    y = torch.tensor([1.0, info.max, -info.max, 0.5] * 600, dtype=dtype)
    x, out, no_extra = _storage(y.clone()), np.empty((3, y.numel()), _storage(y).dtype), np.empty((0, 0), np.float32)
    ok, overflow = [0.5, 0.5], [1.0, 1.0 + 2**-6]  # max + max * (1 + 2^-6) is beyond max: inf after rounding
    assert kernel.weighted_sums((x, x), np.array([ok, overflow, ok], np.float32), out, no_extra) == 1
    y[2001] = float("nan")
    weights = np.array([ok, [1.0, 0.0], ok], np.float32)  # a NaN at weight 0 still poisons the sum
    assert kernel.weighted_sums((x, _storage(y)), weights, out, no_extra) == 0


def test_cpu_merge_loads_no_torch(models, tmp_path):
    """The merge CLI on CPU must not pay torch's import (2 s of its start-up); --device cuda may."""
    b0, b1, _ = models[("bf16", "single")]
    code = (
        "import sys; from openrlhf_bonesoup import cli; rc = cli.main(sys.argv[1:]); "
        "print(rc, sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    args = ["merge", "--backbones", f"{b0},{b1}", "--beta", "1", "--preference", "0.3,0.7"]  # B = I: lambda = mu
    args += ["--output", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    assert r.stdout.split("\n")[-2] == "0 []", r.stdout + r.stderr
    assert_same_bytes(tmp_path / "o", merge_reference.expected([b0, b1], [0.3, 0.7]))


def _write_safetensors(path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file with the tensors in the given order, unpadded: offsets as they fall."""
    header, pos = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.mkdir()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(t[3] for t in tensors))


def test_unaligned_tensors_merge_exactly(tmp_path):
    """A file written by another tool may put a bf16 tensor at an odd byte: merged with an aligned twin."""
    gen = torch.Generator().manual_seed(3)
    w = [(torch.randn(2 * kernel.TILE + 3, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(2)]
    ids = bytes([1, 2, 3])
    _write_safetensors(
        tmp_path / "aligned", [("w", "BF16", [w[0].numel()], _storage(w[0]).tobytes()), ("ids", "U8", [3], ids)]
    )
    _write_safetensors(
        tmp_path / "odd", [("ids", "U8", [3], ids), ("w", "BF16", [w[1].numel()], _storage(w[1]).tobytes())]
    )
    (out,) = merge_checkpoints([tmp_path / "aligned", tmp_path / "odd"], [[0.3, 0.7]], [tmp_path / "o"], progress=False)
    acc = merge_reference.fma32(
        w[1].float().numpy(), 0.7, merge_reference.fma32(w[0].float().numpy(), 0.3, np.zeros(w[0].numel(), np.float32))
    )
    assert merge_reference.merged(out) == {"w": merge_reference.cast(acc, "BF16"), "ids": ids}


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
