"""The Ray `worker_process_setup_hook` of a Bone Soup launch: two small patches, in the workers that need them.

Ray runs `setup()` in every worker process of the job, on every node, before any actor code. It
imports nothing heavy: OpenRLHF keeps deepspeed out of its vLLM processes on purpose
(openrlhf/trainer/ray/__init__.py), so each patch is applied only when OpenRLHF itself imports the
module it patches (a one-shot import finder, imports.py), in exactly the processes that use it:

- `RemoteExperienceMaker.make_experience` (the PPO trainer process): the one place where the reward
  is combined. Reward-actor route: the reward group's forward also gets each micro-batch's prompts
  and labels (upstream's own dispatch, colocation syncs and empty_cache unchanged) and returns raw
  per-objective values. reward_func route: the raw values arrive in `info["reward_raw/<name>"]`.
  Either way one Combination (combiners.py) per trainer process normalises all samples of the step
  and sets `rewards`, `info["reward"]` and `info["reward/<name>"]`, which the policy actor logs.
- `BasePPOTrainer` (the PPO trainer process): the Combination's running statistics go into OpenRLHF's
  checkpoint (the client state the policy actor saves with DeepSpeed) and come back on
  `--ckpt.load_enable`, so a resumed run normalises as the uninterrupted one would.
- `SingleTurnAgentExecutor.execute` (the vLLM rollout processes): upstream catches and only logs
  every exception of a remote reward / `reward_func`, leaving the reward None. The patch turns a
  missing reward into an error, so a failing endpoint stops training instead of vanishing.
- `_load_agent_executor` (the vLLM rollout processes), agents only (`--train.agent_func_path`): the agent runs
  its episodes as upstream runs them; its executor's `execute` is wrapped so that the objectives (reward_func
  files, endpoints: our reward_func file) score each final trajectory, as they score a single-turn rollout.
  h_j replaces the agent's own reward, which is kept in the log as `agent_reward`.
- `ActorPPOTrainer.broadcast_to_vllm` (the policy actors), LoRA only (`--ds.lora.rank`): the weight sync
  sends vLLM each adapted layer's weight with the adapter merged in (lora_sync.py).
"""

from __future__ import annotations

import json
import os
from types import ModuleType

from openrlhf_bonesoup.integration import lora_sync
from openrlhf_bonesoup.integration.imports import on_import

CONFIG_ENV = "OPENRLHF_BONESOUP_CONFIG"  # JSON set by the launcher in the Ray runtime_env
SETUP_HOOK = "openrlhf_bonesoup.integration.worker.setup"
ROUTE_ACTORS = "reward_actors"  # every objective scored in our RewardModelActor group
ROUTE_REWARD_FUNC = "reward_func"  # no model: HTTP/function objectives via --reward.remote_url reward_func.py
STATE_KEY = "bonesoup_running_statistics"  # our entry in OpenRLHF's checkpoint client_states


def setup() -> None:
    """The worker_process_setup_hook."""
    from openrlhf_bonesoup.integration import cpu

    if cpu.active():  # a --cpu launch: the CUDA-site replacements, in every worker
        cpu.apply()
    on_import("openrlhf.trainer.ray.ppo_actor", lora_sync.patch)  # OpenRLHF alone cannot sync a LoRA policy
    if CONFIG_ENV not in os.environ:  # `--cpu` without a combiner: OpenRLHF's own launch, rehearsed
        return
    on_import("openrlhf.trainer.ppo_utils.experience_maker", _patch_experience_maker)
    on_import("openrlhf.trainer.ppo_trainer", _patch_trainer)
    on_import("openrlhf.utils.agent", _patch_agent)
    on_import("openrlhf.trainer.ray.vllm_engine", _patch_agent_loader)


def config() -> dict:
    """The launch's config: {"objectives": [specs], "weights": [...], "route": ..., ...} (launcher.plan)."""
    if CONFIG_ENV not in os.environ:
        raise RuntimeError(
            f"{CONFIG_ENV} is not set: start training with `python -m openrlhf_bonesoup.cli.train_ppo_ray`, "
            "which puts the objectives and combiner into the Ray runtime_env"
        )
    return json.loads(os.environ[CONFIG_ENV])


def _patch_experience_maker(module: ModuleType) -> None:
    cls = module.RemoteExperienceMaker
    if getattr(cls.make_experience, "bonesoup", False):
        return
    upstream = cls.make_experience

    def make_experience(self, samples_list):
        config = getattr(self.args, "bonesoup", None)
        if config is None:  # not a Bone Soup launch: upstream's behaviour
            return upstream(self, samples_list)
        import torch

        from openrlhf_bonesoup.combiners import Combination

        if not hasattr(self, "bonesoup_combination"):
            self.bonesoup_combination = Combination(config["objectives"], config["weights"])
        names = self.bonesoup_combination.names
        if config["route"] == ROUTE_ACTORS:
            samples_list = _with_prompts_and_labels(self, upstream, samples_list)
            raw = [s.rewards.reshape(len(s.sequences), len(names)) for s in samples_list]
        else:
            samples_list = upstream(self, samples_list)
            raw = [torch.stack([s.info[f"reward_raw/{n}"] for n in names], dim=1) for s in samples_list]
        reward, values = self.bonesoup_combination(torch.cat(raw).double().numpy())
        start = 0
        for samples, raw_s in zip(samples_list, raw, strict=True):
            end = start + len(raw_s)
            samples.rewards = torch.from_numpy(reward[start:end]).float()
            samples.info["reward"] = samples.rewards
            # Copies with stride 1: a column of a (1, n) array has stride n yet counts as contiguous (one
            # element), so .float() and .contiguous() keep that stride, and Ray's zero-copy pickling of
            # tensors, which OpenRLHF turns on, fails on it ("self.stride(-1) must be 1").
            row = {"memory_format": torch.contiguous_format}
            for i, name in enumerate(names):
                samples.info[f"reward/{name}"] = torch.from_numpy(values[start:end, i]).float().clone(**row)
                samples.info[f"reward_raw/{name}"] = raw_s[:, i].float().clone(**row)
            start = end
        return samples_list

    make_experience.bonesoup = True
    cls.make_experience = make_experience


def _with_prompts_and_labels(maker, upstream, samples_list):
    """Upstream's make_experience, its reward-group dispatch given each micro-batch's prompts and labels."""
    dispatch = maker._dispatch_forward
    extra = {"prompts": [s.prompts for s in samples_list], "labels": [s.labels for s in samples_list]}

    def with_texts(group, sync_condition, **kwargs):
        if group is maker.reward_model_group:
            kwargs.update(extra)
        return dispatch(group, sync_condition, **kwargs)

    maker._dispatch_forward = with_texts  # an instance attribute, removed below: the class is untouched
    try:
        return upstream(maker, samples_list)
    finally:
        del maker._dispatch_forward


def _patch_trainer(module: ModuleType) -> None:
    cls = module.BasePPOTrainer
    if getattr(cls.save_logs_and_checkpoints, "bonesoup", False):
        return
    upstream_save, upstream_states = cls.save_logs_and_checkpoints, cls.init_checkpoint_states

    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        # Into the dict upstream saves with the policy's DeepSpeed checkpoint (and, being the same dict, into
        # a best-metric checkpoint of the same step).
        combination = getattr(self.experience_maker, "bonesoup_combination", None)
        if combination is not None:
            client_states = {} if client_states is None else client_states
            client_states[STATE_KEY] = combination.state()
        return upstream_save(self, global_step, logs_dict, client_states)

    def init_checkpoint_states(self):
        states = upstream_states(self)
        config = getattr(self.args, "bonesoup", None)
        if config is not None and STATE_KEY in states:
            from openrlhf_bonesoup.combiners import Combination

            combination = Combination(config["objectives"], config["weights"])
            combination.load_state(states[STATE_KEY])
            self.experience_maker.bonesoup_combination = combination
        elif (
            config is not None
            and states.get("global_step")
            and any(o["normalize"] == "running" for o in config["objectives"])
        ):
            print("[bonesoup] the checkpoint holds no running statistics (saved by an older plugin): they start empty")
        return states

    save_logs_and_checkpoints.bonesoup = True
    cls.save_logs_and_checkpoints = save_logs_and_checkpoints
    cls.init_checkpoint_states = init_checkpoint_states


def _patch_agent(module: ModuleType) -> None:
    cls = module.SingleTurnAgentExecutor
    if getattr(cls.execute, "bonesoup", False):
        return
    upstream = cls.execute

    async def execute(self, *args, **kwargs):
        output = await upstream(self, *args, **kwargs)
        if self.reward_endpoints and output.get("reward") is None:
            raise RuntimeError(
                f"no reward from {self.reward_endpoints} for a rollout: the remote reward failed and OpenRLHF only "
                "logged it (see the '[SingleTurnExecutor] Failed to fetch reward' line above for the cause)"
            )
        return output

    execute.bonesoup = True
    cls.execute = execute


def _patch_agent_loader(module: ModuleType) -> None:
    upstream = module._load_agent_executor
    if getattr(upstream, "bonesoup", False):
        return

    def load_agent_executor(agent_func_path: str):
        executor = upstream(agent_func_path)
        if CONFIG_ENV in os.environ:  # a Bone Soup launch (the launcher refuses agents with model objectives)
            executor.execute = _scored_by_objectives(executor.execute)  # this instance only: any executor class
        return executor

    load_agent_executor.bonesoup = True
    module._load_agent_executor = load_agent_executor


def _scored_by_objectives(execute):
    """An agent executor's `execute` whose reward is h_j of the episode's final trajectory (prompt, actions and
    environment feedback, decoded with special tokens as OpenRLHF decodes a single-turn query)."""
    import asyncio

    async def scored(*, prompt, label, hf_tokenizer, **kwargs):
        from openrlhf_bonesoup.integration import reward_func

        output = await execute(prompt=prompt, label=label, hf_tokenizer=hf_tokenizer, **kwargs)
        query = hf_tokenizer.decode(output["observation_tokens"], skip_special_tokens=False)
        result = await asyncio.to_thread(reward_func.reward_func, [query], [prompt], [label])
        h = result["rewards"][0].item()
        logs = {**(output.get("extra_logs") or {}), **result["extra_logs"]}
        if output.get("reward") is not None:
            logs["agent_reward"] = float(output["reward"])
        return {**output, "reward": h, "scores": h, "extra_logs": logs}

    return scored
