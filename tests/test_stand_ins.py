"""The CPU stand-ins are used only when the real module is missing, and OpenRLHF itself runs."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import STAND_INS, TESTS


def test_stand_ins_in_use_here_because_real_modules_are_absent():
    import flash_attn_2_cuda
    import vllm

    assert flash_attn_2_cuda.__file__.startswith(str(STAND_INS))
    assert vllm.__file__.startswith(str(STAND_INS))
    # Every installed location is searched before the stand-ins: nothing installed is shadowed.
    # (Ray may append the same site-packages again later; the first occurrence is the one searched.)
    site = str(Path(torch.__file__).parent.parent)
    assert sys.path.index(site) < sys.path.index(str(STAND_INS))
    # A subprocess (and a Ray worker) gets them too, from stand_ins/boot/sitecustomize.py, last on its path.
    code = (
        f"import sys, vllm; print(vllm.__file__); print(sys.path.index({site!r}) < sys.path.index({str(STAND_INS)!r}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(STAND_INS / "vllm" / "__init__.py"), "True"]


REAL_VLLM_EVERYWHERE = """
import json, subprocess, sys
sys.path.insert(0, {tests!r})
import conftest  # the tests' own set-up, exactly as pytest runs it
import vllm
here = vllm.__file__
child = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__file__)"], capture_output=True, text=True)
import ray
ray.init(num_cpus=1, include_dashboard=False)
def where():
    import vllm
    return vllm.__file__
worker = ray.get(ray.remote(where).remote())
ray.shutdown()
print(json.dumps([here, child.stdout.strip() or child.stderr[-500:], worker]))
"""


def test_a_real_vllm_in_a_site_directory_wins_in_process_subprocesses_and_ray_workers(tmp_path):
    # A throwaway venv whose own site-packages holds a "real" vllm and which sees this venv's packages
    # (a .pth adds them as a site directory): the place a real vllm has on a GPU machine.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "vllm").mkdir()
    (site / "vllm" / "__init__.py").write_text("REAL = True\n")
    ours = Path(torch.__file__).parent.parent
    (site / "this_checkouts_venv.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
    code = REAL_VLLM_EVERYWHERE.format(tests=str(TESTS))
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    real = str(site / "vllm" / "__init__.py")
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [real, real, real]


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
