"""Tiny random checkpoints and tokenizers built locally: no model hub, nothing downloaded.

Two tokenizer families, so that tests can tell shared-tokenizer objectives from ones that need
text bridging: "llama" (byte-level BPE, <s>/</s>/<pad>) and "gpt2" (another vocabulary and
special tokens, <|endoftext|>). Models are LLaMA or GPT-2 configs a few thousand parameters big;
the GPU tests build them with hidden size 256 (see tests/conftest.py, `tiny_gpu`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "Human: How do I bake bread? Assistant: Mix flour, water, yeast and salt, then knead and bake.",
    "Human: Tell me a joke. Assistant: Why did the chicken cross the road? To get to the other side!",
    "Human: How can I stay safe online? Assistant: Use strong passwords and keep software updated.",
    "Summarize: The quick brown fox jumps over the lazy dog. TL;DR: a fox jumps over a dog.",
    "The weather today is sunny with a light breeze; tomorrow may bring rain and colder air.",
    "Please be helpful, harmless and honest. I cannot help with that request, sorry.",
    "0123456789 !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~` abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]

FAMILIES = {
    # vocab size, special tokens (bos, eos, pad), chat template marker
    "llama": (320, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}),
    "gpt2": (360, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}),
}


def make_tokenizer(path: str | Path, family: str = "llama") -> PreTrainedTokenizerFast:
    vocab_size, special = FAMILIES[family]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=sorted(set(special.values()))
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **special)
    tok.padding_side = "left" if family == "llama" else "right"
    tok.save_pretrained(str(path))
    return tok


def make_llama_lm(
    path: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0, dtype=torch.float32, hidden_size: int = 32
):
    """A 2-layer LLaMA causal LM (the policy / SFT model), 4 heads, saved as safetensors with its tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model


def make_gpt2_lm(path: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """A 2-layer GPT-2 causal LM (tied embeddings), saved with its tokenizer."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model


def make_openrlhf_rm(path: str | Path, lm_path: str | Path, seed: int = 0) -> None:
    """An OpenRLHF-format reward model: OpenRLHF's own loader turns a causal LM into base model +
    `score` head (init_value_head=True, as its RM training does), and we save what it built."""
    from openrlhf.models import get_llm_for_sequence_regression

    torch.manual_seed(seed)
    model = get_llm_for_sequence_regression(
        str(lm_path), "reward", param_dtype="bf16", attn_implementation="eager", init_value_head=True
    )
    model.save_pretrained(str(path))
    # OpenRLHF reads value_head_prefix from config.json when present.
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config["value_head_prefix"] = "score"
    config_path.write_text(json.dumps(config, indent=2))
    PreTrainedTokenizerFast.from_pretrained(str(lm_path)).save_pretrained(str(path))


def make_hf_classifier(
    path: str | Path, tokenizer: PreTrainedTokenizerFast, num_labels: int = 2, seed: int = 0, hidden_size: int = 32
):
    """A plain HF AutoModelForSequenceClassification (GPT-2, 4 heads) with its own tokenizer."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden_size,
        n_layer=2,
        n_head=4,
        n_positions=256,
        num_labels=num_labels,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2ForSequenceClassification(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model


def make_lora_adapter(
    path: str | Path, base_path: str | Path, *, r: int, lora_alpha: int, use_rslora: bool = False, seed: int = 0
) -> None:
    """A PEFT LoRA adapter (all linear layers) on the causal LM at base_path, saved as PEFT does.

    PEFT initialises B to zero (a no-op adapter); a merge test needs a real delta, so A and B are random.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_path))
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules="all-linear"
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(str(path))
