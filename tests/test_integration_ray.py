"""The composite reward on a real Ray local cluster, both routes, through OpenRLHF's own code.

- every worker process runs the plugin's setup hook, which patches OpenRLHF's modules only when
  OpenRLHF imports them (nothing heavy is imported by the hook itself);
- reward-actor route (some objective is a model): two of our RewardModelActors (num_gpus=0), built
  by upstream's RayActorGroup as train() builds its reward group, score an OpenRLHF RM (policy
  tokenizer), an HF classifier (its own tokenizer), a real `openrlhf.cli.serve_rm` endpoint and a
  reward_func file reading the dataset labels; rollouts come from a stand-in of OpenRLHF's vLLM engine
  actor (its SingleTurnAgentExecutor with train()'s remote_rm_url, HF generate for vLLM), which must
  load no model but the policy;
- reward_func route (no model): the same stand-in with our reward_func file as remote_rm_url;
- upstream's make_experience_batch, in a hooked worker (the PPO trainer's role), combines once per
  step: each sample's reward equals the combination computed here by hand, `running` normalisation
  one global statistic over all samples of all steps so far.

OpenRLHF's policy actor needs DeepSpeed on a GPU (setup_distributed); log-probs here come from a CPU
actor that runs openrlhf.models.Actor as ReferenceModelActor.forward does. Nothing of the reward path
is replaced.
"""

from __future__ import annotations

import gc
import json
import runpy
import sys

import numpy as np
import pytest
import ray
import rollouts
import torch
from openrlhf.models import Actor, get_llm_for_sequence_regression
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.trainer.ray.launcher import BaseModelActor, RayActorGroup
from openrlhf.utils import get_strategy
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from openrlhf_bonesoup.integration import actor as bonesoup_actor
from openrlhf_bonesoup.integration import launcher, worker

PROMPTS = [
    ("Human: How do I bake bread? Assistant:", "bonus"),
    ("Human: Tell me a joke. Assistant:", None),
    ("Human: How can I stay safe online? Assistant:", "bonus"),
    ("Summarize: a fox. TL;DR:", None),
    ("Human: Please be helpful. Assistant:", None),
    ("The weather today is", "bonus"),
    ("Human: Why is the sky blue? Assistant:", None),
    ("Human: I cannot help with that request. Assistant:", None),
]
STEPS = [PROMPTS[:4], PROMPTS[4:]]  # two PPO steps of rollout batch 4, micro-batches of 2
RULES = """
def reward_func(queries, prompts, labels):
    # reads the dataset label: the length of the query, plus 5 when the label says "bonus"
    return [len(q) + (5.0 if label == "bonus" else 0.0) for q, label in zip(queries, labels)]
"""
WEIGHTS = [0.7, 0.1, 0.1, 0.1]  # row 0 of B(0.7) for n = 4


def openrlhf_argv(tiny, objectives_file):
    argv = ["--actor.model_name_or_path", str(tiny["policy"]), "--objectives", str(objectives_file)]
    argv += ["--ds.attn_implementation", "eager", "--algo.advantage.estimator", "reinforce"]
    argv += ["--rollout.micro_batch_size", "2", "--rollout.batch_size", "4", "--algo.kl.init_coef", "0"]
    return argv + ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"]


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory):
    """A serve_rm endpoint, both launches resolved by the launcher, and a Ray cluster with its runtime_env."""
    folder = tmp_path_factory.mktemp("objectives")
    (folder / "rules.py").write_text(RULES)
    with rollouts.serve_rm(tiny["rm_gpt2"]) as (url,):
        remote = {"name": "remote", "url": url, "normalize": {"mean": 0.5, "std": 2.0}}
        format_ = {"name": "format", "path": "rules.py", "normalize": "running"}
        models = [
            {"name": "helpful", "path": str(tiny["rm_llama"])},
            {"name": "polite", "path": str(tiny["classifier"]), "label": 1, "normalize": "running"},
        ]
        (folder / "mixed.yaml").write_text(json.dumps(models + [remote, format_]))
        (folder / "no_model.yaml").write_text(json.dumps([remote, format_]))
        mixed_plan, mixed = launcher.resolve(openrlhf_argv(tiny, folder / "mixed.yaml"))
        argv = openrlhf_argv(tiny, folder / "no_model.yaml")
        argv[argv.index("0.7") - 1 :] = ["--reward_combiner", "linear", "--reward_weights", "0.6,0.4"]
        _, no_model = launcher.resolve(argv)
        for module in (sys.modules[__name__], rollouts):  # tests/ is not on the workers' path
            ray.cloudpickle.register_pickle_by_value(module)
        ray.init(num_cpus=4, include_dashboard=False, runtime_env=mixed_plan["runtime_env"])
        try:
            yield {"url": url, "mixed": mixed, "no_model": no_model}
        finally:
            ray.shutdown()


def test_the_launch_routes_every_objective_to_the_reward_actors_when_one_is_a_model(cluster, tiny):
    mixed, no_model = cluster["mixed"], cluster["no_model"]
    assert mixed.bonesoup["route"] == worker.ROUTE_ACTORS and mixed.reward.remote_url is None
    assert [o["kind"] for o in mixed.bonesoup["objectives"]] == ["model", "model", "http", "function"]
    assert mixed.reward.model_name_or_path  # upstream builds and initialises the reward group
    assert no_model.bonesoup["route"] == worker.ROUTE_REWARD_FUNC
    assert no_model.reward.remote_url == launcher.REWARD_FUNC_FILE


def test_every_worker_runs_the_setup_hook_and_patches_on_import(cluster):
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
        "objectives": ["helpful", "polite", "remote", "format"],
    }
    from openrlhf.trainer.ppo_utils import experience_maker

    # The driver (this process) is not a Ray worker: upstream's class, unpatched.
    assert not hasattr(experience_maker.RemoteExperienceMaker.make_experience, "bonesoup")


def test_train_ppo_ray_builds_the_reward_group_from_our_actor(cluster):
    with launcher._actor_replaced():
        train_ppo_ray = runpy.run_module(launcher.UPSTREAM)  # its imports, as the launcher's runpy sees them
    assert train_ppo_ray["RewardModelActor"] is bonesoup_actor.RewardModelActor
    # Upstream's make_experience alone (no hook in the trainer) cannot hand it the labels: a clear error.
    group = RayActorGroup(1, 1, train_ppo_ray["RewardModelActor"], num_gpus_per_actor=0)
    strategy = get_strategy(cluster["mixed"])
    ray.get(group.async_run_method("load_objectives", strategy, cluster["mixed"].reward.model_name_or_path))
    refs = group.async_run_method_batch(
        method_name="forward", sequences=[torch.ones(1, 3, dtype=torch.long)], attention_mask=[torch.ones(1, 3)]
    )
    with pytest.raises(ray.exceptions.RayTaskError, match="worker hook is not active"):
        ray.get(refs)


@ray.remote
class RolloutStandIn:
    """OpenRLHF's vLLM engine actor for one purpose: run its SingleTurnAgentExecutor, built with train()'s
    remote_rm_url, on each prompt. HF generate stands in for vLLM (no GPU here)."""

    def __init__(self, policy_path: str, remote_rm_url):
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        self.engine = rollouts.HFEngine(policy_path)
        self.executor = SingleTurnAgentExecutor(remote_rm_url)

    def generate(self, prompt: str, label) -> dict:
        return rollouts.execute(self.executor, self.engine, prompt, label)

    def models_loaded(self) -> list[str]:
        from transformers import PreTrainedModel

        models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
        inner = {id(m) for o in models for m in o.modules() if m is not o}  # LlamaModel inside LlamaForCausalLM
        return sorted(type(o).__name__ for o in models if id(o) not in inner)


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


@ray.remote
def make_experiences(strategy, steps: list[list[Experience]], reward_actors: int) -> list[list[Experience]]:
    """The PPO trainer's role, in a hooked worker: upstream's RemoteExperienceMaker, one call per step."""
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    rewards = None
    if reward_actors:  # as train() builds it when --reward.remote_url is not set
        rewards = RayActorGroup(reward_actors, 1, bonesoup_actor.RewardModelActor, num_gpus_per_actor=0)
        ray.get(rewards.async_run_method("load_objectives", strategy, strategy.args.reward.model_name_or_path))
    policy_group = RayActorGroup(1, 1, CpuPolicyActor, num_gpus_per_actor=0)
    ray.get(policy_group.async_run_method("init", strategy, strategy.args.actor.model_name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(strategy.args.actor.model_name_or_path)
    maker = RemoteExperienceMaker(policy_group, None, rewards, None, FixedKLController(0.0), strategy, tokenizer)
    return [maker.make_experience_batch(samples) for samples in steps]


def rollout_steps(args, tiny, env: dict | None = None):
    """Each step's Experiences, from the stand-in engine as SamplesGenerator turns responses into them."""
    options = {"runtime_env": {"env_vars": env}} if env else {}
    engine = RolloutStandIn.options(**options).remote(str(tiny["policy"]), args.reward.remote_url)
    generator = SamplesGenerator(get_strategy(args), None, None, AutoTokenizer.from_pretrained(str(tiny["policy"])), [])
    steps = []
    for step in STEPS:
        responses = ray.get([engine.generate.remote(p, label) for p, label in step])
        steps.append([generator._process_response_into_experience(r, max_len=64) for r in responses])
    return steps, responses, ray.get(engine.models_loaded.remote())


def queries_of(tokenizer, experiences):
    """OpenRLHF's query per sample: the rollout ids decoded with special tokens kept."""
    return [tokenizer.decode(e.sequences[0], skip_special_tokens=False) for e in experiences]


def format_reward(queries: list[str], labels: list) -> list[float]:
    """RULES, written out: the query's length, plus 5 for the label "bonus"."""
    return [len(q) + (5.0 if label == "bonus" else 0.0) for q, label in zip(queries, labels, strict=True)]


def by_hand(raw_steps: list[np.ndarray], how: list, weights: list[float]) -> list[np.ndarray]:
    """Each step's rewards from its raw values (samples, n): fixed and running normalisation, running
    statistics over every sample of this and the earlier steps, then the weighted sum."""
    out, seen = [], []
    for raw in raw_steps:
        seen.append(raw)
        history = np.concatenate(seen)
        values = raw.copy()
        for i, h in enumerate(how):
            if isinstance(h, dict):
                values[:, i] = (raw[:, i] - h["mean"]) / h["std"]
            elif h == "running":
                values[:, i] = (raw[:, i] - history[:, i].mean()) / history[:, i].std()
        out.append(values @ np.asarray(weights))
    return out


def logged(experiences: list[Experience], key: str) -> np.ndarray:
    return torch.cat([e.info[key] for e in experiences]).double().numpy()


def test_reward_actor_route_combines_once_per_step_in_the_trainer(cluster, tiny):
    args = cluster["mixed"]
    steps, _, models = rollout_steps(args, tiny)
    assert models == ["LlamaForCausalLM"]  # the rollout process holds its policy, never a reward model

    made = ray.get(make_experiences.remote(get_strategy(args), steps, 2))
    names = ["helpful", "polite", "remote", "format"]
    policy = AutoTokenizer.from_pretrained(str(tiny["policy"]))
    helpful_rm = get_llm_for_sequence_regression(str(tiny["rm_llama"]), "reward", attn_implementation="eager").eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(str(tiny["classifier"]), dtype=torch.bfloat16)
    classifier_tok = AutoTokenizer.from_pretrained(str(tiny["classifier"]))
    raw_steps = []
    for samples, experiences in zip(steps, made, strict=True):
        assert len(experiences) == 2  # micro-batches of 2, one to each reward actor
        # Raw values, each computed here from its definition, one sample at a time, unpadded.
        queries = queries_of(policy, samples)
        texts = [policy.decode(e.sequences[0], skip_special_tokens=True) for e in samples]
        labels = [e.labels[0] for e in samples]
        with torch.no_grad():
            helpful = [helpful_rm(e.sequences, e.attention_mask).float().item() for e in samples]
            polite = [classifier(**classifier_tok(t, return_tensors="pt")).logits[0, 1].float().item() for t in texts]
        remote = rollouts.post(cluster["url"], queries)
        got = np.stack([logged(experiences, f"reward_raw/{n}") for n in names], axis=1)
        np.testing.assert_allclose(got[:, 0], helpful, atol=5e-3)  # bf16: batched and padded vs one by one
        np.testing.assert_allclose(got[:, 1], polite, atol=5e-3)
        np.testing.assert_allclose(got[:, 2], remote, atol=5e-3)
        np.testing.assert_allclose(got[:, 3], format_reward(queries, labels))  # the labels reached the reward_func
        raw_steps.append(got)
    how = [o["normalize"] for o in args.bonesoup["objectives"]]
    for experiences, want in zip(made, by_hand(raw_steps, how, WEIGHTS), strict=True):
        np.testing.assert_allclose(logged(experiences, "reward"), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(torch.cat([e.rewards for e in experiences]).numpy(), want, rtol=1e-5, atol=1e-5)
        for e in experiences:
            assert e.advantages.shape == e.action_mask.shape  # upstream computed advantages from it
            assert {f"reward/{n}" for n in names} <= set(e.info)  # logged by the policy actor's train step


def test_reward_func_route_combines_the_raw_values_in_the_trainer(cluster, tiny):
    args = cluster["no_model"]
    env = {worker.CONFIG_ENV: json.dumps(args.bonesoup)}  # what this launch's runtime_env would carry
    steps, responses, models = rollout_steps(args, tiny, env)
    assert models == ["LlamaForCausalLM"]  # our reward_func file loaded no model in the rollout process
    assert set(responses[0]["extra_logs"]) == {"reward_raw/remote", "reward_raw/format"}

    made = ray.get(make_experiences.remote(get_strategy(args), steps, 0))
    policy = AutoTokenizer.from_pretrained(str(tiny["policy"]))
    raw_steps = []
    for samples, experiences in zip(steps, made, strict=True):
        queries = queries_of(policy, samples)
        labels = [e.labels[0] for e in samples]
        got = np.stack([logged(experiences, f"reward_raw/{n}") for n in ("remote", "format")], axis=1)
        np.testing.assert_allclose(got[:, 0], rollouts.post(cluster["url"], queries), atol=5e-3)
        np.testing.assert_allclose(got[:, 1], format_reward(queries, labels))
        raw_steps.append(got)
    how = [o["normalize"] for o in args.bonesoup["objectives"]]
    for experiences, want in zip(made, by_hand(raw_steps, how, [0.6, 0.4]), strict=True):
        np.testing.assert_allclose(logged(experiences, "reward"), want, rtol=1e-5, atol=1e-5)
