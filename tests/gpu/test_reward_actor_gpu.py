"""Our RewardModelActor under OpenRLHF's own DeepspeedStrategy on one GPU: ZeRO stage 0 and 3, bf16, with
and without --reward.offload.

As train() builds and initialises its reward group: a real local Ray cluster with one GPU, upstream's
RayActorGroup(1, 1, RewardModelActor, num_gpus_per_actor=1), the strategy from upstream's get_strategy on
the args the launcher resolves, and init_model_from_pretrained, which runs upstream's set-up: NCCL and
the device mesh (setup_distributed, world size 1), the loaders with get_ds_eval_config (at ZeRO-3 the
OpenRLHF RM is partitioned as it loads) and strategy.prepare per model. Two objectives: an OpenRLHF RM
on the policy's tokenizer (fixed normalisation) and an HF classifier on its own tokenizer (running).

One rollout batch (OpenRLHF's executor and SamplesGenerator; the policy generates on CPU) goes through
upstream's make_experience_batch in a hooked worker, the trainer's role: its patched make_experience
hands each padded micro-batch, with its prompts and labels, to the group's forward. Then
- each model runs in a DeepSpeed engine of the requested stage, bf16, with param offload as asked;
- the raw values equal each model's plain forward (OpenRLHF's loader / transformers on this GPU, bf16,
  no DeepSpeed, one sample at a time) to bf16 tolerance;
- the reward equals the combination written out here (rollouts.by_hand).

Skipped without CUDA (tests/conftest.py), without deepspeed or ray (module-level).
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
from rollouts import by_hand, logged

from openrlhf_bonesoup.integration import launcher
from openrlhf_bonesoup.integration.actor import RewardModelActor

WEIGHTS = [0.7, 0.3]  # row 0 of B(0.7) for n = 2
NAMES = ["helpful", "polite"]


@pytest.fixture(scope="module")
def cluster(tiny_gpu, tmp_path_factory):
    """The objectives, a Ray cluster with one GPU and the launch's runtime_env (the worker hook), and
    one rollout batch of 4 prompts with the policy's responses."""
    folder = tmp_path_factory.mktemp("objectives")
    specs = [
        {"name": "helpful", "path": str(tiny_gpu["rm"]), "normalize": {"mean": 0.05, "std": 0.5}},
        {"name": "polite", "path": str(tiny_gpu["classifier"]), "label": 1, "normalize": "running"},
    ]
    (folder / "objectives.yaml").write_text(json.dumps(specs))
    argv = rollouts.launch_argv(tiny_gpu["policy"], folder / "objectives.yaml", attn="sdpa")
    plan, args = launcher.resolve(argv)
    for module in (sys.modules[__name__], rollouts):  # tests/ is not on the workers' path
        ray.cloudpickle.register_pickle_by_value(module)
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, runtime_env=plan["runtime_env"])
    try:
        (samples,), _, _ = rollouts.rollout_steps(args, tiny_gpu["policy"], steps=[rollouts.PROMPTS[:4]])
        plain = rollouts.plain_raw(tiny_gpu["policy"], tiny_gpu["rm"], tiny_gpu["classifier"], samples, "cuda", "sdpa")
        yield {"argv": argv, "samples": samples, "plain": plain}
    finally:
        ray.shutdown()


def engines(actor) -> list[dict]:
    """Run inside the reward actor (__ray_call__): how DeepSpeed holds each model objective."""
    out = []
    for objective in actor.objectives:
        engine = objective.model
        params = list(engine.module.parameters())
        # ZeRO-3 keeps parameters under stage3_param_persistence_threshold gathered; the others are
        # gathered for each forward and released to their partition (on the CPU when offloaded).
        released = [p for p in params if hasattr(p, "ds_tensor") and not p.ds_persist]
        held = [p.ds_tensor for p in released] or params
        out.append(
            {
                "engine": type(engine).__name__,
                "stage": engine.zero_optimization_stage(),
                "bf16": engine.bfloat16_enabled() and {p.dtype for p in params} == {torch.bfloat16},
                "offload": getattr(engine.module, "_offload", False),
                "offload_param": engine.config["zero_optimization"]["offload_param"]["device"],
                "released": len(released),
                "devices": sorted({t.device.type for t in held}),
            }
        )
    return out


@pytest.mark.parametrize("offload", [False, True], ids=["no_offload", "offload"])
@pytest.mark.parametrize("zero_stage", [0, 3], ids=["zero0", "zero3"])
def test_reward_actor_under_deepspeed_scores_as_the_plain_models(cluster, zero_stage, offload):
    argv = cluster["argv"] + ["--ds.zero_stage", str(zero_stage), "--ds.param_dtype", "bf16"]
    _, args = launcher.resolve(argv + (["--reward.offload"] if offload else []))
    assert args.bonesoup["weights"] == pytest.approx(WEIGHTS) and args.reward.offload is offload
    strategy = get_strategy(args)
    group = RayActorGroup(1, 1, RewardModelActor, num_gpus_per_actor=1)
    try:
        ray.get(group.async_init_model_from_pretrained(strategy, args.reward.model_name_or_path))
        (held,) = ray.get(group.async_run_method("__ray_call__", engines))
        (made,) = ray.get(rollouts.make_experiences.remote(strategy, [cluster["samples"]], group))
    finally:
        for actor in group._actor_handlers:  # the next case needs the GPU and a fresh NCCL process
            ray.kill(actor)

    for model in held:
        assert model["engine"] == "DeepSpeedEngine" and model["stage"] == zero_stage and model["bf16"]
        assert model["offload"] is offload
        assert model["offload_param"] == ("cpu" if offload else "none")  # upstream's get_ds_eval_config
        if zero_stage == 3:
            assert model["released"] > 0  # the 256 x 512 matrices and larger: really partitioned
            assert model["devices"] == (["cpu"] if offload else ["cuda"])
        else:
            assert model["released"] == 0 and model["devices"] == ["cuda"]  # stage 0 ignores param offload

    assert len(made) == 2 and any((e.attention_mask == 0).any() for e in made)  # padded micro-batches of 2
    raw = np.stack([logged(made, f"reward_raw/{n}") for n in NAMES], axis=1)
    np.testing.assert_allclose(raw, cluster["plain"], atol=5e-3)  # bf16: DeepSpeed, batched, padded vs plain
    how = [o["normalize"] for o in args.bonesoup["objectives"]]
    (want,) = by_hand([raw], how, WEIGHTS)
    np.testing.assert_allclose(logged(made, "reward"), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(torch.cat([e.rewards for e in made]).numpy(), want, rtol=1e-5, atol=1e-5)
