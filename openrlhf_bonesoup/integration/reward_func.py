"""OpenRLHF `reward_func` file: `--reward.remote_url <this file>` when no objective holds a model.

The launcher selects this file only when every objective is an HTTP endpoint or a reward_func file
without `gpu: true`: then there is no model to load, and nothing here touches a GPU. OpenRLHF's
rollout workers (openrlhf/utils/agent.py, SingleTurnAgentExecutor) load it by path and call
`reward_func(queries, prompts, labels)` from threads, one sample per call; the objectives come in
the Ray runtime_env (integration/worker.py, CONFIG_ENV).

It returns the raw per-objective values in `extra_logs` (`reward_raw/<name>`): the trainer-side
make_experience patch normalises and combines them once per step for training. `rewards` is the
combination without running statistics (a rollout process never sees the others' samples); only
OpenRLHF's evaluation reads it, and the launcher refuses evaluation with running normalisation.
A failure is logged at ERROR and raised; the worker hook turns upstream's missing reward into an error.
"""

from __future__ import annotations

import logging
import threading

import torch

from openrlhf_bonesoup import combiners, objectives, scoring
from openrlhf_bonesoup.integration import worker

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


def _load() -> dict:
    # Once per rollout process; the lock keeps concurrent first calls from loading twice.
    with _lock:
        if not _state:
            config = worker.config()
            specs = objectives.parse_objectives(config["objectives"])
            if objectives.needs_reward_actors(specs):
                raise RuntimeError("objectives with models are scored by the reward actors, never in a rollout process")
            combination = combiners.Combination(specs, config["weights"])
            _state.update(objectives=objectives.load_objectives(specs), combination=combination)
        return _state


def reward_func(queries: list[str], prompts: list[str], labels: list) -> dict:
    state = _load()
    try:
        raw = scoring.raw_scores(state["objectives"], queries=queries, prompts=prompts, labels=labels)
    except Exception as e:
        logger.error("Bone Soup reward_func failed: %r", e)
        raise
    reward, _ = state["combination"](raw, update=False)
    reward = torch.from_numpy(reward).float()
    return {
        "rewards": reward,
        "scores": reward,
        "extra_logs": {f"reward_raw/{o.name}": float(raw[0, i]) for i, o in enumerate(state["objectives"])},
    }
