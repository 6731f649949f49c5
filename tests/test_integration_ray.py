"""A real Ray local cluster started with the launcher's runtime_env (one per module: ~7 s).

- every worker process runs the plugin's setup hook, which patches OpenRLHF's modules only when
  OpenRLHF imports them (nothing heavy is imported by the hook itself);
- train_ppo_ray, imported with the actor replacement installed, builds its reward group from our
  RewardModelActor; that actor (CPU, num_gpus=0) loads both tiny RMs with OpenRLHF's loader and
  returns the combined reward plus per-objective values through upstream's own batch dispatch;
- upstream's make_experience_batch, run in a hooked worker, turns that into `rewards` and
  `info["reward/<name>"]` (what the policy actor logs), and computes advantages from it.

OpenRLHF's policy and reference actors need DeepSpeed on a GPU (setup_distributed); the log-probs
here come from a CPU actor that runs openrlhf.models.Actor as ReferenceModelActor.forward does.
Nothing of the reward path is replaced.
"""

from __future__ import annotations

import runpy
import sys

import numpy as np
import pytest
import ray
import torch
from openrlhf.models import Actor, get_llm_for_sequence_regression
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ray.launcher import BaseModelActor, RayActorGroup
from openrlhf.utils import get_strategy
from transformers import AutoTokenizer

from openrlhf_bonesoup.integration import actor as bonesoup_actor
from openrlhf_bonesoup.integration import launcher, worker

PAIRS = [
    ("Human: How do I bake bread? Assistant:", " Mix flour, water and salt."),
    ("Human: Tell me a joke. Assistant:", " Why did the chicken cross the road?"),
    ("Human: How can I stay safe online? Assistant:", " Use strong passwords."),
    ("Summarize: a fox. TL;DR:", " a fox jumps"),
]


@pytest.fixture(scope="module")
def launch(tiny):
    """OpenRLHF's parsed args after our step, and a Ray cluster with the launcher's runtime_env."""
    argv = ["--actor.model_name_or_path", str(tiny["policy"])]
    argv += ["--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}"]
    argv += ["--ds.attn_implementation", "eager", "--algo.advantage.estimator", "reinforce"]
    argv += ["--rollout.micro_batch_size", "2", "--rollout.batch_size", "4", "--algo.kl.init_coef", "0"]
    argv += ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"]
    plan, args = launcher.resolve(argv)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=plan["runtime_env"])
    try:
        yield args
    finally:
        ray.shutdown()


def reference_values(tiny, sequences, attention_mask):
    """rm_llama on the policy ids as upstream's actor calls it; rm_gpt2 on each clean text, unpadded."""
    llama = get_llm_for_sequence_regression(str(tiny["rm_llama"]), "reward", attn_implementation="eager").eval()
    gpt2 = get_llm_for_sequence_regression(str(tiny["rm_gpt2"]), "reward", attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(tiny["rm_gpt2"]))
    with torch.no_grad():
        first = llama(sequences, attention_mask, pad_sequence=True).float()
        second = []
        for prompt, response in PAIRS:
            ids = tok(prompt + response + " " + tok.eos_token, add_special_tokens=False)["input_ids"]
            second.append(gpt2(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).float().item())
    return first.numpy(), np.array(second)


def rollout(policy_tokenizer, prompt: str, response: str) -> Experience:
    """One rollout as OpenRLHF's SamplesGenerator builds it (prompt + response + eos, reward unset)."""
    prompt_ids = policy_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens = (
        prompt_ids + policy_tokenizer(response, add_special_tokens=False)["input_ids"] + [policy_tokenizer.eos_token_id]
    )
    action_mask = torch.zeros(len(tokens), dtype=torch.long)
    action_mask[len(prompt_ids) :] = 1
    return Experience(
        sequences=torch.tensor([tokens]),
        attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
        action_mask=action_mask[1:].unsqueeze(0),
        prompts=[prompt],
        labels=[None],
        images=[None],
        mm_train_inputs=[None],
        response_length=torch.tensor([len(tokens) - len(prompt_ids)]),
        truncated=torch.tensor([False]),
        total_length=torch.tensor([float(len(tokens))]),
        info={"response_clip_ratio": torch.tensor([False])},
    )


def test_every_worker_runs_the_setup_hook_and_patches_on_import(launch):
    @ray.remote
    def inspect():
        heavy = [m for m in ("deepspeed", "openrlhf.utils.agent", "vllm") if m in sys.modules]
        from openrlhf.trainer.ppo_utils import experience_maker
        from openrlhf.utils import agent

        return {
            "imported_by_the_hook": heavy,
            "make_experience": getattr(experience_maker.RemoteExperienceMaker.make_experience, "bonesoup", False),
            "execute": getattr(agent.SingleTurnAgentExecutor.execute, "bonesoup", False),
            "objectives": [o["name"] for o in worker.config()["objectives"]],
        }

    assert ray.get(inspect.remote()) == {
        "imported_by_the_hook": [],
        "make_experience": True,
        "execute": True,
        "objectives": ["rm_llama", "rm_gpt2"],
    }
    from openrlhf.trainer.ppo_utils import experience_maker

    # The driver (this process) is not a Ray worker: upstream's class, unpatched.
    assert not hasattr(experience_maker.RemoteExperienceMaker.make_experience, "bonesoup")


def test_train_ppo_ray_builds_the_reward_group_from_our_actor(launch, tiny):
    with launcher._actor_replaced():
        train_ppo_ray = runpy.run_module(launcher.UPSTREAM)  # its imports, as the launcher's runpy sees them
    assert train_ppo_ray["RewardModelActor"] is bonesoup_actor.RewardModelActor
    # As train() builds it (RayActorGroup(..., RewardModelActor, ...)), without a GPU.
    group = RayActorGroup(1, 1, train_ppo_ray["RewardModelActor"], num_gpus_per_actor=0)
    strategy = get_strategy(launch)
    ray.get(group.async_run_method("load_objectives", strategy, launch.reward.model_name_or_path))

    policy = AutoTokenizer.from_pretrained(str(tiny["policy"]))
    batch = Experience.concat_experiences([rollout(policy, p, r) for p, r in PAIRS], policy.pad_token_id)

    # Upstream's dispatch in RemoteExperienceMaker.make_experience: forward over lists of micro-batches.
    def forward():
        refs = group.async_run_method_batch(
            method_name="forward",
            sequences=[batch.sequences],
            attention_mask=[batch.attention_mask],
            pad_sequence=[True],
        )
        return ray.get(refs)[0][0]

    combined = forward()
    assert combined.shape == (len(PAIRS),)  # upstream's shape until the patched make_experience asks
    assert worker._objective_columns(group) == ["rm_llama", "rm_gpt2"]
    out = forward()
    assert out.shape == (len(PAIRS), 3)  # [combined, rm_llama, rm_gpt2]
    np.testing.assert_allclose(out[:, 0].numpy(), combined.numpy())
    first, second = reference_values(tiny, batch.sequences, batch.attention_mask)
    np.testing.assert_allclose(out[:, 1].numpy(), first, atol=1e-6)  # ids passed through, as upstream
    np.testing.assert_allclose(out[:, 2].numpy(), second, atol=5e-3)  # bf16, batched vs one by one
    np.testing.assert_allclose(out[:, 0].numpy(), 0.7 * out[:, 1].numpy() + 0.3 * out[:, 2].numpy(), atol=1e-6)


def test_upstream_reward_actor_is_left_as_upstream_made_it(launch):
    from openrlhf.trainer.ray.launcher import RewardModelActor

    group = RayActorGroup(1, 1, RewardModelActor, num_gpus_per_actor=0)
    assert worker._objective_columns(group) == []  # no per-objective columns asked of upstream's actor


@ray.remote(num_gpus=0)
class CpuPolicyActor(BaseModelActor):
    """Log-probs on CPU: ReferenceModelActor.forward without torch.cuda (DeepSpeed needs a GPU)."""

    def init(self, strategy, path):
        self.strategy = strategy
        self.model = Actor(path, attn_implementation="eager", param_dtype="bf16")
        self.model.eval()

    def forward(self, sequences, action_mask=None, attention_mask=None, **kwargs):
        with torch.no_grad():
            return self.model(sequences, action_mask, attention_mask).to("cpu")


def test_make_experience_in_a_hooked_worker_logs_every_objective(launch, tiny):
    strategy = get_strategy(launch)
    policy = AutoTokenizer.from_pretrained(str(tiny["policy"]))
    samples = [rollout(policy, p, r) for p, r in PAIRS]

    @ray.remote
    def make_experience(strategy, samples):
        # What PPOTrainer does in its own worker process, with upstream's RemoteExperienceMaker.
        from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
        from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

        rewards = RayActorGroup(1, 1, bonesoup_actor.RewardModelActor, num_gpus_per_actor=0)
        ray.get(rewards.async_run_method("load_objectives", strategy, strategy.args.reward.model_name_or_path))
        policy_group = RayActorGroup(1, 1, CpuPolicyActor, num_gpus_per_actor=0)
        ray.get(policy_group.async_run_method("init", strategy, strategy.args.actor.model_name_or_path))
        maker = RemoteExperienceMaker(
            policy_group,
            None,
            rewards,
            None,
            FixedKLController(0.0),
            strategy,
            AutoTokenizer.from_pretrained(strategy.args.actor.model_name_or_path),
        )
        return maker.make_experience_batch(samples)

    experiences = ray.get(make_experience.remote(strategy, samples))
    assert len(experiences) == 2  # micro-batches of 2
    for exp in experiences:
        combined = exp.info["reward"]
        assert exp.rewards.shape == combined.shape == exp.info["reward/rm_llama"].shape == (2,)
        np.testing.assert_allclose(exp.rewards.numpy(), combined.numpy())
        parts = 0.7 * exp.info["reward/rm_llama"] + 0.3 * exp.info["reward/rm_gpt2"]
        np.testing.assert_allclose(combined.numpy(), parts.numpy(), atol=1e-6)
        assert exp.advantages.shape == exp.action_mask.shape  # upstream computed advantages from it
        # The policy actor's training step logs every tensor in info (trainer/ray/ppo_actor.py).
        assert {"reward", "reward/rm_llama", "reward/rm_gpt2"} <= set(exp.info)
    batch = Experience.concat_experiences(samples, policy.pad_token_id)
    first, second = reference_values(tiny, batch.sequences, batch.attention_mask)
    got = torch.cat([exp.info["reward/rm_llama"] for exp in experiences]).numpy()
    np.testing.assert_allclose(got, first, atol=5e-3)
    got = torch.cat([exp.info["reward/rm_gpt2"] for exp in experiences]).numpy()
    np.testing.assert_allclose(got, second, atol=5e-3)
