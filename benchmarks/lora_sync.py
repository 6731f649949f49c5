"""Peak extra memory of a LoRA policy's weight sync to vLLM: every merged layer at once vs one at a time.

    .venv/bin/python benchmarks/lora_sync.py [--layers 16] [--hidden 512]

A LLaMA policy (bf16, `--layers` layers) with a rank-8 LoRA on its 7 linear modules per layer, synced
through integration/lora_sync.py's patch of `ActorPPOTrainer.broadcast_to_vllm` around a loop shaped as
upstream's (openrlhf/trainer/ray/ppo_actor.py:476-487: list every parameter, then per parameter
`deepspeed.zero.GatheredParameters([param])` and read its data to send it; here the "send" sums it).
`before`: what the plugin did until 2026-12-07, every adapted layer's merged weight built when the
parameters are listed and held through the loop; `after`: the patch as it is, each merged weight built
inside its own gather and freed after its send. Peak extra memory = the process's peak resident size
during the sync (sampled every millisecond) minus its size before; each variant runs in its own process.
One process, world size 1, ZeRO off: what a rank that sends holds; ranks that do not send build nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import psutil  # Ray's dependency


def sync(variant: str, layers: int, hidden: int) -> dict:
    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from openrlhf_bonesoup.integration import lora_sync

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
    )
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), LoraConfig(r=8, target_modules=modules))
    for name, param in model.named_parameters():  # a trained adapter: B no longer zero
        if "lora_B" in name:
            param.data.normal_(std=0.01)

    def upstream_loop(self):  # ppo_actor.py:476-487's shape
        params = list(self.actor.model.module.named_parameters())
        total = 0.0
        for _, param in params:
            with deepspeed.zero.GatheredParameters([param], enabled=False):
                total += float(param.data.float().sum())
        return total

    trainer = type("ActorPPOTrainer", (), {"broadcast_to_vllm": upstream_loop})
    lora_sync.patch(SimpleNamespace(ActorPPOTrainer=trainer))
    me = trainer()
    me.actor = SimpleNamespace(model=SimpleNamespace(module=model))
    me.strategy = SimpleNamespace(args=SimpleNamespace(ds=SimpleNamespace(zero_stage=0)))
    me.use_cuda_ipc = False
    if variant == "before":  # every merged weight built when listed, held through the loop (the old vllm_weights)

        def run():
            eager = []
            for name, weight in lora_sync.vllm_weights(model, zero3=False):
                if isinstance(weight, lora_sync.MergedWeight):
                    with weight.gathered():
                        weight = weight.data.clone()
                eager.append((name, weight))
            model.named_parameters = lambda *a, **k: iter(eager)  # what the old patch handed upstream's loop
            return upstream_loop(me)
    else:
        run = me.broadcast_to_vllm
    listed = lora_sync.vllm_weights(model, zero3=False, build=False)
    adapted = [w for _, w in listed if isinstance(w, lora_sync.MergedWeight)]
    sizes = [w.shape.numel() * w.dtype.itemsize for w in adapted]

    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    start = process.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    total = run()
    done.set()
    sampler.join()
    return {
        "variant": variant,
        "peak_extra_mb": (peak[0] - start) / 2**20,
        "checksum": total,
        "adapted_layers": len(adapted),
        "all_merged_mb": sum(sizes) / 2**20,
        "largest_mb": max(sizes) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--variant", choices=["before", "after"], help=argparse.SUPPRESS)  # one child's run
    args = parser.parse_args()
    if args.variant:
        import torch.distributed as dist

        with tempfile.TemporaryDirectory() as folder:  # rank 0 of a world of 1, as the sending policy rank
            dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
            print(json.dumps(sync(args.variant, args.layers, args.hidden)))
        return
    results = {}
    for variant in ("before", "after"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--layers",
            str(args.layers),
            "--hidden",
            str(args.hidden),
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = results["before"], results["after"]
    assert before["checksum"] == after["checksum"], "both variants must send the same weights"
    print(
        f"{before['adapted_layers']} adapted layers ({args.layers} layers x 7 modules), bf16: all merged "
        f"{before['all_merged_mb']:.1f} MB, the largest {before['largest_mb']:.1f} MB"
    )
    for variant in ("before", "after"):
        print(f"{variant:>6}: peak extra resident memory during the sync {results[variant]['peak_extra_mb']:.1f} MB")
    print(f"ratio after/before: {after['peak_extra_mb'] / before['peak_extra_mb']:.3f}")


if __name__ == "__main__":
    main()
