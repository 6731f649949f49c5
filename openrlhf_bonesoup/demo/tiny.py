"""Tiny local models for rehearsing a recipe on CPU: built here, nothing downloaded.

`openrlhf-bonesoup tiny --output DIR` writes what a `--cpu` launch needs (a tiny LLaMA policy, an
OpenRLHF-format reward model, an HF classifier on another tokenizer, a label-reading reward_func file,
prompts and an objectives file) and prints the launch command. The tests build their checkpoints with the
same functions. Two tokenizer families, so that shared-tokenizer objectives differ from ones that need
text bridging: "llama" (byte-level BPE, <s>/</s>/<pad>) and "gpt2" (another vocabulary, <|endoftext|>).
Hidden size 256 with 4 heads gives head size 64, which vLLM's attention kernels take.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
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
        CORPUS * 4,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=sorted(set(special.values())),
        show_progress=False,
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


def make_openrlhf_rm(path: str | Path, lm_path: str | Path, seed: int = 0) -> None:
    """An OpenRLHF-format reward model: OpenRLHF's own loader turns a causal LM into base model +
    `score` head (init_value_head=True, as its RM training does), and we save what it built."""
    from openrlhf_bonesoup.integration.models import load_openrlhf_reward_model

    torch.manual_seed(seed)
    model = load_openrlhf_reward_model(
        str(lm_path), param_dtype="bf16", attn_implementation="eager", init_value_head=True
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


REWARD_FUNC = """# A rule objective reading the dataset label (OpenRLHF reward_func signature): a bonus where the label
# asks for one, and a small reward for length.
import torch


def reward_func(queries, prompts, labels):
    return torch.tensor([len(q) / 100 + (1.0 if label == "bonus" else 0.0) for q, label in zip(queries, labels)])
"""


def make_rehearsal(out: str | Path, prompts: int = 16) -> dict[str, Path]:
    """Everything a `--cpu` rehearsal launch needs, under `out`: {name: path}."""
    out = Path(out).resolve()
    paths = {name: out / name for name in ("policy", "rm", "classifier")}
    llama = make_tokenizer(out / "tokenizer_llama", "llama")
    gpt2 = make_tokenizer(out / "tokenizer_gpt2", "gpt2")
    make_llama_lm(paths["policy"], llama, seed=0, hidden_size=256)
    make_openrlhf_rm(paths["rm"], paths["policy"], seed=2)
    make_hf_classifier(paths["classifier"], gpt2, seed=4, hidden_size=64)
    paths["reward_func"] = out / "reward_bonus.py"
    paths["reward_func"].write_text(REWARD_FUNC)
    paths["objectives"] = out / "objectives.json"
    specs = [
        {"name": "helpful", "path": str(paths["rm"])},
        {"name": "polite", "path": str(paths["classifier"]), "label": 1},
        {"name": "bonus", "path": str(paths["reward_func"])},
    ]
    paths["objectives"].write_text(json.dumps(specs, indent=2) + "\n")
    paths["prompts"] = out / "prompts.jsonl"
    with open(paths["prompts"], "w") as f:
        for i in range(prompts):
            record = {"input": f"Human: {CORPUS[i % 3].split('Assistant:')[0][7:].strip()} Assistant:"}
            record["label"] = "bonus" if i % 2 else "plain"
            f.write(json.dumps(record) + "\n")
    return paths


def rehearsal_argv(paths: dict[str, Path], out: str | Path, backbone_index: int = 0) -> list[str]:
    """A `--cpu` launch of backbone `backbone_index` on make_rehearsal's models: 2 PPO steps, GAE, KL."""
    out = Path(out)
    argv = ["--cpu", "--actor.model_name_or_path", str(paths["policy"]), "--objectives", str(paths["objectives"])]
    argv += ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", str(backbone_index)]
    argv += ["--soup_dir", str(out / "soup"), "--ckpt.output_dir", str(out / f"backbone{backbone_index}")]
    argv += ["--data.prompt_dataset", str(paths["prompts"]), "--data.input_key", "input", "--data.label_key", "label"]
    argv += ["--data.max_samples", "8", "--data.max_len", "128", "--rollout.max_new_tokens", "16"]
    argv += ["--rollout.batch_size", "4", "--rollout.micro_batch_size", "2"]
    argv += ["--train.batch_size", "4", "--train.micro_batch_size", "2", "--train.max_epochs", "1"]
    argv += ["--algo.advantage.estimator", "gae", "--algo.kl.init_coef", "0.01", "--ds.zero_stage", "2"]
    argv += ["--vllm.num_engines", "1", "--vllm.enforce_eager"]
    return argv


def rehearsal_command(paths: dict[str, Path], out: str | Path) -> str:
    """The shell loop that trains all three backbones with `--cpu`; the last merges three preferences."""
    argv = rehearsal_argv(paths, out, 0)
    argv[argv.index("--backbone_index") + 1] = "$j"
    argv[argv.index("--ckpt.output_dir") + 1] = str(Path(out) / "backbone") + "$j"
    words = [shlex.quote(a) if "$j" not in a else f'"{a}"' for a in argv]
    launch = " ".join([shlex.quote(sys.executable), "-m", "openrlhf_bonesoup.cli.train_ppo_ray", *words])
    return f'for j in 0 1 2; do\n    {launch} --merge_preferences "1,0,0;0.2,0.5,0.3;0,0,1" || break\ndone'
