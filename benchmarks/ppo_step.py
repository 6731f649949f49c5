"""What the plugin costs per PPO step: the same `--cpu` launch on OpenRLHF's own reward path and on the plugin's.

    .venv/bin/python benchmarks/ppo_step.py [--steps 8]

Three launches of one recipe (tiny LLaMA policy, GAE critic, reference with KL, ZeRO 2, one vLLM engine,
4 rollouts of 16 tokens per step), one after another, through the drop-in launcher with `--cpu`:
(a) OpenRLHF's own reward path with one OpenRLHF reward model (`--cpu` alone: upstream's RewardModelActor,
no plugin code on the reward path), (b) `--reward_combiner single --objective 0` on that reward model (the
plugin's reward actor and combination, one objective), (c) `bonesoup --beta 0.7` on two reward models.
Per-step time is upstream's own `timing/step_total` (TensorBoard); each launch's median over its steps
after the first (the first pays for warm-up). Start-up is not a step and is not counted. Prints the
medians and the ratios (b)/(a) and (c)/(a); the goal is (b)/(a) <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from openrlhf_bonesoup.demo import tiny


def step_times(log_dir: Path) -> list[float]:
    (run,) = {p.parent for p in log_dir.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(run))
    events.Reload()
    return [e.value for e in sorted(events.Scalars("train/timing/step_total"), key=lambda e: e.step)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = tiny.make_rehearsal(tmp / "models", prompts=4 * args.steps)  # 4 prompts a step
        tiny.make_openrlhf_rm(tmp / "models" / "rm2", models["policy"], seed=5)
        rm, rm2 = str(models["rm"]), str(tmp / "models" / "rm2")
        variants = {
            "a_openrlhf": ["--reward.model_name_or_path", rm],
            "b_single": ["--reward.model_name_or_path", rm, "--reward_combiner", "single", "--objective", "0"],
            "c_bonesoup": ["--reward.model_name_or_path", f"{rm},{rm2}", "--reward_combiner", "bonesoup"]
            + ["--beta", "0.7", "--backbone_index", "0"],
        }
        medians = {}
        for name, reward in variants.items():
            out = tmp / name
            argv = ["--cpu", "--actor.model_name_or_path", str(models["policy"]), *reward]
            argv += ["--data.prompt_dataset", str(models["prompts"]), "--data.input_key", "input"]
            argv += ["--data.max_samples", str(4 * args.steps), "--data.max_len", "128"]
            argv += ["--rollout.max_new_tokens", "16"]
            argv += ["--rollout.batch_size", "4", "--rollout.micro_batch_size", "2", "--train.batch_size", "4"]
            argv += ["--train.micro_batch_size", "2", "--algo.advantage.estimator", "gae", "--ds.zero_stage", "2"]
            argv += ["--critic.model_name_or_path", str(models["policy"]), "--vllm.enforce_eager"]
            argv += ["--ckpt.output_dir", str(out / "ckpt"), "--logger.tensorboard_dir", str(out / "tb")]
            with open(tmp / f"{name}.log", "w") as log:
                done = subprocess.run(
                    [sys.executable, "-m", "openrlhf_bonesoup.cli.train_ppo_ray", *argv], stdout=log, stderr=log
                )
            if done.returncode != 0:
                print((tmp / f"{name}.log").read_text()[-3000:], file=sys.stderr)
                return 1
            times = step_times(out / "tb")
            medians[name] = statistics.median(times[1:])
            print(f"{name}: {len(times)} steps, median step {medians[name]:.3f} s (after the first: {times[1:]})")
    a = medians["a_openrlhf"]
    print(f"(b)/(a) = {medians['b_single'] / a:.3f}   (c)/(a) = {medians['c_bonesoup'] / a:.3f}   goal (b)/(a) <= 1.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
