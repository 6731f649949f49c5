"""Faithfulness reward for the Reddit Summary setting: OpenRLHF's `reward_func(queries, prompts, labels)`.

CogComp/bart-faithful-summary-detector is a BART sequence classifier over the pair (summary, post) with
labels 0 "Hallucinated" and 1 "Faithful"; the reward is the logit of label 1, as in the reference code.
The post and the summary are read back from the prompt format of examples/scripts/prepare_prompts.py.
Download the model beforehand (`hf download CogComp/bart-faithful-summary-detector`) or
set FAITHFUL_MODEL to a local folder.
"""

import os

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

MODEL = os.environ.get("FAITHFUL_MODEL", "CogComp/bart-faithful-summary-detector")
FAITHFUL = 1  # label index of "Faithful"
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
            max_len = min(tokenizer.model_max_length, 1024)
            inputs = tokenizer(text=summary, text_pair=post, truncation=True, max_length=max_len, return_tensors="pt")
            rewards.append(model(**inputs.to(model.device)).logits[0, FAITHFUL].float().cpu())
    return torch.stack(rewards)
