"""Merging PEFT LoRA adapters: rank concatenation (loaded by PEFT) and densified full weights.

The expected model is built independently: base weights + sum_j w_j s_j B_j A_j in float64, with
s_j = lora_alpha / r (or / sqrt(r) with rslora) read from each adapter's config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tiny_models
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from openrlhf_bonesoup import coefficients
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.merge import merge_soup
from openrlhf_bonesoup.merge_engine import merge_checkpoints

ADAPTERS = [dict(r=2, lora_alpha=4), dict(r=4, lora_alpha=16, use_rslora=True), dict(r=3, lora_alpha=3)]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lora(request, tmp_path_factory) -> dict:
    """A base model and three adapters with different r, alpha and rslora (GPT-2: fan_in_fan_out)."""
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    tok = tiny_models.make_tokenizer(root / "tok", request.param)
    make = tiny_models.make_llama_lm if request.param == "llama" else tiny_models.make_gpt2_lm
    make(root / "base", tok, seed=40)
    adapters = []
    for j, kw in enumerate(ADAPTERS):
        tiny_models.make_lora_adapter(root / f"adapter{j}", root / "base", seed=41 + j, **kw)
        adapters.append(root / f"adapter{j}")
    return {"base": root / "base", "adapters": adapters}


def expected_model(base: Path, adapters: list[Path], weights: list[float]):
    model = AutoModelForCausalLM.from_pretrained(str(base))
    state = {k: v.double() for k, v in model.state_dict().items()}
    for adapter, w in zip(adapters, weights, strict=True):
        config = json.loads((adapter / "adapter_config.json").read_text())
        s = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        for name, a in tensors.items():
            if ".lora_A." in name:
                b = tensors[name.replace(".lora_A.", ".lora_B.")]
                delta = s * (b.double() @ a.double())
                key = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                state[key] += w * (delta.T if config["fan_in_fan_out"] else delta)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.eval()


def logits(model) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def test_concatenated_adapter_equals_densified_merge(lora, tmp_path):
    weights = [0.5, 0.8, -0.3]
    (concat,) = merge_checkpoints(lora["adapters"], [weights], [tmp_path / "concat"], progress=False)
    (dense,) = merge_checkpoints(lora["adapters"], [weights], [tmp_path / "dense"], densify=True, progress=False)
    config = json.loads((concat / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 + 4 + 3 and not config["use_rslora"]
    want = logits(expected_model(lora["base"], lora["adapters"], weights))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(lora["base"])), str(concat))
    torch.testing.assert_close(logits(peft_model), want, rtol=1e-5, atol=1e-5)
    assert not (dense / "adapter_config.json").exists()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(str(dense))), want, rtol=1e-5, atol=1e-5)
    # The adapters' deltas really matter: the base model alone is far from the merge.
    assert (logits(AutoModelForCausalLM.from_pretrained(str(lora["base"]))) - want).abs().max() > 1e-2


def test_soup_extrapolates_lora_from_the_base_model(lora, tmp_path):
    adapters, matrix = lora["adapters"][:2], coefficients.backbone_matrix(0.7, 2)
    lam = torch.tensor([0.0, 1.0], dtype=torch.float64)  # B(0.7)^-1 (0.3, 0.7), by hand: ((0.3 - 0.3) / 0.4, ...)
    kw = dict(alpha=0.2, progress=False)
    (dense,) = merge_soup(adapters, matrix, [[0.3, 0.7]], [tmp_path / "d"], densify=True, **kw)
    (concat,) = merge_soup(adapters, matrix, [[0.3, 0.7]], [tmp_path / "c"], sft=lora["base"], **kw)
    want = logits(expected_model(lora["base"], adapters, (1.2 * lam).tolist()))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(str(dense))), want, rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(lora["base"])), str(concat))
    torch.testing.assert_close(logits(peft_model), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(BoneSoupError, match="extrapolate from their base model"):
        merge_soup(adapters, matrix, [[0.3, 0.7]], [tmp_path / "x"], sft=adapters[0], **kw)


def test_lora_validation(lora, tmp_path):
    a0, a1 = lora["adapters"][:2]
    with pytest.raises(BoneSoupError, match="mix LoRA adapter folders and full checkpoints"):
        merge_checkpoints([a0, lora["base"]], [[0.5, 0.5]], [tmp_path / "o"])
    with pytest.raises(BoneSoupError, match="densify applies to LoRA adapter inputs only"):
        merge_checkpoints([lora["base"], lora["base"]], [[0.5, 0.5]], [tmp_path / "o"], densify=True)
    with pytest.raises(BoneSoupError, match="needs the base model as a local folder"):
        merge_checkpoints([a0, a1], [[0.5, 0.5]], [tmp_path / "o"], densify=True, base=tmp_path / "nowhere")
    # Different target modules.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_bytes((a1 / "adapter_config.json").read_bytes())
    tensors = load_file(str(a1 / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if k != first}, str(partial / "adapter_model.safetensors"))
    with pytest.raises(BoneSoupError, match="adapt different modules"):
        merge_checkpoints([a0, partial], [[0.5, 0.5]], [tmp_path / "o"])
    # What OpenRLHF writes under ZeRO-3 with LoRA: adapter_model.bin only.
    zero3 = tmp_path / "zero3"
    zero3.mkdir()
    (zero3 / "adapter_config.json").write_bytes((a1 / "adapter_config.json").read_bytes())
    (zero3 / "adapter_model.bin").write_bytes(b"never read")
    with pytest.raises(BoneSoupError, match=r"never unpickles.*torch.load\(.*weights_only=True"):
        merge_checkpoints([a0, zero3], [[0.5, 0.5]], [tmp_path / "o"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial", "zero3"]


def test_a_lora_policy_sends_vllm_the_merged_weights_under_hf_names(lora):
    """integration/lora_sync.vllm_weights: what a LoRA policy's weight sync sends vLLM (OpenRLHF 0.11.2 sends the
    PEFT parameters themselves, which vLLM cannot load): exactly the HF model's parameters, each adapted one
    equal to base + s B A computed independently (fan_in_fan_out on GPT-2)."""
    from openrlhf_bonesoup.integration.lora_sync import MergedWeight, vllm_weights

    base = AutoModelForCausalLM.from_pretrained(str(lora["base"]))
    names = [name for name, _ in base.named_parameters()]
    policy = PeftModel.from_pretrained(base, str(lora["adapters"][1]))
    sent = vllm_weights(policy, zero3=False)
    assert [name for name, _ in sent] == names
    want = dict(expected_model(lora["base"], [lora["adapters"][1]], [1.0]).named_parameters())
    untouched = dict(AutoModelForCausalLM.from_pretrained(str(lora["base"])).named_parameters())
    merged = [(name, weight) for name, weight in sent if isinstance(weight, MergedWeight)]
    assert len(merged) >= 8  # the adapted layers
    for name, weight in sent:
        if isinstance(weight, MergedWeight):  # built only while upstream's loop holds it, freed after
            assert weight.data is None and (weight.shape, weight.dtype) == (want[name].shape, want[name].dtype)
            with weight.gathered():
                tensor = weight.data
                assert not torch.equal(tensor, untouched[name])
            assert weight.data is None
        else:
            tensor = weight
        assert tensor.dtype == want[name].dtype
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)
    with merged[0][1].gathered():  # grad-free: no autograd graph held while it is sent
        assert not merged[0][1].data.requires_grad
    idle = vllm_weights(policy, zero3=False, build=False)  # a rank that sends nothing builds nothing
    with dict(idle)[merged[0][0]].gathered() as weight:
        assert weight.data is None
