"""The weight sync of a LoRA policy to vLLM (`--ds.lora.rank`), which OpenRLHF 0.11.2 cannot do alone.

Upstream's `ActorPPOTrainer.broadcast_to_vllm` (trainer/ray/ppo_actor.py) sends the PEFT model's own
parameters (`base_model.model...base_layer.weight`, `lora_A`, `lora_B`, fp32 under ZeRO 3), which vLLM
cannot load. `patch` (applied by the Ray worker hook, worker.setup, in the policy actors) has upstream's
loop send what vLLM loads instead: each adapted layer's weight with the adapter merged in (PEFT's
`get_delta_weight`), under the HF name, built inside upstream's per-parameter gather: one merged layer at a
time, on the ranks that send it. Nothing heavy is imported before a LoRA policy syncs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the hook itself imports nothing heavy
    import torch
    from peft import PeftModel


def patch(module: ModuleType) -> None:
    """`ActorPPOTrainer.broadcast_to_vllm` of OpenRLHF's trainer/ray/ppo_actor.py sending what vLLM loads."""
    cls = module.ActorPPOTrainer
    if getattr(cls.broadcast_to_vllm, "bonesoup", False):
        return
    upstream = cls.broadcast_to_vllm

    def broadcast_to_vllm(self):
        model = self.actor.model.module  # what upstream's loop reads (ppo_actor.py:418, 477)
        if not hasattr(model, "peft_config"):
            return upstream(self)
        import deepspeed
        import torch

        # The ranks that read a weight's data: rank 0 broadcasts it; with CUDA IPC every rank shares its own.
        build = self.use_cuda_ipc or torch.distributed.get_rank() == 0
        weights = vllm_weights(model, self.strategy.args.ds.zero_stage == 3, build)
        # For this call only: the model lists what vLLM loads (an instance attribute shadowing the method), and
        # upstream's per-parameter gather (`deepspeed.zero.GatheredParameters([param])`, ppo_actor.py:467)
        # builds a MergedWeight's data for the duration of its send.
        gather = deepspeed.zero.GatheredParameters
        model.named_parameters = lambda *args, **kwargs: iter(weights)
        deepspeed.zero.GatheredParameters = lambda params, *args, **kwargs: (
            params[0].gathered()
            if isinstance(params, list) and params and isinstance(params[0], MergedWeight)
            else gather(params, *args, **kwargs)
        )
        try:
            return upstream(self)
        finally:
            del model.named_parameters
            deepspeed.zero.GatheredParameters = gather

    broadcast_to_vllm.bonesoup = True
    cls.broadcast_to_vllm = broadcast_to_vllm


class MergedWeight:
    """An adapted layer's weight as vLLM loads it, W + s B A in fp32 rounded once to W's dtype, built only
    inside `gathered()`: upstream's loop sends one parameter at a time, so one layer's merged weight exists
    at a time (not one per adapted layer: ~14 GB bf16 for an 8B model with LoRA on every linear layer).
    Under ZeRO 3 every rank enters `gathered()` (the layer's gather is a collective); only ranks that
    read the data build it. `shape`, `ds_shape` and `dtype` are what upstream reads before the data."""

    requires_grad = False

    def __init__(self, layer, adapter: str, zero3: bool, build: bool) -> None:
        weight = layer.get_base_layer().weight
        self.shape = self.ds_shape = weight.ds_shape if zero3 else weight.shape
        self.dtype = weight.dtype
        self.data = None
        self._layer, self._adapter, self._zero3, self._build = layer, adapter, zero3, build

    @contextlib.contextmanager
    def gathered(self) -> Iterator[MergedWeight]:
        import deepspeed
        import torch

        params = list(self._layer.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self._zero3), torch.no_grad():
            if self._build:
                weight = self._layer.get_base_layer().weight
                delta = self._layer.get_delta_weight(self._adapter)
                self.data = (weight.data.float() + delta.float()).to(weight.dtype)
            try:
                yield self
            finally:
                self.data = None


def vllm_weights(model: PeftModel, zero3: bool, build: bool = True) -> list[tuple[str, torch.Tensor | MergedWeight]]:
    """A PEFT LoRA model's weights as vLLM loads them: [(HF name, weight)], none of LoRA's own. An adapted
    layer's weight is a MergedWeight (its data built in `gathered()`); the others are the model's own
    parameters, which upstream's loop gathers under ZeRO 3 as it sends them."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {
        f"{name}.base_layer.weight": MergedWeight(layer, model.active_adapter, zero3, build)
        for name, layer in base.named_modules()
        if isinstance(layer, LoraLayer)
    }
    return [
        (name.replace(".base_layer.", "."), merged.get(name, param))
        for name, param in base.named_parameters()
        if ".lora_" not in name
    ]
