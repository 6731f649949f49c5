"""The CPU stand-ins are used only when the real module is missing, and OpenRLHF itself runs."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# Not `from conftest import ...`: tests/gpu has a conftest.py of its own, and pytest may have imported
# that one under the name `conftest` first.
STAND_INS = Path(__file__).resolve().parent / "stand_ins"


def test_stand_ins_in_use_here_because_real_modules_are_absent():
    import flash_attn_2_cuda
    import vllm

    assert flash_attn_2_cuda.__file__.startswith(str(STAND_INS))
    assert vllm.__file__.startswith(str(STAND_INS))
    # Every installed location is searched before the stand-ins: nothing installed is shadowed.
    # (Ray may append the same site-packages again later; the first occurrence is the one searched.)
    site_packages = str(Path(torch.__file__).parent.parent)
    assert sys.path.index(site_packages) < sys.path.index(str(STAND_INS))


def test_real_module_wins_when_present(tmp_path):
    # A "real" vllm and flash_attn_2_cuda installed anywhere on the normal path take precedence.
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("REAL = True\n")
    (tmp_path / "flash_attn_2_cuda.py").write_text("REAL = True\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        sys.path.append({str(STAND_INS)!r})  # exactly what conftest does
        import vllm, flash_attn_2_cuda
        assert vllm.REAL and flash_attn_2_cuda.REAL, (vllm.__file__, flash_attn_2_cuda.__file__)
        assert not hasattr(vllm, "STAND_IN")
        print("real")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "real"


def test_vllm_stand_in_refuses_to_generate():
    import pytest
    import vllm

    with pytest.raises(RuntimeError, match="stand-in"):
        vllm.LLM  # noqa: B018


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
    # Importing the Ray trainer stack works with the stand-ins (it needs vllm at import time).
    import openrlhf.cli.train_ppo_ray  # noqa: F401
    import openrlhf.trainer.ray.launcher  # noqa: F401
