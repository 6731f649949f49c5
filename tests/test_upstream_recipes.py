"""OpenRLHF's own RL recipes take the Bone Soup flags (tests/upstream_recipes, run by bash as written).

Each of the five scripts' flags, with models, data, sizes and paths swapped for tiny local ones
(tests/upstream.py) and the objectives given the way that recipe gives its reward, plus `--cpu
--reward_combiner bonesoup --beta 0.7 --backbone_index 0 --soup_dir DIR`, goes through the launcher's
dry run on OpenRLHF 0.11.2's own parser: none is refused, the objectives are the recipe's reward
given as several, and every GPU-only option the recipe sets is turned off by `--cpu` in one line, not
refused. Then four train 2 steps for real; the PPO hybrid-engine recipe trains as test_launch.py's backbone 1,
through OpenRLHF's own launcher (patched), on that soup's three objectives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import upstream
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from openrlhf_bonesoup import soup
from openrlhf_bonesoup.demo import tiny
from openrlhf_bonesoup.integration import cpu, launcher

CUDA = torch.cuda.is_available()
OURS = [sys.executable, "-m", "openrlhf_bonesoup.cli.train_ppo_ray"]
BONESOUP = ["--cpu", "--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"]
# The objectives of the reward-function recipes: `correct` reads the label as a math verifier would, `length`
# is small and positive, so every h_j = 0.7 correct + 0.3 length lies inside the recipes' filtering range (0, 1).
CORRECT = 'def reward_func(queries, prompts, labels):\n    return [float(x == "bonus") for x in labels]\n'
LENGTH = "def reward_func(queries, prompts, labels):\n    return [len(q) / 1000 for q in queries]\n"
GPU_ONLY = {  # what each recipe sets that --cpu turns off (integration CPU_OFF), as "option": value on the CPU
    "ds.packing_samples": False,
    "train.dynamic_batch_enable": False,
    "vllm.enable_sleep": False,
    "ds.enable_sleep": False,
    "vllm.sync_backend": "gloo",
    "ds.ring_attn_size": 1,
    "vllm.tensor_parallel_size": 1,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    paths = tiny.make_rehearsal(root)
    paths["rm2"] = root / "rm2"
    tiny.make_openrlhf_rm(paths["rm2"], paths["policy"], seed=5)
    for name, code in (("correct", CORRECT), ("length", LENGTH)):
        paths[name] = root / f"{name}.py"
        paths[name].write_text(code)
    paths["reward_objectives"] = root / "reward_objectives.json"
    specs = [{"name": name, "path": str(paths[name])} for name in ("correct", "length")]
    paths["reward_objectives"].write_text(json.dumps(specs))
    return paths


def objectives(recipe: str, models: dict, agent: Path | None = None) -> dict[str, list[str]]:
    """The recipe's reward swapped for objectives, given as that recipe gives its reward."""
    if recipe == "ppo_rm":  # reward models: --reward.model_name_or_path A,B
        return {"--reward.model_name_or_path": [f"{models['rm']},{models['rm2']}"]}
    if recipe == "agent_async":  # the agent's episodes, scored by the objectives of --objectives
        return {
            "--train.agent_func_path": [str(agent or "agent.py")],
            "--objectives": [str(models["reward_objectives"])],
        }
    return {"--reward.remote_url": [f"{models['correct']},{models['length']}"]}  # reward_func files


def command(recipe: str, models: dict, tmp: Path, agent: Path | None = None) -> list[str]:
    """The launcher's flags for a rehearsal of `recipe` (OURS + these is the whole command)."""
    argv = upstream.rehearsal(recipe, tmp, models["policy"], models["prompts"], tmp / "out")
    swaps = objectives(recipe, models, agent)
    argv = upstream.replace(argv, swaps)
    argv += [word for flag, words in swaps.items() if flag not in argv for word in (flag, *words)]
    return [*argv, *BONESOUP, "--soup_dir", str(tmp / "soup")]


@pytest.mark.parametrize("recipe", sorted(upstream.NAMES))
def test_every_recipe_takes_the_flags(recipe, models, tmp_path):
    written = upstream.recipe_argv(recipe, tmp_path)
    plan, _ = launcher.resolve(command(recipe, models, tmp_path))  # the dry run, on OpenRLHF's own parser
    names = {"ppo_rm": ["rm", "rm2"]}.get(recipe, ["correct", "length"])
    assert [o["name"] for o in plan["bonesoup"]["objectives"]] == names
    assert plan["bonesoup"]["weights"] == [0.7, 0.3]
    # every GPU-only option the recipe sets is turned off, with its reason, not refused
    checked = 0
    for option, now in GPU_ONLY.items():
        words = upstream.values(written, f"--{option}")  # [] for a switch the recipe turns on
        if words is not None and words != [str(now)]:
            assert plan["cpu"][option][1:] == [now, cpu.CPU_OFF[option][1]], (option, plan["cpu"])
            checked += 1
    assert checked >= 1  # every one of the five sets some (packing, sleep modes, NCCL, tensor parallel...)


# --- the five recipes, trained: 2 steps each, on CPU ----------------------------------------------------------

AGENT = Path(__file__).with_name("two_turn_agent.py")  # two turns, rewards 5 then 2
# DAPO's overlong penalty, which its recipe leaves out: with a buffer as long as max_new_tokens, a response of
# L tokens loses L / 16 * 0.5.
OVERLONG = ["--reward.overlong_buffer_len", "16", "--reward.overlong_penalty_factor", "0.5"]


def launch(recipe: str, models: dict, tmp: Path, extra: list[str] = ()) -> dict[str, dict[int, float]]:
    """Trains backbone 0 of the recipe for 2 steps; checks what every recipe must show; returns the logs."""
    argv = upstream.replace(command(recipe, models, tmp, AGENT), dict.fromkeys(extra[::2]))
    command_line = [*OURS, *argv, *extra]
    with open(tmp / "log", "w") as out:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run(command_line, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=1500)
    assert done.returncode == 0, (tmp / "log").read_text()[-8000:]

    backbone = soup.read_soup(tmp / "soup")["backbones"][0]
    assert backbone["status"] == "trained" and backbone["checkpoint"] == str((tmp / "out" / "backbone").resolve())
    logs = scalars(tmp / "out" / "tb")
    names = {"ppo_rm": ["rm", "rm2"]}.get(recipe, ["correct", "length"])
    assert set(logs["train/reward"]) == {1, 2} and all(set(logs[f"train/reward/{n}"]) == {1, 2} for n in names)
    return logs


def moved(models: dict, checkpoint: Path) -> bool:
    """Whether training changed a weight: the SFT policy (fp32) rounded as the checkpoint is saved (bf16 from
    `--ds.param_dtype bf16`) differs from it, so rounding alone never counts as moving."""
    saved = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype="auto").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(str(models["policy"])).state_dict()
    return any(not torch.equal(sft[k].to(saved[k].dtype), saved[k]) for k in sft)


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard run under `log_dir`: {tag: {step: value}}."""
    (run,) = {p.parent for p in log_dir.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def h0(logs: dict, names: list[str], step: int) -> float:
    return 0.7 * logs[f"train/reward/{names[0]}"][step] + 0.3 * logs[f"train/reward/{names[1]}"][step]


@pytest.mark.skipif(CUDA, reason="rehearsals of multi-GPU recipes with --cpu")
def test_the_ppo_recipe_with_reward_functions_trains_on_h_j(models, tmp_path):
    """PPO (GAE) with reward functions given as --reward.remote_url a.py,b.py, actor and reference colocated,
    DeepSpeed's optimizer offload, ZeRO 3."""
    logs = launch("ppo_reward_fn", models, tmp_path)
    assert moved(models, tmp_path / "out" / "backbone")
    for step in (1, 2):
        assert logs["train/reward"][step] == pytest.approx(h0(logs, ["correct", "length"], step), rel=1e-4, abs=1e-5)


@pytest.mark.skipif(CUDA, reason="rehearsals of multi-GPU recipes with --cpu")
def test_the_dapo_recipe_filters_and_penalises_h_j(models, tmp_path):
    """DAPO (group_norm, dynamic filtering on h_j, k3 KL loss, clip-higher), colocated, ZeRO 3, with DAPO's
    overlong penalty, which upstream's trainer applies to h_j as to its one reward."""
    logs = launch("dapo", models, tmp_path, OVERLONG)
    assert moved(models, tmp_path / "out" / "backbone")
    for step in (1, 2):
        penalty = 0.5 * logs["train/rollout/response_length_mean"][step] / 16  # the mean of L / 16 * 0.5
        assert penalty > 0
        want = h0(logs, ["correct", "length"], step) - penalty
        assert logs["train/reward"][step] == pytest.approx(want, rel=1e-4, abs=1e-5)
        # every h_j lies inside the recipe's range (0, 1): the filter kept all, 2 samples per prompt drawn
        assert logs["train/dynamic_filtering_pass_rate"][step] == 200.0


@pytest.mark.skipif(CUDA, reason="rehearsals of multi-GPU recipes with --cpu")
def test_the_prorl_v2_recipe_trains_on_h_j(models, tmp_path):
    """ProRL-v2 (REINFORCE++-baseline, dynamic filtering, k2 KL loss, ICEPOP correction, the stop-properly
    penalty at 0: a truncated response's reward becomes 0), colocated, ZeRO 3."""
    logs = launch("prorl_v2", models, tmp_path)
    assert moved(models, tmp_path / "out" / "backbone")
    for step in (1, 2):
        truncated = logs["train/rollout/truncated_rate"][step]
        # Upstream sets each truncated response's reward, h_j here, to the coefficient 0 after the combination:
        # exact in the logged means where no or every response was truncated (a tiny random policy at 16 new
        # tokens: every one, in the runs of 2026-12-08); between, the mean can only fall below h_0's.
        assert h0(logs, ["correct", "length"], step) > 0  # the objectives were scored, then zeroed
        if truncated in (0.0, 1.0):
            want = (1 - truncated) * h0(logs, ["correct", "length"], step)
            assert logs["train/reward"][step] == pytest.approx(want, rel=1e-4, abs=1e-5)
        else:
            assert logs["train/reward"][step] <= h0(logs, ["correct", "length"], step) + 1e-5


@pytest.mark.skipif(CUDA, reason="rehearsals of multi-GPU recipes with --cpu")
def test_the_async_agent_recipe_trains_on_the_episodes_h_j(models, tmp_path):
    """REINFORCE++-baseline with a multi-turn agent (upstream's AgentExecutor API), async with partial rollouts,
    dynamic filtering, colocated, ZeRO 3: the objectives score each two-turn episode (prompt, both actions,
    the environment's feedback), the backbone trains on h_0, and the agent's own reward (5, then 2) is only logged."""
    logs = launch("agent_async", models, tmp_path)
    assert moved(models, tmp_path / "out" / "backbone")
    assert "(PPOTrainerAsync pid=" in (tmp_path / "log").read_text()  # upstream's async trainer
    shortest = min(len(json.loads(line)["input"]) for line in models["prompts"].read_text().splitlines())
    for step in (1, 2):
        assert logs["train/reward"][step] == pytest.approx(h0(logs, ["correct", "length"], step), rel=1e-4, abs=1e-5)
        # the agent's own reward, logged, not trained on: 5 + 2 for an episode of both turns, 5 for one that
        # reached its length budget in the first (the mean was 6.0 in a run, 2026-12-08); h_0 is at most 1
        assert 5.0 <= logs["train/agent_reward"][step] <= 7.0 and logs["train/reward"][step] < 1.0
        # `length` scored whole episodes: each holds a prompt and the environment's first feedback at least
        assert logs["train/reward/length"][step] > (shortest + len(" Again:")) / 1000
