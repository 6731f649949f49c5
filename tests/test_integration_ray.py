"""The composite reward on a real Ray local cluster, both routes, through OpenRLHF's own code.

- every worker process runs the plugin's setup hook, which patches OpenRLHF's modules only when
  OpenRLHF imports them (nothing heavy is imported by the hook itself);
- reward-actor route (some objective is a model): two of our RewardModelActors (num_gpus=0), built
  by upstream's RayActorGroup as train() builds its reward group, score an OpenRLHF RM (policy
  tokenizer), an HF classifier (its own tokenizer), a real `openrlhf.cli.serve_rm` endpoint and a
  reward_func file reading the dataset labels; rollouts come from OpenRLHF's own vLLM engine actor
  (RolloutRayActor on vLLM's CPU build, its SingleTurnAgentExecutor with train()'s remote_rm_url), whose
  process must hold no model;
- reward_func route (no model): the same engine actor with our reward_func file as remote_rm_url;
- upstream's make_experience_batch, in a hooked worker (the PPO trainer's role), combines once per
  step: each sample's reward equals the combination computed here by hand, `running` normalisation
  one global statistic over all samples of all steps so far.

OpenRLHF's policy actor needs DeepSpeed on a GPU (setup_distributed); log-probs here come from a CPU
actor that runs openrlhf.models.Actor as ReferenceModelActor.forward does. Nothing of the reward path
is replaced. The engine actor's set-up, the CPU policy actor, the trainer's role and the reward written
out by hand are in tests/rollouts.py: tests/gpu/test_reward_path_gpu.py runs the same path on CUDA. The
rollouts come from the vLLM-sized tiny policy (head size 64) on the same tokenizer as the policy whose
log-probs the trainer computes; the whole PPO loop is tests/test_launch.py.
"""

from __future__ import annotations

import http.server
import json
import runpy
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import ray
import rollouts
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.trainer.ray.launcher import RayActorGroup
from openrlhf.utils import get_strategy
from rollouts import PROMPTS, RULES, by_hand, format_reward, logged, queries_of
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from openrlhf_bonesoup.integration import actor as bonesoup_actor
from openrlhf_bonesoup.integration import launcher, worker

WEIGHTS = [0.7, 0.1, 0.1, 0.1]  # row 0 of B(0.7) for n = 4


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
        mixed_plan, mixed = launcher.resolve(rollouts.launch_argv(tiny["policy"], folder / "mixed.yaml"))
        argv = rollouts.launch_argv(tiny["policy"], folder / "no_model.yaml")
        argv[argv.index("0.7") - 1 :] = ["--reward_combiner", "linear", "--reward_weights", "0.6,0.4"]
        _, no_model = launcher.resolve(argv)
        for module in (sys.modules[__name__], rollouts):  # tests/ is not on the workers' path
            ray.cloudpickle.register_pickle_by_value(module)
        # Its own local cluster (never one running on the machine); a declared GPU for the vLLM engine actor.
        ray.init(
            address="local", num_cpus=4, num_gpus=1, include_dashboard=False, runtime_env=mixed_plan["runtime_env"]
        )
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


@pytest.fixture(scope="module")
def actor_steps(cluster, tiny_gpu):
    """Two steps of rollouts for the reward-actor route (no remote_url: the engine actor scores nothing)."""
    steps, _, models = rollouts.rollout_steps(cluster["mixed"], tiny_gpu["policy"])
    return steps, models


def test_reward_actor_route_combines_once_per_step_in_the_trainer(cluster, tiny, actor_steps):
    args = cluster["mixed"]
    steps, models = actor_steps
    assert models == []  # the rollout process holds no reward model (vLLM's policy lives in its engine core)

    # Two reward actors (num_gpus=0: no DeepSpeed here), as train() builds its reward group.
    strategy = get_strategy(args)
    rewards = RayActorGroup(2, 1, bonesoup_actor.RewardModelActor, num_gpus_per_actor=0)
    ray.get(rewards.async_run_method("load_objectives", strategy, args.reward.model_name_or_path))
    made = ray.get(rollouts.make_experiences.remote(strategy, steps, rewards))
    names = ["helpful", "polite", "remote", "format"]
    policy = AutoTokenizer.from_pretrained(str(tiny["policy"]))
    raw_steps = []
    for samples, experiences in zip(steps, made, strict=True):
        assert len(experiences) == 2  # micro-batches of 2, one to each reward actor
        # Raw values, each computed here from its definition, one sample at a time, unpadded.
        queries = queries_of(policy, samples)
        labels = [e.labels[0] for e in samples]
        plain = rollouts.plain_raw(tiny["policy"], tiny["rm_llama"], tiny["classifier"], samples)
        remote = rollouts.post(cluster["url"], queries)
        got = np.stack([logged(experiences, f"reward_raw/{n}") for n in names], axis=1)
        np.testing.assert_allclose(got[:, :2], plain, atol=5e-3)  # bf16: batched and padded vs one by one
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


def test_reward_func_route_combines_the_raw_values_in_the_trainer(cluster, tiny, tiny_gpu):
    args = cluster["no_model"]
    env = {worker.CONFIG_ENV: json.dumps(args.bonesoup)}  # what this launch's runtime_env would carry
    steps, responses, models = rollouts.rollout_steps(args, tiny_gpu["policy"], env=env)
    assert models == []  # our reward_func file loaded no model in the rollout process
    assert set(responses[0]["extra_logs"]) == {"reward_raw/remote", "reward_raw/format"}

    made = ray.get(rollouts.make_experiences.remote(get_strategy(args), steps, None))
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


KEEP = """import torch
def reward_func(queries, prompts, labels):
    return torch.tensor([1.0 if label == "keep" else 0.0 for label in labels])
"""
ZERO = "def reward_func(queries, prompts, labels):\n    return [0.0 for _ in queries]\n"


def test_dynamic_filtering_keeps_the_prompts_whose_mean_h_j_is_in_range(cluster, tiny, tiny_gpu, tmp_path):
    """`--algo.dynamic_filtering_enable` on the reward_func route: upstream's SamplesGenerator drops each prompt
    whose samples' mean rollout-side score is outside the range and draws a replacement. Our file sets that
    score to h_0 = 0.7 keep + 0.3 zero: 0.7 for prompts labelled "keep", inside (0.5, 0.9), 0 for the others.
    On either raw objective alone (1.0 or 0.0) every prompt would be dropped."""
    for name, code in (("keep", KEEP), ("zero", ZERO)):
        (tmp_path / f"{name}.py").write_text(code)
    specs = [{"name": name, "path": str(tmp_path / f"{name}.py")} for name in ("keep", "zero")]
    (tmp_path / "o.yaml").write_text(json.dumps(specs))
    argv = rollouts.launch_argv(tiny["policy"], tmp_path / "o.yaml")
    argv += ["--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0.5", "0.9"]
    _, args = launcher.resolve([*argv, "--rollout.n_samples_per_prompt", "2"])
    prompts = [p for p, _ in PROMPTS[:6]]
    labels = ["keep", "drop", "keep", "drop", "keep", "drop"]
    batches = iter([(None, [p], [label], [None]) for p, label in zip(prompts, labels, strict=True)])
    env = {worker.CONFIG_ENV: json.dumps(args.bonesoup)}  # what the launch's runtime_env carries
    engine = rollouts.engine_actor(tiny_gpu["policy"], args.reward.remote_url, env)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gpu["policy"]))
    try:
        generator = SamplesGenerator(get_strategy(args), None, None, tokenizer, [engine])
        kwargs = {"temperature": 1.0, "max_new_tokens": 4, "max_len": 64}
        accepted, consumed, exhausted = generator._generate_vllm(batches, 4, dynamic_filtering=True, **kwargs)
    finally:
        ray.kill(engine)
    # 4 prompts sent, the 2 dropped replaced by prompts 5 and 6, prompt 6 dropped with nothing left to draw
    assert consumed == 6 and exhausted
    assert sorted(e.prompts[0] for e in accepted) == sorted(2 * [prompts[0], prompts[2], prompts[4]])
    assert [e.scores[0].item() for e in accepted] == pytest.approx([0.7] * 6)
    assert [e.info["reward_raw/keep"].item() for e in accepted] == [1.0] * 6  # the trainer combines these


AGENT = Path(__file__).with_name("two_turn_agent.py")  # two turns, rewards 5 then 2
LENGTH = "def reward_func(queries, prompts, labels):\n    return [len(q) / 100 for q in queries]\n"


def test_an_agents_episodes_are_scored_by_the_objectives(cluster, tiny, tiny_gpu, tmp_path):
    """`--train.agent_func_path` on the reward_func route: OpenRLHF's vLLM engine actor loads the agent file, runs
    its two-turn episode (each turn ends at a vowel; the environment's feedback appended to the trajectory),
    and the worker hook has the objectives score the final trajectory: reward and score are
    h_0 = 0.7 length + 0.3 keep, the agent's own reward is only logged."""
    for name, code in (("length", LENGTH), ("keep", KEEP)):
        (tmp_path / f"{name}.py").write_text(code)
    specs = [{"name": name, "path": str(tmp_path / f"{name}.py")} for name in ("length", "keep")]
    (tmp_path / "o.yaml").write_text(json.dumps(specs))
    argv = [
        *rollouts.launch_argv(tiny["policy"], tmp_path / "o.yaml"),
        "--train.agent_func_path",
        str(AGENT),
    ]
    _, args = launcher.resolve(argv)
    env = {worker.CONFIG_ENV: json.dumps(args.bonesoup)}
    engine = rollouts.engine_actor(tiny_gpu["policy"], None, env, agent_func_path=args.train.agent_func_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gpu["policy"]))
    from vllm import SamplingParams

    try:
        outputs = ray.get(
            engine.generate_responses.remote(
                PROMPTS[0][0], "keep", SamplingParams(temperature=0.0, stop=list("aeiou")), 64, tokenizer, 2
            )
        )
    finally:
        ray.kill(engine)
    for output in outputs:
        query = tokenizer.decode(output["observation_tokens"], skip_special_tokens=False)
        assert query.startswith(PROMPTS[0][0]) and query.endswith(" Checked.")  # the whole episode, both turns
        assert query.count(" Again:") == 1 and len(output["action_ranges"]) == 2
        assert output["reward"] == pytest.approx(0.7 * len(query) / 100 + 0.3 * 1.0, rel=1e-6)
        assert output["scores"] == output["reward"]
        logs = output["extra_logs"]
        assert logs["reward_raw/length"] == pytest.approx(len(query) / 100) and logs["reward_raw/keep"] == 1.0
        assert logs["agent_reward"] == 7.0  # the episode's sum, logged, not trained on


# --- each objective's own attention, beside OpenRLHF's default flags --------------------------------


def attention_of(actor) -> list[tuple[str, str]]:
    """Run inside a reward actor (__ray_call__): each model objective's attention implementation."""
    return [(o.name, o.model.config._attn_implementation) for o in actor.objectives if o.kind == "model"]


def test_a_deberta_classifier_scores_beside_openrlhfs_default_attention(cluster, tiny, tmp_path):
    """OpenRLHF's default `--ds.attn_implementation` is flash_attention_2, which DeBERTa-v2 (like sdpa) does
    not support: the reward actor loads each objective with the attention its model supports."""
    specs = [{"name": "helpful", "path": str(tiny["rm_llama"])}, {"name": "safe", "path": str(tiny["deberta"])}]
    specs[1]["label"] = 1
    (tmp_path / "objectives.yaml").write_text(json.dumps(specs))
    argv = rollouts.launch_argv(tiny["policy"], tmp_path / "objectives.yaml")
    del argv[argv.index("--ds.attn_implementation") : argv.index("--ds.attn_implementation") + 2]
    _, args = launcher.resolve(argv)
    assert args.ds.attn_implementation == "flash_attention_2"  # upstream's default, left as it is
    group = RayActorGroup(1, 1, bonesoup_actor.RewardModelActor, num_gpus_per_actor=0)
    ray.get(group.async_run_method("load_objectives", get_strategy(args), args.reward.model_name_or_path))
    assert ray.get(group.async_run_method("__ray_call__", attention_of)) == [[("helpful", "sdpa"), ("safe", "eager")]]

    policy = AutoTokenizer.from_pretrained(str(tiny["policy"]))
    texts = ["Human: How do I bake bread? Assistant: knead", "Human: Tell me a joke. Assistant: no"]
    batch = policy([t + policy.eos_token for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)
    refs = group.async_run_method_batch(
        "forward", sequences=[batch["input_ids"]], attention_mask=[batch["attention_mask"]],
        prompts=[texts], labels=[[None, None]],
    )  # fmt: skip
    (got,) = ray.get(refs)[0]
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["deberta"]), dtype=torch.bfloat16).eval()
    own = AutoTokenizer.from_pretrained(str(tiny["deberta"]))
    with torch.no_grad():  # the classifier's plain forward on the text without the policy's special tokens
        want = [model(**own(t, return_tensors="pt")).logits[0, 1].float().item() for t in texts]
    np.testing.assert_allclose(got[:, 1].numpy(), want, atol=5e-3)


# --- ring attention / DeepSpeed tensor parallelism: duplicate ranks --------------------------------


class Counting(http.server.BaseHTTPRequestHandler):
    """An endpoint of OpenRLHF's remote RM protocol that counts its calls: reward = len(query)."""

    calls: list[int] = []

    def do_POST(self):
        queries = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"]
        Counting.calls.append(len(queries))
        body = json.dumps({"rewards": [float(len(q)) for q in queries]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


COUNTED_RULES = """
def reward_func(queries, prompts, labels):
    with open({log!r}, "a") as f:  # one line per call, in whichever process runs it
        f.write(f"{{len(queries)}}\\n")
    return [2.0 * len(q) for q in queries]
"""


def join_on_gloo(actor) -> None:
    """Run inside a reward actor: torch.distributed on gloo (DeepSpeed's set-up, setup_distributed, needs CUDA),
    then the plugin's duplicate group, as init_model_from_pretrained does after it."""
    torch.distributed.init_process_group("gloo")
    actor.join_duplicates()


def test_duplicate_ranks_call_endpoints_and_functions_once_per_micro_batch(cluster, tiny, actor_steps, tmp_path):
    """`--ds.ring_attn_size 2`: upstream builds the reward group with duplicate_actors = 2 and hands both ranks
    every micro-batch. The RM runs on both; the endpoint and the reward_func once, and both ranks return
    the first rank's values."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log = tmp_path / "calls.log"
    (tmp_path / "counted.py").write_text(COUNTED_RULES.format(log=str(log)))
    specs = [
        {"name": "helpful", "path": str(tiny["rm_llama"])},
        {"name": "remote", "url": f"http://127.0.0.1:{server.server_address[1]}/get_reward"},
        {"name": "rules", "path": str(tmp_path / "counted.py")},
    ]
    (tmp_path / "objectives.yaml").write_text(json.dumps(specs))
    _, args = launcher.resolve(rollouts.launch_argv(tiny["policy"], tmp_path / "objectives.yaml"))
    args.ds.ring_attn_size = 2  # after the launcher's checks: upstream's would ask for packing and vLLM
    strategy = get_strategy(args)
    rewards = RayActorGroup(2, 1, bonesoup_actor.RewardModelActor, num_gpus_per_actor=0, duplicate_actors=2)
    try:
        ray.get(rewards.async_run_method("load_objectives", strategy, args.reward.model_name_or_path))
        ray.get(rewards.async_run_method("__ray_call__", join_on_gloo))
        Counting.calls.clear()
        steps, _ = actor_steps
        made = ray.get(rollouts.make_experiences.remote(strategy, steps, rewards))
        # 2 steps of 2 micro-batches of 2: each endpoint and function called 4 times with 2 queries
        assert Counting.calls == [2, 2, 2, 2]
        assert log.read_text().split() == ["2"] * 4
        policy = AutoTokenizer.from_pretrained(str(tiny["policy"]))
        for samples, experiences in zip(steps, made, strict=True):
            queries = queries_of(policy, samples)
            np.testing.assert_allclose(logged(experiences, "reward_raw/remote"), [len(q) for q in queries])
            np.testing.assert_allclose(logged(experiences, "reward_raw/rules"), [2 * len(q) for q in queries])

        # Every rank of the group returns the same values: the RM's, and the first rank's endpoint and rules
        micro = Experience.concat_experiences(steps[0][:2], policy.pad_token_id)  # as split_rollout_samples
        refs = rewards.async_run_method_batch(
            "forward", sequences=[micro.sequences], attention_mask=[micro.attention_mask],
            prompts=[micro.prompts], labels=[micro.labels],
        )  # fmt: skip
        (first,), (second,) = ray.get(refs)
        assert torch.equal(first, second) and first.shape == (2, 3)
        assert Counting.calls[4:] == [2] and log.read_text().split() == ["2"] * 5
    finally:
        server.shutdown()
        for actor in rewards._actor_handlers:  # their gloo group ends with them
            ray.kill(actor)
