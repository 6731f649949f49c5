"""evaluate's vLLM branch, for real (vLLM's CPU build in CI, its CUDA build on a GPU): the same greedy
responses, and so the same scores' order, as the transformers branch on a tiny soup. One engine serves
every preference, its weights reloaded in place for each: the responses change with the preference and
each equals the transformers branch's for that preference's merged checkpoint.

The backbones are tiny LLaMAs vLLM's kernels take (head size 64, float32) built so that greedy
decoding cannot depend on rounding: each one's next token is a fixed permutation sigma_j of the last
one, by a margin of ~100 logits (lm_head rows are the embeddings, permuted; the random layers add
~5% to the residual stream). vLLM's attention computes in TF32 on a GPU, transformers in float32;
only a margin like this makes "same greedy text" a fair demand. Merging moves the argmax from sigma_0
to sigma_1 with the preference, so the responses differ between preferences.
"""

import json

import numpy as np
import pytest
import tiny_models
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from openrlhf_bonesoup import evaluate, generation, objectives, soup
from openrlhf_bonesoup.coefficients import backbone_matrix

PROMPTS = [
    "Human: How do I bake bread? Assistant:",
    "Human: Tell me a joke. Assistant:",
    "The weather today is",
    "Summarize: The quick brown fox",
]
# lambda = B^-1 mu with beta 0.7: (1.75, -0.75), (-0.25, 1.25), (-0.75, 1.75); no 50/50 preference,
# whose lambda (0.5, 0.5) would tie sigma_0(t) and sigma_1(t).
PREFERENCES = [[1.0, 0.0], [0.2, 0.8], [0.0, 1.0]]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8, "batch_size": 4}


def _permutation_lm(path, tokenizer, seed: int) -> None:
    """A LLaMA whose greedy next token after t is sigma(t), sigma a seeded permutation of the printable
    ASCII tokens (so the text decodes alike token by token). Layers and embeddings are the same for
    every seed: only lm_head differs, as a merge then sees it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    texts = {i: tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids}
    printable = [i for i, text in texts.items() if text.isascii() and text.isprintable()]
    order = torch.randperm(len(printable), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        embeddings = torch.randn(len(tokenizer), config.hidden_size, generator=torch.Generator().manual_seed(0))
        head = embeddings.clone()
        for t, k in zip(printable, order, strict=True):
            head[printable[k]] = embeddings[t]  # logit of sigma(t) = |e_t|^2 when the hidden state is ~e_t
        model.model.embed_tokens.weight.copy_(embeddings)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


@pytest.fixture(scope="module")
def vllm_soup(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_soup")
    tokenizer = tiny_models.make_tokenizer(root / "tokenizer", "llama")
    folder = root / "soup"
    specs = objectives.parse_objectives(f"{tiny['rm_llama']},{tiny['rm_gpt2']}")
    for j in range(2):
        _permutation_lm(root / f"backbone{j}", tokenizer, seed=10 + j)
    soup.init_soup(folder, objectives=specs, beta=0.7, matrix=backbone_matrix(0.7, 2), sft=str(root / "backbone0"))
    for j in range(2):
        soup.register_backbone(folder, j, status="trained", checkpoint=root / f"backbone{j}")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"input": p}) + "\n" for p in PROMPTS))
    return folder


def _responses(output):
    return {
        path.stem: [json.loads(line)["response"] for line in path.read_text().splitlines()]
        for path in sorted((output / "generations").glob("*.jsonl"))
    }


def _pairwise_order(means: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """sign(mean_a - mean_b) for every pair of preferences and objective; differences under tol are ties."""
    diff = means[:, None, :] - means[None, :, :]
    return np.sign(np.where(np.abs(diff) < tol, 0.0, diff))


def test_vllm_branch_matches_transformers(vllm_soup, tmp_path, monkeypatch):
    prompts = vllm_soup.parent / "prompts.jsonl"
    closed, close = [], generation.Generator.close  # whether each close found an engine running
    monkeypatch.setattr(generation.Generator, "close", lambda self: closed.append(self.llm is not None) or close(self))
    with_vllm = evaluate.evaluate(vllm_soup, PREFERENCES, prompts, tmp_path / "vllm", sampling=GREEDY)
    assert with_vllm["backend"] == "vllm"
    assert closed == [True]  # the engine is shut down once the evaluation ends

    hf = {**GREEDY, "backend": "transformers"}
    with_hf = evaluate.evaluate(vllm_soup, PREFERENCES, prompts, tmp_path / "hf", sampling=hf)
    assert with_hf["backend"] == "transformers"

    texts_vllm, texts_hf = _responses(tmp_path / "vllm"), _responses(tmp_path / "hf")
    assert texts_vllm == texts_hf
    assert texts_vllm["mu_1.00_0.00"] != texts_vllm["mu_0.00_1.00"]  # the preference changes the model
    assert all(len(r) > 0 for responses in texts_vllm.values() for r in responses)
    means_vllm, means_hf = np.asarray(with_vllm["mean"]), np.asarray(with_hf["mean"])
    np.testing.assert_array_equal(_pairwise_order(means_vllm), _pairwise_order(means_hf))
    np.testing.assert_allclose(means_vllm, means_hf, atol=1e-3)


def test_sampled_responses_are_drawn_independently_per_prompt_and_reproducibly(tiny_gpu):
    """The same prompt six times, sampled at temperature 1 from a random policy (a flat distribution):
    one seed per prompt gives six different draws (one seed for all gave six copies of one sample, so a
    mean over prompts was one sample's score), and the same six again on a second call."""
    # vLLM engine flags as evaluate's `-- FLAGS` passes them (a 70B soup's --tensor-parallel-size 8 on a GPU)
    flags = ["--max-num-seqs", "3", "--max-model-len", "192"]
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "backend": "vllm", "vllm_flags": flags}
    with generation.Generator(sampling) as generator:
        first = generator.generate(tiny_gpu["policy"], ["Human: Tell me about tea. Assistant:"] * 6)
        again = generator.generate(tiny_gpu["policy"], ["Human: Tell me about tea. Assistant:"] * 6)
        config = generator.llm.llm_engine.vllm_config
        assert (config.scheduler_config.max_num_seqs, config.model_config.max_model_len) == (3, 192)
    assert len(set(first)) == 6, first
    assert again == first


def test_every_response_has_a_token_as_in_openrlhfs_rollouts(tiny_gpu, tmp_path):
    """OpenRLHF samples rollouts with at least one token (min_tokens 1), so training never teaches a policy
    against ending at once; evaluate samples the same way in both branches. The policy here ends at once
    with p ~ 1 (every hidden state has a large constant component that only </s>'s lm_head row reads): one
    token, then </s>, instead of an empty answer.

    The forced token is drawn among printable ones (the same component pushes every other token down): a
    byte-level token such as 'ĸ' (byte 0x96, a lone UTF-8 continuation byte) is a real token that decodes to
    no text, which vLLM 0.29 drew with seed 44 (`['\x14', ' the', '']`: token ids [247, </s>]), as it did a
    token ending in an incomplete UTF-8 sequence, which vLLM's detokenizer holds back."""
    model = LlamaForCausalLM.from_pretrained(str(tiny_gpu["policy"]), dtype=torch.float32)
    eos = model.config.eos_token_id
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gpu["policy"]))

    def printable(i: int) -> bool:  # not special (responses are decoded without them), no partial UTF-8 ('\ufffd')
        text = tokenizer.decode([i])
        return i not in tokenizer.all_special_ids and text.isprintable() and text.strip() and "\ufffd" not in text

    unprintable = [i for i in range(len(tokenizer)) if not printable(i)]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[unprintable, 0] = -10.0
        model.lm_head.weight[eos, 0] = 10.0
    model.save_pretrained(str(tmp_path / "ends"))
    tiny_models.make_tokenizer(tmp_path / "ends", "llama")
    prompts = ["Human: Tell me about tea. Assistant:"] * 3
    for backend in ("vllm", "transformers"):
        sampling = {"temperature": 1.0, "max_new_tokens": 8, "backend": backend}
        with generation.Generator(sampling) as generator:
            responses = generator.generate(tmp_path / "ends", prompts)
        assert all(len(r) > 0 for r in responses), (backend, responses)
