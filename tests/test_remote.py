"""The rollout-side reward_func route (no model objective) against real `openrlhf.cli.serve_rm` servers.

OpenRLHF's own SingleTurnAgentExecutor loads our reward_func file (as its rollout workers do for
`--reward.remote_url <file>.py`). A failing endpoint is a local HTTP server that answers 500 and
counts the requests it got. The trainer-side combination of this route runs in test_integration_ray.py.
"""

from __future__ import annotations

import http.server
import json
import threading
from types import SimpleNamespace

import pytest
import rollouts
from openrlhf.utils import agent

from openrlhf_bonesoup.integration import launcher, reward_func, worker

PROMPTS = ["Human: How do I bake bread? Assistant:", "Human: Tell me a joke. Assistant:"]
RULES = "def reward_func(queries, prompts, labels):\n    return [10.0 if l == 'bonus' else 1.0 for l in labels]\n"


@pytest.fixture(scope="module")
def servers(tiny):
    """serve_rm for rm_llama and rm_gpt2 (started together), and a failing endpoint."""
    hits = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            hits.append(self.path)
            self.send_error(500, "reward model crashed")

        def log_message(self, *args):
            pass

    failing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=failing.serve_forever, daemon=True).start()
    try:
        with rollouts.serve_rm(tiny["rm_llama"], tiny["rm_gpt2"]) as (llama, gpt2):
            urls = {"rm_llama": llama, "rm_gpt2": gpt2, "failing": f"http://127.0.0.1:{failing.server_address[1]}/x"}
            yield SimpleNamespace(urls=urls, hits=hits)
    finally:
        failing.shutdown()


@pytest.fixture
def config(monkeypatch):
    """Set the launch config the launcher would put in the Ray runtime_env; a fresh rollout process."""

    def set_config(objective_specs, weights):
        cfg = {"objectives": objective_specs, "weights": weights, "route": worker.ROUTE_REWARD_FUNC}
        monkeypatch.setenv(worker.CONFIG_ENV, json.dumps(cfg))
        monkeypatch.setattr(reward_func, "_state", {})

    return set_config


def executor():
    """OpenRLHF's executor with `--reward.remote_url <our reward_func.py>`: it loads the file itself."""
    return agent.SingleTurnAgentExecutor(remote_rm_url=[launcher.REWARD_FUNC_FILE])


def test_reward_func_returns_raw_values_and_a_combination_without_running_statistics(servers, config, tmp_path):
    urls = servers.urls
    (tmp_path / "rules.py").write_text(RULES)
    config(
        [
            {"name": "helpful", "url": urls["rm_llama"], "normalize": "running"},
            {"name": "harmless", "url": urls["rm_gpt2"], "normalize": {"mean": 1.0, "std": 4.0}},
            {"name": "format", "path": str(tmp_path / "rules.py")},  # reads the dataset label
        ],
        [0.5, 0.3, 0.2],
    )
    reward = executor().reward_func
    queries = [PROMPTS[0] + " Mix and bake.</s>"]
    helpful, harmless = rollouts.post(urls["rm_llama"], queries)[0], rollouts.post(urls["rm_gpt2"], queries)[0]
    for _ in range(2):  # a rollout process keeps no statistics: the same sample, the same reward
        out = reward(queries, PROMPTS[:1], ["bonus"])
        assert out["extra_logs"] == pytest.approx(
            {"reward_raw/helpful": helpful, "reward_raw/harmless": harmless, "reward_raw/format": 10.0}, abs=1e-6
        )
        # running: no statistics here (mean 0, std 1); the trainer normalises the raw values
        want = 0.5 * helpful + 0.3 * (harmless - 1.0) / 4.0 + 0.2 * 10.0
        assert out["rewards"].tolist() == pytest.approx([want], abs=1e-6)
        assert out["scores"].tolist() == out["rewards"].tolist()
    state = reward.__globals__["_state"]  # OpenRLHF loaded the file by path: its own module
    assert [o.kind for o in state["objectives"]] == ["http", "http", "function"]
    assert all(o.model is None for o in state["objectives"])  # no model in a rollout process


def test_the_rollout_side_reward_func_refuses_model_objectives(tiny, config):
    config([{"name": "m", "path": str(tiny["rm_llama"])}], [1.0])
    with pytest.raises(RuntimeError, match="never in a rollout process"):
        reward_func.reward_func(["q"], ["p"], [None])
    assert reward_func._state == {}  # nothing loaded


def test_failing_endpoint_is_retried_then_raises(servers, config):
    config(
        [
            {"name": "ok", "url": servers.urls["rm_llama"]},
            {"name": "down", "url": servers.urls["failing"], "retries": 2},
        ],
        [0.5, 0.5],
    )
    reward = executor().reward_func
    before = len(servers.hits)
    with pytest.raises(RuntimeError, match="objective down: .* gave no reward within 180 s \\(3 attempts\\)"):
        reward([PROMPTS[0] + " hi"], [PROMPTS[0]], [None])
    assert len(servers.hits) - before == 3  # one try and two retries, then no more


@pytest.fixture
def hooked(monkeypatch):
    """The worker hook's patch of SingleTurnAgentExecutor, undone after the test."""
    monkeypatch.setattr(agent.SingleTurnAgentExecutor, "execute", agent.SingleTurnAgentExecutor.execute)
    worker._patch_agent(agent)


@pytest.fixture(scope="module")
def engine(tiny_gpu):
    """OpenRLHF's vLLM engine actor (vLLM's CPU build here) on the vLLM-sized tiny policy."""
    with rollouts.vllm_engine(tiny_gpu["policy"]) as engine:
        yield engine


def test_upstream_alone_swallows_a_failing_reward(servers, config, engine):
    config(
        [
            {"name": "down", "url": servers.urls["failing"], "retries": 0},
            {"name": "ok", "url": servers.urls["rm_gpt2"]},
        ],
        [0.5, 0.5],
    )
    output = rollouts.execute(executor(), engine, PROMPTS[0])
    assert output["reward"] is None  # what the worker hook exists for


def test_rollout_through_openrlhf_executor_with_the_hook(servers, config, engine, hooked):
    urls = servers.urls
    config([{"name": "helpful", "url": urls["rm_llama"]}, {"name": "harmless", "url": urls["rm_gpt2"]}], [0.7, 0.3])
    output = rollouts.execute(executor(), engine, PROMPTS[1])
    query = engine.tokenizer.decode(output["observation_tokens"], skip_special_tokens=False)
    helpful, harmless = rollouts.post(urls["rm_llama"], [query])[0], rollouts.post(urls["rm_gpt2"], [query])[0]
    assert output["reward"].tolist() == pytest.approx([0.7 * helpful + 0.3 * harmless], abs=1e-6)
    assert output["extra_logs"]["reward_raw/helpful"] == pytest.approx(helpful, abs=1e-6)
    assert output["extra_logs"]["reward_raw/harmless"] == pytest.approx(harmless, abs=1e-6)

    config([{"name": "down", "url": urls["failing"], "retries": 0}, {"name": "ok", "url": urls["rm_gpt2"]}], [0.5, 0.5])
    with pytest.raises(RuntimeError, match="no reward from"):
        rollouts.execute(executor(), engine, PROMPTS[0])
