"""The post-training hook on what OpenRLHF really writes at the end of a PPO run.

Backbones are saved by OpenRLHF's own final save (DeepspeedStrategy.save_model on an
openrlhf.models.Actor, the ZeRO-2 path), full weights and LoRA, on CPU.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import tiny_models
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_bonesoup import cli, coefficients, soup
from openrlhf_bonesoup.checkpoints import PROVENANCE
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.hook import after_training

PREFERENCES = "0,1;0.3,0.7;1,0"


def openrlhf_save(actor, tokenizer, out: Path) -> Path:
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    args = NS(ds=NS(param_dtype="bf16", zero_stage=2, tensor_parallel_size=1), train=NS(dynamic_batch_enable=False))
    # save_model's last line is a distributed barrier + CUDA sync, run after every file is written;
    # in one CPU process without a process group it raises. Everything before it is OpenRLHF's save.
    with pytest.raises(ValueError, match="process group"):
        DeepspeedStrategy(args=args, zero_stage=2).save_model(actor, tokenizer, str(out))
    return out


def new_soup(soup_dir: Path, sft: Path) -> None:
    soup.init_soup(
        soup_dir,
        objectives=[{"name": "helpful"}, {"name": "harmless"}],
        beta=0.7,
        matrix=coefficients.backbone_matrix(0.7, 2),
        sft=str(sft),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """An SFT GPT-2 (tied embeddings) and two backbones per kind, saved by OpenRLHF."""
    from openrlhf.models import Actor

    root = tmp_path_factory.mktemp("hook")
    tok = tiny_models.make_tokenizer(root / "tok", "gpt2")
    tiny_models.make_gpt2_lm(root / "sft", tok, seed=50)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "sft"))
    out = {"sft": root / "sft", "full": [], "lora": []}
    for j in range(2):
        tiny_models.make_gpt2_lm(root / f"policy{j}", tok, seed=51 + j)  # stands for PPO's updates
        actor = Actor(str(root / f"policy{j}"), attn_implementation="eager", param_dtype="bf16")
        out["full"].append(openrlhf_save(actor, tokenizer, root / f"full{j}"))
        torch.manual_seed(60 + j)
        actor = Actor(str(root / "sft"), attn_implementation="eager", param_dtype="bf16", lora_rank=4, lora_alpha=8)
        with torch.no_grad():
            for name, param in actor.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.2)
        out["lora"].append(openrlhf_save(actor, tokenizer, root / f"lora{j}"))
    return out


def test_openrlhf_layouts(trained):
    full = sorted(p.name for p in trained["full"][0].iterdir())
    assert "model.safetensors" in full and "config.json" in full
    assert "lm_head.weight" in load_file(str(trained["full"][0] / "model.safetensors"))  # tied, yet written
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in trained["lora"][0].iterdir()}


def test_hook_merges_when_the_last_backbone_finishes(trained, tmp_path):
    soup_dir, merged = tmp_path / "soup", tmp_path / "merged"
    new_soup(soup_dir, trained["sft"])
    assert after_training(soup_dir, 1, trained["full"][1], PREFERENCES, merged) == []
    assert not merged.exists()
    outs = after_training(soup_dir, 0, trained["full"][0], PREFERENCES, merged)
    assert [p.name for p in outs] == ["mu_0.00_1.00", "mu_0.30_0.70", "mu_1.00_0.00"]
    manifest = soup.read_soup(soup_dir)
    assert [e["status"] for e in manifest["backbones"]] == ["trained", "trained"]
    states = [load_file(str(p / "model.safetensors")) for p in trained["full"]]
    # lambda = B^-1 mu by hand for B(0.7): ((mu_1 - 0.3) / 0.4, (mu_2 - 0.3) / 0.4)
    lambdas = [[-0.75, 1.75], [0.0, 1.0], [1.75, -0.75]]
    for out, mu, lam in zip(outs, [[0.0, 1.0], [0.3, 0.7], [1.0, 0.0]], lambdas, strict=True):
        record = json.loads((out / PROVENANCE).read_text())
        assert record["lambda"] == pytest.approx(lam, abs=1e-12) and record["preference"] == mu
        for field in ("bytes", "sha256_headers_and_samples"):  # the soup and the merge name inputs alike
            assert record["inputs"][0][field] == manifest["backbones"][0][field]
        model = AutoModelForCausalLM.from_pretrained(str(out))
        for name, got in model.state_dict().items():
            if name != "lm_head.weight":
                want = (lam[0] * states[0][name].double() + lam[1] * states[1][name].double()).to(torch.bfloat16)
                torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-8)
        assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_hook_merges_openrlhf_lora_backbones(trained, tmp_path, capsys):
    soup_dir = tmp_path / "soup"
    new_soup(soup_dir, trained["sft"])
    after_training(soup_dir, 0, trained["lora"][0], "0.3,0.7")
    (concat,) = after_training(soup_dir, 1, trained["lora"][1], "0.3,0.7")
    assert concat == soup_dir / "merged" / "mu_0.30_0.70"
    # The same soup, densified through the CLI's manifest form.
    args = ["merge", "--soup_dir", str(soup_dir), "--preference", "0.3,0.7", "--lora.densify"]
    assert cli.main([*args, "--output", str(tmp_path / "dense")]) == 0
    assert "lambda [0. 1.]" in capsys.readouterr().out
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(str(trained["sft"]), dtype=torch.float32)
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(base, str(concat)).eval()(input_ids=ids).logits
        dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), dtype=torch.float32).eval()
        via_dense = dense(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(trained["sft"]), dtype=torch.float32).eval()(input_ids=ids)
    # bf16 adapters: the concatenated adapter's folded B is rounded to bf16 once, the dense merge is not.
    torch.testing.assert_close(via_peft, via_dense, rtol=1e-2, atol=1e-2)
    assert (via_dense - plain.logits).abs().max() > 5e-2


def test_hook_refuses_pickles_before_registering(trained, tmp_path):
    soup_dir, ckpt = tmp_path / "soup", tmp_path / "zero3_lora"
    new_soup(soup_dir, trained["sft"])
    ckpt.mkdir()
    (ckpt / "adapter_config.json").write_bytes((trained["lora"][0] / "adapter_config.json").read_bytes())
    (ckpt / "adapter_model.bin").write_bytes(b"never read")
    with pytest.raises(BoneSoupError, match="holds more than tensors") as error:
        after_training(soup_dir, 0, ckpt, PREFERENCES)
    assert "\n" not in str(error.value)
    full = tmp_path / "full_pickle"
    full.mkdir()
    (full / "config.json").write_bytes((trained["full"][0] / "config.json").read_bytes())
    (full / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(BoneSoupError, match="never unpickles"):
        after_training(soup_dir, 0, full, PREFERENCES)
    assert soup.read_soup(soup_dir)["backbones"] == [None, None]
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter_config.json", "adapter_model.bin"]


def zero3_copy(lora_dir: Path, dst: Path, state=None) -> Path:
    """lora_dir as OpenRLHF's save leaves it under --ds.zero_stage 3: the PEFT state dict saved with
    torch.save as adapter_model.bin, adapter_model.safetensors removed (DeepspeedStrategy.save_model)."""
    shutil.copytree(lora_dir, dst)
    weights = dst / "adapter_model.safetensors"
    torch.save(load_file(str(weights)) if state is None else state, dst / "adapter_model.bin")
    weights.unlink()
    return dst


def test_zero3_adapter_bin_is_converted_registered_and_merges_the_same(trained, tmp_path):
    zero3 = [zero3_copy(p, tmp_path / f"zero3_{j}") for j, p in enumerate(trained["lora"])]
    soup_dir, twin = tmp_path / "soup", tmp_path / "soup_safetensors"
    for folder, backbones in ((soup_dir, zero3), (twin, trained["lora"])):
        new_soup(folder, trained["sft"])
        after_training(folder, 0, backbones[0])
        (out,) = after_training(folder, 1, backbones[1], "0.3,0.7")
    for j, folder in enumerate(zero3):
        converted, original = folder / "adapter_model.safetensors", trained["lora"][j] / "adapter_model.safetensors"
        want = load_file(str(original))
        got = load_file(str(converted))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert soup.read_soup(soup_dir)["backbones"][j]["checkpoint"] == str(folder.resolve())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (soup_dir / "merged" / "mu_0.30_0.70" / name).read_bytes() == (out / name).read_bytes()


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"step": 3}, "holds non-tensor entries ('step': int"),
        ([torch.zeros(2)], "holds list"),
        ({"x": NotATensor()}, "holds more than tensors (Unsupported global"),
    ],
)
def test_zero3_adapter_bin_of_other_objects_is_refused_in_one_line(trained, tmp_path, state, message):
    soup_dir = tmp_path / "soup"
    new_soup(soup_dir, trained["sft"])
    folder = zero3_copy(trained["lora"][0], tmp_path / "zero3", state=state)
    with pytest.raises(BoneSoupError, match=re.escape(message)) as error:
        after_training(soup_dir, 0, folder, PREFERENCES)
    assert "\n" not in str(error.value)
    assert not (folder / "adapter_model.safetensors").exists()
    assert soup.read_soup(soup_dir)["backbones"] == [None, None]


def test_cli_soup_dir_needs_every_backbone(trained, tmp_path, capsys):
    soup_dir = tmp_path / "soup"
    new_soup(soup_dir, trained["sft"])
    after_training(soup_dir, 0, trained["full"][0])
    args = ["merge", "--soup_dir", str(soup_dir), "--preference", "0.5,0.5", "--output", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert "not every backbone" in capsys.readouterr().err
    assert cli.main([*args, "--beta", "0.8"]) == 2
    assert "takes B from its manifest" in capsys.readouterr().err
