"""OpenRLHF's own RL recipes take the Bone Soup flags (tests/upstream_recipes, run by bash as written).

Each of the five scripts' flags, with models, data, sizes and paths swapped for tiny local ones
(tests/upstream.py) and the objectives given the way that recipe gives its reward, plus `--cpu
--reward_combiner bonesoup --beta 0.7 --backbone_index 0 --soup_dir DIR`, goes through the launcher's
dry run on OpenRLHF 0.11.2's own parser: none is refused, the objectives are the recipe's reward
given as several, and every GPU-only option the recipe sets is turned off by `--cpu` in one line, not
refused. test_launch.py trains real launches of these recipes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import upstream

from openrlhf_bonesoup.demo import tiny
from openrlhf_bonesoup.integration import launcher

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
    for option, now in GPU_ONLY.items():
        words = upstream.values(written, f"--{option}")  # [] for a switch the recipe turns on
        if words is not None and words != [str(now)]:
            assert plan["cpu"][option][1] == now, (option, plan["cpu"])
            assert plan["cpu"][option][2]  # the printed reason
