"""RewardModelActor for a composite reward: OpenRLHF 0.11.2's RewardModelActor holding all n objectives.

Mirrors upstream (openrlhf/trainer/ray/launcher.py, class RewardModelActor) line for line where it can:
the same Ray resources, the same DeepSpeed set-up and `strategy.prepare` per model, the same loader
arguments, the same `forward` signature. What differs:
- `load_objectives` loads n objectives (the launcher's `args.bonesoup` config) instead of one model,
  plus the policy tokenizer for tokenizer bridging. It is everything but DeepSpeed's set-up, so it
  runs on CPU in a plain Ray actor (the tests do that); `init_model_from_pretrained` is upstream's.
- `forward` returns the combined reward sum_i w_i r_i per sample, as upstream returns its one RM's
  reward. Once the worker hook's make_experience patch has called `objective_columns` (every
  launch), it returns [combined, r_1..r_n]; that patch splits them into the reward and
  per-objective metrics. Never asked, it stays upstream-shaped.
"""

from __future__ import annotations

from typing import Optional

import ray
import torch
from openrlhf.trainer.ray.launcher import BaseModelActor
from openrlhf.utils import get_tokenizer
from openrlhf.utils.deepspeed import DeepspeedStrategy

from openrlhf_bonesoup import objectives
from openrlhf_bonesoup.coefficients import BoneSoupError


@ray.remote(num_gpus=1)
class RewardModelActor(BaseModelActor):
    def init_model_from_pretrained(self, strategy: DeepspeedStrategy, pretrain):
        self._setup_distributed(strategy)
        self.load_objectives(strategy, pretrain)
        for objective in self.objectives:
            strategy.print(objective.model)
            if strategy.args.reward.offload:
                objective.model._offload = True

            objective.model = self.strategy.prepare(objective.model)
            objective.model.eval()
            objective.device = torch.cuda.current_device()

    def load_objectives(self, strategy: DeepspeedStrategy, pretrain) -> None:
        """Load the objectives with upstream's loader arguments (no DeepSpeed: runs on CPU too)."""
        self.strategy = strategy
        args = strategy.args
        config = getattr(args, "bonesoup", None)
        if config is None:
            raise BoneSoupError("args.bonesoup is missing: launch with python -m openrlhf_bonesoup.cli.train_ppo_ray")
        self.tokenizer = get_tokenizer(
            args.actor.model_name_or_path, None, "left", strategy, use_fast=not args.data.disable_fast_tokenizer
        )
        self.objectives = objectives.load_objectives(
            config["objectives"],
            policy_tokenizer=self.tokenizer,
            model_kwargs=dict(
                normalize_reward=args.reward.normalize_enable,
                attn_implementation=args.ds.attn_implementation,
                experts_implementation=args.ds.experts_implementation,
                param_dtype=args.ds.param_dtype,  # default: bf16
                load_in_4bit=args.ds.load_in_4bit,
                ds_config=strategy.get_ds_eval_config(offload=args.reward.offload),
                value_head_prefix=args.ds.value_head_prefix,
                packing_samples=args.ds.packing_samples,
            ),
        )
        remote = [o.name for o in self.objectives if o.kind != "model"]
        if remote:
            raise BoneSoupError(f"objectives {remote} are not models: the launcher scores them via --reward.remote_url")
        self.weights = torch.tensor(config["weights"], dtype=torch.float32)
        self.columns = False
        strategy.print(
            f"Bone Soup reward: weights {config['weights']} over objectives {[o.name for o in self.objectives]}"
        )
        strategy.print(f"reward normalization status: {args.reward.normalize_enable}")

    def objective_columns(self) -> list[str]:
        """From now on forward returns [combined, r_1..r_n]; the names of r_1..r_n."""
        self.columns = True
        return [o.name for o in self.objectives]

    def forward(
        self,
        sequences: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,  # noqa: UP045 (upstream's line, kept for diffing)
        packed_seq_lens=None,
        pad_sequence=False,
    ) -> torch.Tensor:
        # Upstream: torch.cuda.current_device(). The CPU fallback lets tests run this actor without a GPU.
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        with torch.no_grad():
            raw = objectives.raw_scores(
                self.objectives,
                policy_ids=(sequences.to(device), attention_mask.to(device)),
                policy_tokenizer=self.tokenizer,
                ring_attn_group=self.strategy.ring_attn_group,
                pad_sequence=True,
                packed_seq_lens=packed_seq_lens,
            )
        values = torch.from_numpy(objectives.normalize(self.objectives, raw)).float()
        reward = values @ self.weights
        if self.columns:
            return torch.cat([reward[:, None], values], dim=1)
        return reward.to("cpu")
