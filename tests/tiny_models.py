"""Tiny random checkpoints and tokenizers built locally: no model hub, nothing downloaded.

The policy, reward model, classifier and tokenizer builders are the package's own (openrlhf_bonesoup/demo/tiny.py,
which `openrlhf-bonesoup tiny` uses for a CPU rehearsal); the test-only ones are here. The GPU tests build
them with hidden size 256 (see tests/conftest.py, `tiny_gpu`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from openrlhf_bonesoup.demo.tiny import make_hf_classifier, make_llama_lm, make_openrlhf_rm, make_tokenizer

__all__ = ["make_gpt2_lm", "make_hf_classifier", "make_llama_lm", "make_lora_adapter", "make_openrlhf_rm"]
__all__ += ["make_deberta_classifier", "make_tokenizer"]


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


def make_deberta_classifier(path: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0, num_labels: int = 2):
    """A DeBERTa-v2 sequence classifier (the architecture of common reward and safety classifiers), which
    supports neither flash attention nor sdpa, with its own tokenizer."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = DebertaV2ForSequenceClassification(config)
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
