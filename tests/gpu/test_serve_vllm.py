"""`serve`'s vLLM backend (GPU only): a LoRA soup served with one LoRARequest per preference.

Greedy completions through the official `openai` client equal vLLM's own greedy generation with the
adapter `openrlhf-bonesoup merge` writes for the same preference (server first, then an offline
vLLM engine, one after the other on the same GPU). A full-weight soup asked for on the GPU falls back
to the transformers backend with a one-line notice. Not run on the CPU machines this project is
developed on.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from openrlhf_bonesoup.evaluate import vllm_usable

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if not vllm_usable():
    pytest.skip("needs vllm installed", allow_module_level=True)

import tiny_models  # noqa: E402
from openai import OpenAI  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from openrlhf_bonesoup import cli  # noqa: E402
from openrlhf_bonesoup.merge import sweep_outputs  # noqa: E402

PREFERENCES = [[1.0, 0.0], [0.3, 0.7]]
PROMPT = "Human: How do I bake bread? Assistant:"


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "openrlhf_bonesoup.cli", "serve", *args, "--device", "cuda", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 600
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited: {proc.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return proc, url
        except OSError:
            assert time.time() < deadline, "serve did not answer /health in 10 minutes"
            time.sleep(1)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    return err


@pytest.fixture(scope="module")
def soup(tmp_path_factory) -> dict:
    """A LLaMA base with vLLM-sized heads (head_dim 64), two LoRA adapters on it, and two full backbones."""
    root = tmp_path_factory.mktemp("serve_vllm")
    tok = tiny_models.make_tokenizer(root / "tok", "llama")
    for name, seed in (("base", 0), ("b1", 1)):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    tiny_models.make_lora_adapter(root / "a0", root / "base", r=2, lora_alpha=4, seed=21)
    tiny_models.make_lora_adapter(root / "a1", root / "base", r=4, lora_alpha=8, seed=22)
    return {"root": root, "adapters": f"{root / 'a0'},{root / 'a1'}"}


def test_full_weight_soup_falls_back_to_transformers(soup):
    root = soup["root"]
    proc, url = start(["--backbones", f"{root / 'base'},{root / 'b1'}", "--beta", "0.7"])
    try:
        c = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert c.models.list().data[0].bonesoup["backend"] == "transformers"
        r = c.completions.create(model="bonesoup:0.3,0.7", prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.bonesoup["preference"] == [0.3, 0.7]
    finally:
        err = stop(proc)
    assert "vLLM serves LoRA soups only" in err


def test_lora_soup_on_vllm_equals_vllm_with_the_merged_adapter(soup):
    # last in this file: the offline engine below keeps most of the GPU's memory until the process ends
    import vllm
    from vllm.lora.request import LoRARequest

    proc, url = start(["--backbones", soup["adapters"], "--beta", "0.7"])
    try:
        c = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert c.models.list().data[0].bonesoup["backend"] == "vllm"
        served = []
        for mu in PREFERENCES:
            r = c.completions.create(
                model="bonesoup", prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"preference": mu}
            )
            assert r.bonesoup["preference"] == mu
            served.append(r.choices[0].text)
            chunks = c.completions.create(
                model="bonesoup",
                prompt=PROMPT,
                max_tokens=16,
                temperature=0,
                stream=True,
                extra_body={"preference": mu},
            )
            assert "".join(ch.choices[0].text for ch in chunks) == served[-1]
    finally:
        stop(proc)
    root = soup["root"]
    prefs = ";".join(",".join(map(str, mu)) for mu in PREFERENCES)
    argv = ["merge", "--backbones", soup["adapters"], "--beta", "0.7", "--preferences", prefs]
    assert cli.main([*argv, "--output", str(root / "merged")]) == 0
    llm = vllm.LLM(model=str(root / "base"), enable_lora=True, max_lora_rank=8, max_loras=2)
    params = vllm.SamplingParams(temperature=0, max_tokens=16)
    for k, (text, path) in enumerate(zip(served, sweep_outputs(root / "merged", PREFERENCES), strict=True)):
        (out,) = llm.generate([PROMPT], params, lora_request=LoRARequest(f"m{k}", k + 1, str(path)), use_tqdm=False)
        assert out.outputs[0].text == text
    assert served[0] != served[1]
