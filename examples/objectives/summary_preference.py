"""Human-preference reward for the Reddit Summary setting: OpenRLHF's `reward_func(queries, prompts, labels)`.

Tristan/gpt2_reward_summarization is a GPT-2 sequence classifier with one logit, trained on
openai/summarize_from_feedback; as in the reference code it reads "summary <|endoftext|> post" (its bos
token between them). The post and the summary are read back from the prompt format of
examples/scripts/prepare_prompts.py. Download the model beforehand
(`hf download Tristan/gpt2_reward_summarization`) or set SUMMARY_MODEL to a local folder.
"""

import os

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

MODEL = os.environ.get("SUMMARY_MODEL", "Tristan/gpt2_reward_summarization")
INPUT, RESPONSE = "### Input:", "### Response:"
EOS_MARKERS = ("</s>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>")  # the policy's end of text, if decoded
# Loaded when the file is imported (once per process, by the plugin's objective loader), never lazily
# from the threads OpenRLHF calls reward_func in: transformers' from_pretrained patches torch's init
# functions process-wide while it loads, so two first calls racing could leave them patched.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = AutoTokenizer.from_pretrained(MODEL)
model = (
    AutoModelForSequenceClassification.from_pretrained(
        MODEL, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32
    )
    .to(DEVICE)
    .eval()
)


def post_and_summary(query: str, prompt: str) -> tuple[str, str]:
    """The post from the prompt, the summary from the query (prompt + response, as OpenRLHF decodes it)."""
    post = prompt.split(INPUT, 1)[-1].split(RESPONSE, 1)[0].strip()
    summary = query.split(RESPONSE)[-1]
    for marker in EOS_MARKERS:
        summary = summary.split(marker, 1)[0]
    return post, summary.strip()


def reward_func(queries: list[str], prompts: list[str], labels: list) -> torch.Tensor:
    rewards = []
    with torch.no_grad():
        for query, prompt in zip(queries, prompts, strict=True):  # one at a time: no padding, as the reference
            post, summary = post_and_summary(query, prompt)
            text = f"{summary} {tokenizer.bos_token} {post}"
            inputs = tokenizer(
                text, truncation=True, max_length=min(tokenizer.model_max_length, 1024), return_tensors="pt"
            )
            rewards.append(model(**inputs.to(model.device)).logits[0, 0].float().cpu())
    return torch.stack(rewards)
