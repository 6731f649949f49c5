"""OpenRLHF's own RL recipes (tests/upstream_recipes/*.sh), rehearsed with the Bone Soup flags.

Each script is run by bash as written, with `python3` and `ray` on PATH replaced by shims that record the
argv it hands `python3 -m openrlhf.cli.train_ppo_ray` (bash expands its variables and arrays, as for a
user). `rehearsal` then swaps what a test machine must swap (models, data, sizes, paths) and leaves every
other flag as the recipe wrote it; `--cpu` turns the GPU-only ones off itself, one printed line each.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "upstream_recipes"
NAMES = {  # recipe -> the script upstream ships
    "ppo_rm": "train_ppo_ray_hybrid_engine.sh",
    "ppo_reward_fn": "train_ppo_with_reward_fn.sh",
    "dapo": "train_dapo_ray_hybrid_engine.sh",
    "prorl_v2": "train_prorlv2_math_hybrid_engine.sh",
    "agent_async": "train_reinforce_baseline_ray_agent_async.sh",
}
PYTHON_SHIM = '#!/bin/sh\nprintf "%s\\0" "$@" > "$RECIPE_ARGV"\n'
RAY_SHIM = '#!/bin/sh\nwhile [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n'


def recipe_argv(name: str, tmp: Path) -> list[str]:
    """The flags the recipe passes to OpenRLHF's train_ppo_ray, as bash expands them."""
    shims = tmp / "shims"
    shims.mkdir(exist_ok=True)
    for shim, text in (("python3", PYTHON_SHIM), ("ray", RAY_SHIM)):
        (shims / shim).write_text(text)
        (shims / shim).chmod(0o755)
    out = tmp / f"{name}.argv"
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "RECIPE_ARGV": str(out)}
    subprocess.run(["bash", str(RECIPES / NAMES[name])], env=env, check=True, capture_output=True)
    words = out.read_bytes().decode().split("\0")[:-1]
    assert words[:2] == ["-m", "openrlhf.cli.train_ppo_ray"], words[:4]
    return words[2:]


def values(argv: list[str], flag: str) -> list[str] | None:
    """The words after `flag` up to the next flag; None when the recipe does not set it."""
    if flag not in argv:
        return None
    start = argv.index(flag) + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return argv[start:end]


def replace(argv: list[str], swaps: dict[str, list[str] | None]) -> list[str]:
    """`argv` with each flag of `swaps` the recipe sets given the new words (None: dropped); others kept."""
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        end = next((k for k in range(i + 1, len(argv)) if argv[k].startswith("--")), len(argv))
        if word in swaps:
            if swaps[word] is not None:
                out += [word, *swaps[word]]
        else:
            out += argv[i:end]
        i = end
    return out


def rehearsal(name: str, tmp: Path, policy: Path, prompts: Path, out: Path, steps: int = 2) -> list[str]:
    """The recipe's flags with a tiny policy, the test prompts, 4 rollouts a step for `steps` steps, 16 new
    tokens, and paths under `out`. Models, data, sizes and paths only: every other flag is the recipe's."""
    argv = recipe_argv(name, tmp)
    n = int((values(argv, "--rollout.n_samples_per_prompt") or ["1"])[0])
    n = min(n, 2)  # a group of 2 still has a baseline and a spread
    prompts_per_step = 4 // n
    swaps: dict[str, list[str] | None] = {
        # models and data
        "--actor.model_name_or_path": [str(policy)],
        "--data.prompt_dataset": [str(prompts)],
        "--data.input_key": ["input"],
        "--eval.dataset": [str(prompts)],
        "--data.apply_chat_template": None,  # the tiny tokenizer has no chat template
        "--logger.wandb.key": None,
        # sizes
        "--rollout.n_samples_per_prompt": [str(n)],
        "--rollout.batch_size": [str(prompts_per_step)],
        "--train.batch_size": ["4"],
        "--rollout.micro_batch_size": ["2"],
        "--train.micro_batch_size": ["2"],
        "--data.max_samples": [str(prompts_per_step * steps)],
        "--data.max_len": ["128"],
        "--rollout.max_new_tokens": ["16"],
        "--train.num_episodes": ["1"],
        "--train.max_epochs": ["1"],
        # paths
        "--ckpt.output_dir": [str(out / "backbone")],
        "--ckpt.path": [str(out / "ckpt")],
        "--logger.tensorboard_dir": [str(out / "tb")],
    }
    argv = replace(argv, swaps)
    for flag in ("--rollout.batch_size", "--train.batch_size", "--data.max_samples", "--rollout.max_new_tokens"):
        if flag not in argv:  # upstream's defaults are a GPU run's sizes
            argv += [flag, swaps[flag][0]]
    if "--logger.tensorboard_dir" not in argv:
        argv += ["--logger.tensorboard_dir", str(out / "tb")]
    return argv + ["--data.label_key", "label"] * ("--data.label_key" not in argv)
