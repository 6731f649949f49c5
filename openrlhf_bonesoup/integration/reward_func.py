"""OpenRLHF `reward_func` file: `--reward.remote_url <this file>` scores every objective and combines.

OpenRLHF's rollout workers (openrlhf/utils/agent.py, SingleTurnAgentExecutor) load this file by path
and call `reward_func(queries, prompts, labels)` from threads, one sample per call. The launcher
selects this file itself when an objective is an HTTP endpoint or a function, and passes the
objectives and combiner in the Ray runtime_env (integration/worker.py, CONFIG_ENV).

Each call scores all objectives with the same code as the in-cluster actor (objectives.raw_scores;
HTTP endpoints concurrently, each retried a bounded number of times), combines them and returns
OpenRLHF's dict with the per-objective values in `extra_logs` (logged as `reward/<name>`). A failure
is logged at ERROR and raised; upstream would only log it, so the worker hook turns the missing
reward into an error.
"""

from __future__ import annotations

import logging
import threading

import torch

from openrlhf_bonesoup import objectives
from openrlhf_bonesoup.integration import worker

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def _load() -> dict:
    # Once per rollout process; the lock keeps concurrent first calls from loading twice.
    with _lock:
        if not _state:
            config = worker.config()
            load = config.get("load", {})
            specs = objectives.parse_objectives(config["objectives"])
            policy = None
            if any(s["kind"] == "model" for s in specs):
                from openrlhf.utils import get_tokenizer

                policy = get_tokenizer(config["policy"], None, "left", None, use_fast=load.get("use_fast", True))
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model_kwargs = {k: v for k, v in load.items() if k != "use_fast"}
            _state.update(
                objectives=objectives.load_objectives(
                    specs, policy_tokenizer=policy, device=device, model_kwargs=model_kwargs
                ),
                weights=torch.tensor(config["weights"], dtype=torch.float64),
                policy=policy,
            )
        return _state


def reward_func(queries: list[str], prompts: list[str], labels: list) -> dict:
    state = _load()
    objs, policy = state["objectives"], state["policy"]
    try:
        policy_ids = None
        if policy is not None:
            # The query is upstream's decode of the rollout ids, special tokens kept; re-encoding it
            # gives those ids back (what openrlhf.cli.serve_rm does with a query).
            batch = policy(list(queries), add_special_tokens=False, padding=True, return_tensors="pt")
            policy_ids = (batch["input_ids"], batch["attention_mask"])
        raw = objectives.raw_scores(
            objs, policy_ids=policy_ids, policy_tokenizer=policy, queries=queries, prompts=prompts, labels=labels
        )
    except Exception as e:
        logger.error("Bone Soup reward_func failed: %r", e)
        raise
    values = torch.from_numpy(objectives.normalize(objs, raw))
    reward = (values @ state["weights"]).float()
    return {
        "rewards": reward,
        "scores": reward,
        "extra_logs": {f"reward/{o.name}": values[:, i].float() for i, o in enumerate(objs)},
    }
