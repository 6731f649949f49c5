"""The streaming merge engine on full-weight safetensors checkpoints.

Expected values are computed independently: every input file is loaded whole with
safetensors.torch.load_file and summed in float64, and models are built by transformers from
those state dicts; the engine's outputs are read back with safetensors and transformers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from openrlhf_bonesoup import cli, coefficients
from openrlhf_bonesoup.checkpoints import PROVENANCE
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.merge import merge_soup, preference_name
from openrlhf_bonesoup.merge_engine import merge_checkpoints


def load_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read whole (the independent reader)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def reference(inputs: list[Path], weights: list[float], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    states = [load_all(p) for p in inputs]
    return {k: sum(w * s[k].double() for w, s in zip(weights, states, strict=True)).to(dtype) for k in states[0]}


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Three tiny LLaMA checkpoints (fp32; two of them sharded as HF shards), a bf16 trio, GPT-2 pairs."""
    root = tmp_path_factory.mktemp("merge")
    tok = tiny_models.make_tokenizer(root / "tok", "llama")
    paths = {}
    for j, shard in enumerate([None, "20KB", "50KB"]):
        model = tiny_models.make_llama_lm(root / f"scratch{j}", tok, seed=10 + j)
        paths[f"fp32_{j}"] = root / f"fp32_{j}"
        model.save_pretrained(str(paths[f"fp32_{j}"]), **({"max_shard_size": shard} if shard else {}))
        tok.save_pretrained(str(paths[f"fp32_{j}"]))
    for j in range(3):
        paths[f"bf16_{j}"] = root / f"bf16_{j}"
        tiny_models.make_llama_lm(paths[f"bf16_{j}"], tok, seed=20 + j, dtype=torch.bfloat16)
    # Tied embeddings: transformers' save omits lm_head.weight; OpenRLHF's save (a cloned state dict)
    # writes it. A merge of both kinds must work.
    gtok = tiny_models.make_tokenizer(root / "gtok", "gpt2")
    paths["gpt2_hf"] = root / "gpt2_hf"
    tiny_models.make_gpt2_lm(paths["gpt2_hf"], gtok, seed=30)
    model = tiny_models.make_gpt2_lm(root / "scratch_g", gtok, seed=31)
    paths["gpt2_cloned"] = root / "gpt2_cloned"
    model.save_pretrained(str(paths["gpt2_cloned"]), state_dict={k: v.clone() for k, v in model.state_dict().items()})
    gtok.save_pretrained(str(paths["gpt2_cloned"]))
    return paths


def test_fp32_sharded_inputs_exact_and_loadable_by_transformers(ckpts, tmp_path):
    inputs = [ckpts["fp32_0"], ckpts["fp32_1"], ckpts["fp32_2"]]
    plans = [[0.25, 0.5, 0.25], [1.4, -0.1, -0.3]]
    outs = merge_checkpoints(inputs, plans, [tmp_path / "a", tmp_path / "b"], max_shard_size="30KB", progress=False)
    for out, plan in zip(outs, plans, strict=True):
        want = reference(inputs, plan, torch.float32)
        got = load_all(out)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
        # HF layout: model-0000i-of-0000N.safetensors and an index transformers reads unchanged.
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in out.glob("*.safetensors"))
        assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert sorted(set(index["weight_map"].values())) == shards
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
        merged = AutoModelForCausalLM.from_pretrained(str(out))
        in_memory = AutoModelForCausalLM.from_config(merged.config)
        in_memory.load_state_dict(want)
        torch.testing.assert_close(logits(merged), logits(in_memory))
        assert PreTrainedTokenizerFast.from_pretrained(str(out)).vocab_size > 0
        record = json.loads((out / PROVENANCE).read_text())
        assert record["weights"] == plan and [i["path"] for i in record["inputs"]] == [str(p) for p in inputs]


def test_bf16_accumulates_in_fp32_and_keeps_the_dtype(ckpts, tmp_path):
    inputs = [ckpts["bf16_0"], ckpts["bf16_1"], ckpts["bf16_2"]]
    plan = [0.3, 0.9, -0.2]
    (out,) = merge_checkpoints(inputs, [plan], [tmp_path / "o"], progress=False)
    want, got = reference(inputs, plan, torch.bfloat16), load_all(out)
    same = 0
    for k in want:
        assert got[k].dtype == torch.bfloat16
        # fp32 accumulation vs float64: within one bf16 rounding step, or fp32's own error where the
        # weighted sum cancels to almost zero (inputs are ~0.02, fp32 eps * 0.02 ~ 1e-9).
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=2**-7, atol=1e-8)
        same += int((got[k] == want[k]).sum())
    assert same / sum(t.numel() for t in want.values()) > 0.99
    # A bf16 accumulation (what summing the state dicts in bf16 gives) would differ far more often.
    states = [load_all(p) for p in inputs]
    naive = {k: sum(w * s[k] for w, s in zip(plan, states, strict=True)) for k in want}
    assert sum(int((naive[k] != want[k]).sum()) for k in want) > 10 * sum(int((got[k] != want[k]).sum()) for k in want)


def test_tied_embeddings_transformers_and_openrlhf_layouts(ckpts, tmp_path):
    inputs = [ckpts["gpt2_hf"], ckpts["gpt2_cloned"]]
    assert "lm_head.weight" in load_all(inputs[1]) and "lm_head.weight" not in load_all(inputs[0])
    (out,) = merge_checkpoints(inputs, [[0.6, 0.4]], [tmp_path / "tied"], progress=False)
    got = load_all(out)
    assert "lm_head.weight" not in got  # what transformers writes for a tied model
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    want = reference(inputs, [0.6, 0.4], torch.float32)  # reference() iterates the first input's keys
    in_memory = AutoModelForCausalLM.from_config(merged.config)
    in_memory.load_state_dict(want, strict=False)
    in_memory.tie_weights()
    assert torch.equal(merged.lm_head.weight, merged.transformer.wte.weight)
    torch.testing.assert_close(logits(merged), logits(in_memory), rtol=1e-6, atol=1e-6)


def test_sweep_in_one_pass_equals_single_merges(ckpts, tmp_path):
    inputs = [ckpts["bf16_0"], ckpts["bf16_1"]]
    matrix = coefficients.backbone_matrix(0.7, 2)
    prefs = [[0.0, 1.0], [0.3, 0.7], [1.0, 0.0]]
    sweep = merge_soup(inputs, matrix, prefs, [tmp_path / "s" / preference_name(m) for m in prefs], progress=False)
    assert [p.name for p in sweep] == ["mu_0.00_1.00", "mu_0.30_0.70", "mu_1.00_0.00"]
    # lambda = B^-1 mu, by hand for B(0.7): lambda_1 = (mu_1 - 0.3) / 0.4, lambda_2 = 1 - lambda_1
    lambdas = [[-0.75, 1.75], [0.0, 1.0], [1.75, -0.75]]
    for mu, lam, out in zip(prefs, lambdas, sweep, strict=True):
        want, got = reference(inputs, lam, torch.bfloat16), load_all(out)
        for k in want:  # fp32 accumulation vs float64: one bf16 rounding step
            torch.testing.assert_close(got[k].float(), want[k].float(), rtol=2**-7, atol=1e-8)
        (single,) = merge_soup(inputs, matrix, [mu], [tmp_path / "single" / out.name], progress=False)
        assert (out / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()
        record = json.loads((out / PROVENANCE).read_text())
        assert record["preference"] == mu and record["beta"] == 0.7
        assert record["lambda"] == pytest.approx(lam, abs=1e-12)


def test_sft_extrapolation(ckpts, tmp_path):
    backbones, sft = [ckpts["fp32_0"], ckpts["fp32_1"]], ckpts["fp32_2"]
    matrix = coefficients.backbone_matrix(0.7, 2)
    (out,) = merge_soup(backbones, matrix, [[0.4, 0.6]], [tmp_path / "x"], sft=sft, alpha=0.25, progress=False)
    lam = [0.25, 0.75]  # B(0.7)^-1 (0.4, 0.6), by hand: ((0.4 - 0.3) / 0.4, (0.6 - 0.3) / 0.4)
    want = reference([*backbones, sft], [1.25 * lam[0], 1.25 * lam[1], -0.25], torch.float32)
    got = load_all(out)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    record = json.loads((out / PROVENANCE).read_text())
    assert record["alpha"] == 0.25 and record["sft"] == str(sft) and len(record["inputs"]) == 3


def test_workers_write_the_same_bytes(ckpts, tmp_path):
    inputs = [ckpts["fp32_0"], ckpts["fp32_1"]]
    kw = dict(max_shard_size="30KB", progress=False)
    (one,) = merge_checkpoints(inputs, [[0.5, 0.5]], [tmp_path / "one"], **kw)
    (two,) = merge_checkpoints(inputs, [[0.5, 0.5]], [tmp_path / "two"], workers=2, **kw)
    files = sorted(p.name for p in one.glob("model*"))
    assert files == sorted(p.name for p in two.glob("model*")) and len(files) > 2
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_ray_tasks_when_ray_is_initialised(ckpts, tmp_path, monkeypatch):
    import concurrent.futures

    ray = pytest.importorskip("ray")
    inputs = [ckpts["bf16_0"], ckpts["bf16_1"]]
    (one,) = merge_checkpoints(inputs, [[0.2, 0.8]], [tmp_path / "one"], max_shard_size="30KB", progress=False)

    def no_pool(*args, **kwargs):
        raise AssertionError("with Ray initialised the merge must not start a local process pool")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    # A local cluster of this test's own: never one the user runs on this machine (RAY_ADDRESS, `ray start`).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        (two,) = merge_checkpoints(
            inputs, [[0.2, 0.8]], [tmp_path / "ray"], max_shard_size="30KB", workers=2, progress=False
        )
    finally:
        ray.shutdown()
    for f in one.glob("model*"):
        assert f.read_bytes() == (two / f.name).read_bytes()


def test_plain_safetensors_without_config(tmp_path):
    """The CPU demo's checkpoints: one file, any tensor names, no config.json; 0-d and integer tensors."""
    for j in range(2):
        (tmp_path / f"in{j}").mkdir()
        save_file(
            {
                "theta": torch.tensor([1.0, 2.0, 3.0]) * (j + 1),
                "scale": torch.tensor(2.0 + j),
                "ids": torch.arange(4),
            },
            str(tmp_path / f"in{j}" / "model.safetensors"),
        )
    (out,) = merge_checkpoints([tmp_path / "in0", tmp_path / "in1"], [[1.5, -0.5]], [tmp_path / "o"], progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert got["theta"].tolist() == [0.5, 1.0, 1.5] and got["scale"].item() == 1.5
    assert got["ids"].tolist() == [0, 1, 2, 3]
    save_file(
        {"theta": torch.zeros(3), "scale": torch.tensor(0.0), "ids": torch.ones(4, dtype=torch.int64)},
        str(tmp_path / "in1" / "model.safetensors"),
    )
    with pytest.raises(BoneSoupError, match="integer tensor 'ids' differs"):
        merge_checkpoints([tmp_path / "in0", tmp_path / "in1"], [[0.5, 0.5]], [tmp_path / "o2"], progress=False)
    assert not (tmp_path / "o2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in0", "in1", "o"]


# ------------------------------------------------------------------------------------ atomic output


SLOW_MERGE = """
import os, sys, time
from openrlhf_bonesoup import merge_engine
real = os.pwrite
def slow(fd, data, offset):
    sys.stdout.write("writing\\n")  # one write per line: the merge's threads call this concurrently
    sys.stdout.flush()
    time.sleep(0.5)
    return real(fd, data, offset)
os.pwrite = slow
merge_engine.merge_checkpoints(sys.argv[1:3], [[0.5, 0.5]], [sys.argv[3]], progress=False)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_merge_leaves_nothing_behind(ckpts, tmp_path, sig):
    out = tmp_path / "merged"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_MERGE), str(ckpts["fp32_0"]), str(ckpts["fp32_1"]), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"  # killed midway: the first tensor is being written
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not out.exists()
    left = list(tmp_path.iterdir())
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + sig and left == []
    else:
        # SIGKILL cannot be caught: a hidden temp folder remains, which the next merge to the target removes.
        assert [p.name.startswith(".merged.partial-") for p in left] == [True]
        merge_checkpoints([ckpts["fp32_0"], ckpts["fp32_1"]], [[0.5, 0.5]], [out], progress=False)
        assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_existing_output_needs_overwrite(ckpts, tmp_path):
    inputs = [ckpts["fp32_0"], ckpts["fp32_1"]]
    out = tmp_path / "o"
    merge_checkpoints(inputs, [[1.0, 0.0]], [out], progress=False)
    with pytest.raises(BoneSoupError, match="exists: pass --overwrite"):
        merge_checkpoints(inputs, [[0.0, 1.0]], [out], progress=False)
    merge_checkpoints(inputs, [[0.0, 1.0]], [out], overwrite=True, progress=False)
    assert torch.equal(load_all(out)["model.norm.weight"], load_all(inputs[1])["model.norm.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


# ------------------------------------------------------------------------------------ validation


def _variant(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint src (one file, config and tokenizer) whose tensors went through edit(dict)."""
    dst.mkdir()
    tensors = load_all(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.glob("*.json"):
        if not f.name.endswith(".index.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def bad(ckpts, tmp_path_factory) -> dict[str, Path]:
    root, a = tmp_path_factory.mktemp("bad"), ckpts["fp32_0"]
    norm = "model.norm.weight"

    def set_item(key, value):
        return lambda t: t.__setitem__(key, value)

    paths = {
        "extra_key": _variant(a, root / "extra", set_item("extra.weight", torch.zeros(2))),
        "shape": _variant(a, root / "shape", set_item(norm, torch.ones(31))),
        "dtype": _variant(a, root / "dtype", lambda t: t.__setitem__(norm, t[norm].half())),
        "nan": _variant(a, root / "nan", lambda t: t[norm].__setitem__(3, float("nan"))),
        "inf": _variant(a, root / "inf", lambda t: t[norm].__setitem__(0, float("inf"))),
        "config": _variant(a, root / "config", lambda t: None),
        "pickle": root / "pickle",
    }
    config = json.loads((a / "config.json").read_text())
    (paths["config"] / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.1}))
    paths["pickle"].mkdir()
    (paths["pickle"] / "pytorch_model.bin").write_bytes(b"never read")
    return paths


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ("missing", [], "does not exist"),
        ("extra_key", [], "hold different tensors"),
        ("shape", [], "is F32[31] in"),
        ("dtype", [], "is F16[32] in"),
        ("nan", [], "has NaN/inf values"),
        ("inf", [], "has NaN/inf values"),
        ("config", [], "differs from"),
        ("pickle", [], "never unpickles"),
        (None, ["--preference", "0.5,0.6"], "must sum to 1"),
        (None, ["--preference", "1.2,-0.2"], "must be >= 0"),
        (None, ["--preference", "0.2,0.3,0.5"], "3 entries but there are 2"),
        (None, ["--beta", "0.4"], "beta must lie in"),
        (None, ["--alpha", "0.2"], "give its checkpoint (--sft)"),
        (None, ["--alpha", "-1", "--sft", "SFT"], "alpha must be a finite number >= 0"),
        (None, ["--output.max_shard_size", "lots"], "bad max shard size"),
        (None, ["--workers", "0"], "workers must be an integer >= 1"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(ckpts, bad, tmp_path, capsys, case, extra, message):
    second = {None: ckpts["fp32_1"], "missing": tmp_path / "nowhere"}.get(case) or bad[case]
    args = ["merge", "--backbones", f"{ckpts['fp32_0']},{second}", "--output", str(tmp_path / "out")]
    if "--preference" not in extra:
        args += ["--preference", "0.3,0.7"]
    args += [str(ckpts["fp32_2"]) if x == "SFT" else x for x in extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err  # may also hold the progress bar, drawn with carriage returns
    assert "Traceback" not in err and err.count("error:") == 1, err
    line = err.strip().split("\r")[-1].splitlines()[-1]
    assert line.startswith("openrlhf-bonesoup: error: ") and message in line, err
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder


def test_pickle_error_says_how_to_convert(bad, ckpts, tmp_path):
    with pytest.raises(BoneSoupError, match=r"from_pretrained\(.*\)\.save_pretrained"):
        merge_checkpoints([ckpts["fp32_0"], bad["pickle"]], [[0.5, 0.5]], [tmp_path / "o"])


def test_cli_merge_sweep(ckpts, tmp_path, capsys):
    args = ["merge", "--backbones", f"{ckpts['bf16_0']},{ckpts['bf16_1']}", "--beta", "0.8", "--grid", "3"]
    assert cli.main([*args, "--output", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["mu_0.00_1.00", "mu_0.50_0.50", "mu_1.00_0.00"]
    assert "mu_0.00_1.00: mu [0. 1.], lambda [-0.333333  1.333333]" in out
    record = json.loads((tmp_path / "sweep" / "mu_0.00_1.00" / PROVENANCE).read_text())
    assert record["lambda"] == pytest.approx([-1 / 3, 4 / 3])
    assert record["matrix"] == pytest.approx(coefficients.backbone_matrix(0.8, 2))
    assert os.path.samefile(record["inputs"][1]["path"], ckpts["bf16_1"])
