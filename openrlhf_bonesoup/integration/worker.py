"""The Ray `worker_process_setup_hook` of a Bone Soup launch: two small patches, in the workers that need them.

Ray runs `setup()` in every worker process of the job, on every node, before any actor code. It
imports nothing heavy: OpenRLHF keeps deepspeed out of its vLLM processes on purpose
(openrlhf/trainer/ray/__init__.py), so each patch is applied only when OpenRLHF itself imports the
module it patches (a one-shot import finder), in exactly the processes that use it:

- `RemoteExperienceMaker.make_experience` (the PPOTrainer process): once, it asks the reward group
  for per-objective columns (only our RewardModelActor has `objective_columns`; upstream's raises
  AttributeError and nothing changes). Our actor then returns [combined, r_1..r_n] per sample; the
  patch keeps the combined reward as `rewards`/`info["reward"]` (what upstream set) and puts each
  objective into `info["reward/<name>"]`. Every tensor in `experience.info` is logged by the policy
  actor's training step (wandb / tensorboard). Without the patch the actor is never asked, returns
  the combined reward alone, and training is unchanged: only the per-objective metrics are missing.
- `SingleTurnAgentExecutor.execute` (the vLLM rollout processes): upstream catches and only logs
  every exception of a remote reward / `reward_func`, leaving the reward None. The patch turns a
  missing reward into an error, so a failing endpoint stops training instead of vanishing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from types import ModuleType

CONFIG_ENV = "OPENRLHF_BONESOUP_CONFIG"  # JSON set by the launcher in the Ray runtime_env
HOOK = "openrlhf_bonesoup.integration.worker.setup"


def setup() -> None:
    """The worker_process_setup_hook."""
    _on_import("openrlhf.trainer.ppo_utils.experience_maker", _patch_experience_maker)
    _on_import("openrlhf.utils.agent", _patch_agent)


def config() -> dict:
    """The launch's config: {"objectives": [specs], "weights": [...], "policy": path, "load": {...}}."""
    if CONFIG_ENV not in os.environ:
        raise RuntimeError(
            f"{CONFIG_ENV} is not set: start training with `python -m openrlhf_bonesoup.cli.train_ppo_ray`, "
            "which puts the objectives and combiner into the Ray runtime_env"
        )
    return json.loads(os.environ[CONFIG_ENV])


class _PatchOnImport(importlib.abc.MetaPathFinder):
    # Finds `name` with the finders after it (site-packages, editable installs...) and runs
    # `patch(module)` right after the module's own code. It removes itself first: one module, one
    # patch, no recursion.
    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        upstream_exec = spec.loader.exec_module

        def exec_module(module):
            upstream_exec(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _on_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(isinstance(f, _PatchOnImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


def _patch_experience_maker(module: ModuleType) -> None:
    cls = module.RemoteExperienceMaker
    if getattr(cls.make_experience, "bonesoup", False):
        return
    upstream = cls.make_experience

    def make_experience(self, samples_list):
        if not hasattr(self, "bonesoup_objectives"):
            self.bonesoup_objectives = _objective_columns(self.reward_model_group)
        samples_list = upstream(self, samples_list)
        if not self.bonesoup_objectives:
            return samples_list
        for samples in samples_list:
            rewards = samples.rewards  # [combined, r_1..r_n] per sample, as our actor was asked to return
            samples.rewards = rewards[:, 0]
            samples.info["reward"] = rewards[:, 0]
            for i, name in enumerate(self.bonesoup_objectives):
                samples.info[f"reward/{name}"] = rewards[:, 1 + i]
        return samples_list

    make_experience.bonesoup = True
    cls.make_experience = make_experience


def _objective_columns(reward_model_group) -> list[str]:
    """Switch our reward actors to [combined, r_1..r_n]; their objective names, or [] for upstream's."""
    if reward_model_group is None:
        return []
    import ray

    try:
        refs = reward_model_group.async_run_method("objective_columns")
    except AttributeError:  # upstream's RewardModelActor (a Ray actor handle has no such method)
        return []
    return ray.get(refs)[0]


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
