"""An agent file in OpenRLHF's AgentExecutor API (`--train.agent_func_path`), for the agent tests: two turns;
the environment answers each (" Again:", then " Checked.") and rewards 5, then 2."""

import torch
from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor


class AgentInstance(AgentInstanceBase):  # two turns: the environment answers each, rewards 5 then 2
    def __init__(self, *args, **kwargs):
        self.turn = 0

    async def reset(self, states, **kwargs):
        return {"observation": states["observation"]}

    async def step(self, states, **kwargs):
        self.turn += 1
        done = self.turn == 2
        return {
            "rewards": torch.tensor(5.0 if self.turn == 1 else 2.0),
            "scores": torch.tensor(1.0),
            "environment_feedback": " Checked." if done else " Again:",
            "done": done,
            "sampling_params": states["sampling_params"],
            "extra_logs": {},
        }


class AgentExecutor(MultiTurnAgentExecutor):
    def __init__(self):
        super().__init__(AgentInstance)
