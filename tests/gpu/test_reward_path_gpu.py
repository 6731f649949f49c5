"""The composite reward path on CUDA, as tests/test_integration_ray.py runs it on CPU, with and without
--ds.packing_samples.

A real local Ray cluster with the launch's runtime_env (every worker runs the plugin's setup hook).
Rollouts come from the stand-in of OpenRLHF's vLLM engine actor (its SingleTurnAgentExecutor; the
policy generates on CPU), which must load no model but the policy. Our RewardModelActors, initialised
by init_model_from_pretrained under OpenRLHF's DeepspeedStrategy on the GPU, score an OpenRLHF RM
(policy tokenizer), an HF classifier (its own tokenizer), a real `openrlhf.cli.serve_rm` endpoint and
a reward_func file reading the dataset labels; upstream's make_experience_batch in a hooked worker (the
PPO trainer's role) hands them each micro-batch with its prompts and labels and combines once per step.
Each sample's raw values equal their definitions (plain forwards on the GPU, the endpoint, the rules)
and its reward the combination written out by hand, `running` normalisation over both steps.

The reward group has one actor per GPU, at most two, in a placement group of whole GPUs (as upstream's
RayActorGroup makes for a group of several actors per node): NCCL refuses two ranks of one group on
one GPU. On a 1-GPU machine both micro-batches of a step go to the one actor.

Packing: OpenRLHF's packed forward (unpad, flash attention over the concatenated samples) runs only
with flash-attn's compiled CUDA extension; that case is skipped without it. Skipped without CUDA
(tests/conftest.py), without deepspeed or ray (module-level).
"""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("deepspeed", reason="deepspeed is not installed (see docs/gpu.md)")
pytest.importorskip("ray", reason="ray is not installed (see docs/gpu.md)")

import numpy as np
import ray
import rollouts
import torch
from openrlhf.trainer.ray.launcher import RayActorGroup
from openrlhf.utils import get_strategy
from ray.util.placement_group import placement_group, remove_placement_group
from rollouts import RULES, by_hand, format_reward, logged, queries_of
from transformers import AutoTokenizer

from openrlhf_bonesoup.integration import launcher
from openrlhf_bonesoup.integration.actor import RewardModelActor

WEIGHTS = [0.7, 0.1, 0.1, 0.1]  # row 0 of B(0.7) for n = 4
NAMES = ["helpful", "polite", "remote", "format"]


def _real_flash_attn() -> bool:
    try:
        import flash_attn_2_cuda
    except ImportError:
        return False
    return not getattr(flash_attn_2_cuda, "STAND_IN", False)  # tests/stand_ins' CPU stand-in does not count


@pytest.fixture(scope="module")
def cluster(tiny, tiny_gpu, tmp_path_factory):
    """A serve_rm endpoint, the objectives, a Ray cluster with the launch's runtime_env and one GPU per
    reward actor, and two steps of rollouts from the stand-in engine."""
    folder = tmp_path_factory.mktemp("objectives")
    (folder / "rules.py").write_text(RULES)
    actors = min(2, torch.cuda.device_count())
    with rollouts.serve_rm(tiny["rm_gpt2"]) as (url,):
        specs = [
            {"name": "helpful", "path": str(tiny_gpu["rm"])},
            {"name": "polite", "path": str(tiny_gpu["classifier"]), "label": 1, "normalize": "running"},
            {"name": "remote", "url": url, "normalize": {"mean": 0.5, "std": 2.0}},
            {"name": "format", "path": "rules.py", "normalize": "running"},
        ]
        (folder / "objectives.yaml").write_text(json.dumps(specs))
        plan, args = launcher.resolve(rollouts.launch_argv(tiny_gpu["policy"], folder / "objectives.yaml", "sdpa"))
        for module in (sys.modules[__name__], rollouts):  # tests/ is not on the workers' path
            ray.cloudpickle.register_pickle_by_value(module)
        ray.init(address="local", num_cpus=8, num_gpus=actors, include_dashboard=False, runtime_env=plan["runtime_env"])
        try:
            steps, _, models = rollouts.rollout_steps(args, tiny_gpu["policy"])
            assert models == ["LlamaForCausalLM"]  # the rollout process holds its policy, never a reward model
            yield {"url": url, "objectives": folder / "objectives.yaml", "steps": steps, "actors": actors}
        finally:
            ray.shutdown()


def packing(actor) -> list[tuple]:
    """Run inside a reward actor (__ray_call__): each model objective's packing flag and attention."""
    return [
        (o.name, getattr(o.model.module, "packing_samples", None), o.model.module.config._attn_implementation)
        for o in actor.objectives
        if o.kind == "model"
    ]


@pytest.mark.parametrize(
    "packed",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not _real_flash_attn(),
                reason="flash-attn's compiled CUDA extension flash_attn_2_cuda is not installed: "
                "OpenRLHF packs samples only with flash attention",
            ),
        ),
    ],
    ids=["padded", "packed"],
)
def test_composite_reward_on_cuda_equals_the_combination_by_hand(cluster, tiny_gpu, packed):
    argv = rollouts.launch_argv(tiny_gpu["policy"], cluster["objectives"], "flash_attention_2" if packed else "sdpa")
    _, args = launcher.resolve(argv + (["--ds.packing_samples"] if packed else []))
    assert args.bonesoup["weights"] == pytest.approx(WEIGHTS) and args.ds.packing_samples is packed
    strategy = get_strategy(args)
    # The placement group RayActorGroup would make itself for two actors, made here so that it can be
    # removed after this case (as train() makes one when it colocates critic and reward).
    pg = placement_group([{"GPU": 1, "CPU": 1}] * cluster["actors"], strategy="PACK")
    ray.get(pg.ready())
    rewards = RayActorGroup(1, cluster["actors"], RewardModelActor, pg=pg, num_gpus_per_actor=1)
    try:
        ray.get(rewards.async_init_model_from_pretrained(strategy, args.reward.model_name_or_path))
        held = ray.get(rewards.async_run_method("__ray_call__", packing))
        made = ray.get(rollouts.make_experiences.remote(strategy, cluster["steps"], rewards))
    finally:
        for actor in rewards._actor_handlers:  # the next case needs the GPUs and fresh NCCL processes
            ray.kill(actor)
        remove_placement_group(pg)
    # Each objective's own best attention (objectives.attention), whatever --ds.attn_implementation says
    attention = "flash_attention_2" if _real_flash_attn() else "sdpa"
    assert held == [[("helpful", packed, attention), ("polite", None, attention)]] * cluster["actors"]

    policy = AutoTokenizer.from_pretrained(str(tiny_gpu["policy"]))
    raw_steps = []
    for samples, experiences in zip(cluster["steps"], made, strict=True):
        assert len(experiences) == 2  # micro-batches of 2
        queries = queries_of(policy, samples)
        labels = [e.labels[0] for e in samples]
        plain = rollouts.plain_raw(tiny_gpu["policy"], tiny_gpu["rm"], tiny_gpu["classifier"], samples, "cuda", "sdpa")
        got = np.stack([logged(experiences, f"reward_raw/{n}") for n in NAMES], axis=1)
        np.testing.assert_allclose(got[:, :2], plain, atol=5e-3)  # bf16: DeepSpeed, batched, padded or packed
        np.testing.assert_allclose(got[:, 2], rollouts.post(cluster["url"], queries), atol=5e-3)
        np.testing.assert_allclose(got[:, 3], format_reward(queries, labels))  # the labels reached the reward_func
        raw_steps.append(got)
    how = [o["normalize"] for o in args.bonesoup["objectives"]]
    for experiences, want in zip(made, by_hand(raw_steps, how, WEIGHTS), strict=True):
        np.testing.assert_allclose(logged(experiences, "reward"), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(torch.cat([e.rewards for e in experiences]).numpy(), want, rtol=1e-5, atol=1e-5)
        for e in experiences:
            assert e.advantages.shape == e.action_mask.shape  # upstream computed advantages from it
            assert {f"reward/{n}" for n in NAMES} <= set(e.info)  # what the policy actor's train step logs
