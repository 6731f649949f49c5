"""Composite reward forward vs the n separate RM forwards it replaces, on one batch (CPU).

    .venv/bin/python benchmarks/composite_reward.py [--batch 16] [--length 256] [--repeats 5]

What upstream would run: each RM's own forward on input already in its own tokenizer. What the
Bone Soup actor runs (scoring.raw_scores, as RewardModelActor.forward, then the trainer's combination):
- shared: two OpenRLHF RMs with the policy's tokenizer, both fed the rollout ids (no decode);
- different: one RM with the policy's tokenizer, one GPT-2 RM with its own, fed decoded and
  re-encoded text (the bridging cost is inside the composite's time).
Issue 3's goals: ratio <= 1.05 (shared) and <= 1.15 (different). The RMs are random LLaMA / GPT-2
models a few million parameters big, in fp32 on both sides; the bridging cost does not grow with
model size, so on a GPU with larger RMs the same absolute milliseconds weigh differently (printed).
Medians of interleaved runs in alternating order, measured in one process run; the ratio uses this
process's CPU time (time.process_time) with one torch thread: on a shared, oversubscribed machine
wall time, and the CPU time of several spin-waiting OpenMP threads, swung by +-20% between runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
if importlib.util.find_spec("flash_attn_2_cuda") is None:  # CPU: the test stand-in, so openrlhf.models imports
    sys.path.append(str(ROOT / "tests" / "stand_ins"))

import tiny_models  # noqa: E402  (tokenizers trained offline on a small corpus)
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from openrlhf_bonesoup import objectives, scoring  # noqa: E402
from openrlhf_bonesoup.combiners import Combination  # noqa: E402


def make_rms(root: Path) -> dict[str, Path]:
    llama_tok = tiny_models.make_tokenizer(root / "tok_llama", "llama")
    gpt2_tok = tiny_models.make_tokenizer(root / "tok_gpt2", "gpt2")
    paths = {}
    for name, seed in (("rm_a", 1), ("rm_b", 2)):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(llama_tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4)
        config.update(dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048))
        config.update({k: getattr(llama_tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        LlamaForCausalLM(config).save_pretrained(root / f"{name}_lm")
        llama_tok.save_pretrained(root / f"{name}_lm")
        tiny_models.make_openrlhf_rm(root / name, root / f"{name}_lm", seed=seed)
        paths[name] = root / name
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=len(gpt2_tok), n_embd=256, n_layer=4, n_head=4, n_positions=2048)
    config.update({k: getattr(gpt2_tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    GPT2LMHeadModel(config).save_pretrained(root / "gpt2_lm")
    gpt2_tok.save_pretrained(root / "gpt2_lm")
    tiny_models.make_openrlhf_rm(root / "rm_gpt2", root / "gpt2_lm", seed=3)
    paths["rm_gpt2"] = root / "rm_gpt2"
    paths["policy_tokenizer"] = root / "tok_llama"
    return paths


def rollout_batch(policy, batch: int, length: int):
    """Right-padded policy ids ending in eos, as OpenRLHF's experience maker passes them."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(batch):
        text, ids = "", []
        while len(ids) < length - 1:
            text += tiny_models.CORPUS[rng.integers(len(tiny_models.CORPUS))] + " "
            ids = policy(text, add_special_tokens=False)["input_ids"]
        rows.append(ids[: int(rng.integers(length // 2, length))] + [policy.eos_token_id])
    width = max(map(len, rows))
    input_ids = torch.full((batch, width), policy.pad_token_id)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return input_ids, mask


def separate_inputs(objs, policy, input_ids, mask):
    """Each RM's input in its own tokenizer, prepared before timing (what n separate actors would get)."""
    texts = scoring.policy_texts(policy, input_ids, mask)
    inputs = []
    for o in objs:
        if o.shares_policy_tokenizer:
            inputs.append((input_ids, mask))
            continue
        rows = o.tokenizer([t + " " + o.tokenizer.eos_token for t in texts], add_special_tokens=False)["input_ids"]
        batch = o.tokenizer.pad({"input_ids": [r[:-1] + [o.tokenizer.eos_token_id] for r in rows]}, return_tensors="pt")
        inputs.append((batch["input_ids"], batch["attention_mask"]))
    return inputs


def measure(objs, policy, input_ids, mask, repeats: int) -> dict[str, list[float]]:
    combination = Combination([o.spec for o in objs], [1.0 / len(objs)] * len(objs))
    inputs = separate_inputs(objs, policy, input_ids, mask)

    def composite():  # RewardModelActor.forward's body, then the trainer-side combination
        raw = scoring.raw_scores(objs, policy_ids=(input_ids, mask), policy_tokenizer=policy, pad_sequence=True)
        return combination(raw)[0]

    def separate():  # upstream: one RewardModelActor.forward per RM
        with torch.no_grad():
            return [o.model(ids, m, pad_sequence=True) for o, (ids, m) in zip(objs, inputs, strict=True)]

    def bridging():  # the part of composite() that separate() does not do
        if all(o.shares_policy_tokenizer for o in objs):
            return
        texts = scoring.policy_texts(policy, input_ids, mask)
        for o in objs:
            if not o.shares_policy_tokenizer:
                o.tokenizer([t + " " + o.tokenizer.eos_token for t in texts], add_special_tokens=False)

    cpu = {composite: [], separate: [], bridging: []}
    wall = {composite: [], separate: [], bridging: []}
    for f in cpu:  # warm-up
        f()
    for r in range(repeats):
        # Interleaved, and in alternating order: on a shared machine whichever runs first after the
        # other was measured 10-15% apart, so neither side may always go first.
        for f in (composite, separate, bridging) if r % 2 == 0 else (separate, composite, bridging):
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            f()
            cpu[f].append(time.process_time() - start_cpu)
            wall[f].append(time.perf_counter() - start_wall)
    return {
        name: [statistics.median(t[f]) for f in (composite, separate, bridging)]
        for name, t in (("cpu", cpu), ("wall", wall))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting on busy cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_rms(Path(tmp))
        policy = AutoTokenizer.from_pretrained(str(paths["policy_tokenizer"]))
        input_ids, mask = rollout_batch(policy, args.batch, args.length)
        print(f"batch {args.batch} x up to {input_ids.shape[1]} tokens, torch threads {torch.get_num_threads()}")
        print("ratio = composite / sum of the separate RM forwards; CPU time of this process (wall time in brackets)")
        head = f"{'composite s':>12} {'separate s':>11} {'ratio':>7} {'(wall)':>7} {'goal':>6} {'bridging ms':>12}"
        print(f"{'case':<10} {head}")
        for case, names, goal in (("shared", ("rm_a", "rm_b"), 1.05), ("different", ("rm_a", "rm_gpt2"), 1.15)):
            objs = objectives.load_objectives(
                ",".join(str(paths[n]) for n in names), policy_tokenizer=policy
            )  # each with its own attention: sdpa for these LLaMA / GPT-2 RMs on CPU
            for o in objs:
                o.model.float()
            t = measure(objs, policy, input_ids, mask, args.repeats)
            (composite, separate, bridging), (wall_composite, wall_separate, _) = t["cpu"], t["wall"]
            ratio = composite / separate
            print(
                f"{case:<10} {composite:>12.3f} {separate:>11.3f} {ratio:>7.3f} {wall_composite / wall_separate:>7.3f} "
                f"{'<=' + str(goal):>6} {bridging * 1e3:>12.1f}  {'met' if ratio <= goal else 'MISSED'}"
            )


if __name__ == "__main__":
    main()
