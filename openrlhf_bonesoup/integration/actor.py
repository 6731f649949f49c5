"""RewardModelActor for a composite reward: OpenRLHF 0.11.2's RewardModelActor scoring all n objectives.

Mirrors upstream (openrlhf/trainer/ray/launcher.py, class RewardModelActor) line for line where it can:
the same Ray resources, the same DeepSpeed set-up and `strategy.prepare` per model, the same loader
arguments, the same `forward` signature plus the batch's `prompts` and `labels`. What differs:
- `load_objectives` loads the n objectives of the launcher's `args.bonesoup` config instead of one
  model, plus the policy tokenizer for tokenizer bridging: models on this actor's GPU, reward_func
  files imported here, endpoints called from here. It is everything but DeepSpeed's set-up, so it
  runs on CPU in a plain Ray actor (the tests do that); `init_model_from_pretrained` is upstream's.
- `forward` returns the raw per-objective values (B, n), not a reward: the trainer-side patch of
  make_experience (worker.py) hands it the prompts and labels and combines once per step.
- Each model loads with its own attention (objectives.attention), not `--ds.attn_implementation`.
- Under ring attention or DeepSpeed tensor parallelism upstream hands every rank of a group the same
  micro-batch (`RayActorGroup.async_run_method_batch`, `duplicate_actors`) and keeps the first rank's
  result (experience_maker.py `_flatten_results`): models run on every rank (their forward is
  collective), endpoints and reward_func files only on the group's first rank, which sends their values
  to the others (`join_duplicates`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import ray
import torch
import torch.distributed as dist
from openrlhf.trainer.ray.launcher import BaseModelActor
from openrlhf.utils import get_tokenizer
from openrlhf.utils.deepspeed import DeepspeedStrategy

from openrlhf_bonesoup import objectives, scoring
from openrlhf_bonesoup.errors import BoneSoupError


@ray.remote(num_gpus=1)
class RewardModelActor(BaseModelActor):
    duplicates = None  # (process group, its first rank) of the ranks that get the same micro-batches

    def init_model_from_pretrained(self, strategy: DeepspeedStrategy, pretrain):
        self._setup_distributed(strategy)
        self.load_objectives(strategy, pretrain)
        self.join_duplicates()
        for objective in self.objectives:
            if objective.kind != "model":
                continue
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
            gpu=torch.cuda.is_available(),  # the models run where DeepSpeed places them
            ring_attention=args.ds.ring_attn_size > 1,
            model_kwargs=dict(
                normalize_reward=args.reward.normalize_enable,
                experts_implementation=args.ds.experts_implementation,
                param_dtype=args.ds.param_dtype,  # default: bf16
                load_in_4bit=args.ds.load_in_4bit,
                ds_config=strategy.get_ds_eval_config(offload=args.reward.offload),
                value_head_prefix=args.ds.value_head_prefix,
                packing_samples=args.ds.packing_samples,
            ),
        )
        self.needs_queries = any(o.kind != "model" for o in self.objectives)
        strategy.print(f"Bone Soup reward: objectives {[o.name for o in self.objectives]} scored here")
        strategy.print(f"reward normalization status: {args.reward.normalize_enable}")

    def join_duplicates(self) -> None:
        """After torch.distributed's set-up: the group of ranks that upstream gives the same micro-batches,
        `ring_attn_size * tensor_parallel_size` consecutive ranks (the order of async_run_method_batch)."""
        args = self.strategy.args
        size = args.ds.ring_attn_size * args.ds.tensor_parallel_size
        if size == 1:
            return
        rank = dist.get_rank()
        for first in range(0, dist.get_world_size(), size):  # every rank creates every group, in one order
            group = dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                self.duplicates = (group, first)

    def forward(
        self,
        sequences: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,  # noqa: UP045 (upstream's line, kept for diffing)
        packed_seq_lens=None,
        pad_sequence=False,
        prompts=None,
        labels=None,
    ) -> torch.Tensor:
        if prompts is None:
            raise BoneSoupError(
                "the reward actor got no prompts: the Bone Soup worker hook is not active in the trainer process "
                "(start training with python -m openrlhf_bonesoup.cli.train_ppo_ray)"
            )
        # Upstream: torch.cuda.current_device(). The CPU fallback lets tests run this actor without a GPU.
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        sequences, attention_mask = sequences.to(device), attention_mask.to(device)
        # A duplicate rank scores only the models (a collective forward); the group's first rank also calls
        # the endpoints and reward_func files, once per micro-batch, and sends their values (_share).
        first = self.duplicates is None or dist.get_rank() == self.duplicates[1]
        scored = self.objectives if first else [o for o in self.objectives if o.kind == "model"]
        queries = None
        if self.needs_queries and first:  # endpoints and reward_func files read OpenRLHF's query: special tokens kept
            queries = scoring.policy_texts(self.tokenizer, sequences, attention_mask, keep_special=True)
        if not scored:
            return self._share(np.empty((len(sequences), 0)), first)
        with torch.no_grad():
            raw = scoring.raw_scores(
                scored,
                policy_ids=(sequences, attention_mask),
                policy_tokenizer=self.tokenizer,
                queries=queries,
                prompts=prompts,
                labels=labels,
                ring_attn_group=self.strategy.ring_attn_group,
                pad_sequence=True,
                packed_seq_lens=packed_seq_lens,
            )
        return self._share(raw, first)

    def _share(self, raw: np.ndarray, first: bool) -> torch.Tensor:
        """(B, n) raw values on every rank of a duplicate group: the first rank's endpoint and function columns."""
        rest = [i for i, o in enumerate(self.objectives) if o.kind != "model"]
        if self.duplicates is not None and rest:
            group, src = self.duplicates
            box = [raw[:, rest] if first else None]
            dist.broadcast_object_list(box, src=src, group=group)
            if not first:
                models = [i for i, o in enumerate(self.objectives) if o.kind == "model"]
                full = np.empty((raw.shape[0], len(self.objectives)))
                full[:, models], full[:, rest] = raw, box[0]
                raw = full
        return torch.from_numpy(raw).float()
