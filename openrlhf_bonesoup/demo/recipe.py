"""The real demo: the whole recipe on tiny LMs, OpenRLHF's PPO on CPU, Bone Soup against Rewarded Soup.

`openrlhf-bonesoup demo --output DIR` builds a tiny LLaMA policy (random weights: the "SFT" model every
backbone starts from) and two rule objectives that conflict by construction: the share of a response's
characters that are letters a-m ("early") and the share that are letters n-z ("late"); they sum to at
most 1. It trains the two Bone Soup backbones (beta 0.7) and the two Rewarded Soup ingredients (beta 1,
B = I), each a real `python -m openrlhf_bonesoup.cli.train_ppo_ray --cpu` launch run as a subprocess
(logs in DIR/logs), evaluates the SFT policy and both soups on an 11-point preference grid through
vLLM, and writes results.json and demo.png (both fronts, the SFT point as the hypervolume reference).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from openrlhf_bonesoup.coefficients import clean, preference_grid
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.generation import Generator

FORMAT = "openrlhf-bonesoup/demo-recipe/v1"
MARKER = ".openrlhf-bonesoup-demo"  # a folder holding it was written by this demo: a rerun may replace it
NAMES = ["early", "late"]
SOUPS = {"bone_soup": 0.7, "rewarded_soup": 1.0}
GRID = 11
# PPO steps, rollouts per step and the actor's learning rate. With 4 rollouts a step's advantages were too
# noisy: in 12 steps the Bone Soup backbones' rewards did not rise (h_j = 0.7 r_j + 0.3 r_other contrasts
# the objectives less than r_j alone). At 1e-2 one policy ended its 12 steps at reward 1.0, and its last
# update left it answering every prompt with </s> (p = 0.997).
# 24 steps of 16 at 3e-3 rose smoothly in the runs measured (docs/demo.md); ~80 s per launch, most of it start-up.
STEPS, ROLLOUTS, LR = 24, 16, "3e-3"
TOPICS = """bread rain music gardens rivers chess winter coffee trains islands maps robots poems stars
tea bikes clocks ships honey deserts kites lamps wolves mirrors""".split()

# One rule objective per file, OpenRLHF's reward_func signature. The response is what the query adds to
# its prompt; its score is the share of its characters that fall in the objective's letter range.
# OpenRLHF decodes rollouts for reward functions with their special tokens (utils/agent.py:288,
# skip_special_tokens=False), while what a user gets (vLLM, evaluate, serve) has them stripped: scored
# with them, the policy learned to emit `<s>` (an n-z letter in 3 characters) and answered nothing.
REWARD = """import torch

SPECIAL = {special!r}  # the policy tokenizer's special tokens: not part of the text a user sees


def reward_func(queries, prompts, labels):
    out = []
    for q, p in zip(queries, prompts):
        response = q[len(p):] if q.startswith(p) else q
        for token in SPECIAL:
            response = response.replace(token, "")
        hits = sum(1 for ch in response.lower() if {lo!r} <= ch <= {hi!r})
        out.append(hits / max(1, len(response)))
    return torch.tensor(out, dtype=torch.float32)
"""


def build(out: Path, prompts: int) -> dict[str, Path]:
    """The SFT policy, the two objective files and the prompt file under `out`."""
    from openrlhf_bonesoup.demo import tiny

    paths = {"policy": out / "sft"}
    tokenizer = tiny.make_tokenizer(out / "tokenizer", "llama")
    tiny.make_llama_lm(paths["policy"], tokenizer, seed=0, hidden_size=256)
    specs = []
    for name, (lo, hi) in zip(NAMES, [("a", "m"), ("n", "z")], strict=True):
        path = out / f"reward_{name}.py"
        path.write_text(REWARD.format(lo=lo, hi=hi, special=tokenizer.all_special_tokens))
        specs.append({"name": name, "path": str(path)})
    paths["objectives"] = out / "objectives.json"
    paths["objectives"].write_text(json.dumps(specs, indent=2) + "\n")
    paths["prompts"] = out / "prompts.jsonl"
    with open(paths["prompts"], "w") as f:
        for i in range(prompts):
            f.write(json.dumps({"input": f"Human: Tell me about {TOPICS[i % len(TOPICS)]}. Assistant:"}) + "\n")
    return paths


def launch_argv(paths: dict, out: Path, soup: str, j: int, steps: int, seed: int) -> list[str]:
    """One backbone's `--cpu` launch: `steps` PPO steps of ROLLOUTS rollouts, a learning rate that moves a tiny
    policy."""
    from openrlhf_bonesoup.demo import tiny

    args = tiny.rehearsal_argv(paths, out, j)
    settings = {"--beta": SOUPS[soup], "--soup_dir": out / soup, "--ckpt.output_dir": out / "backbones" / f"{soup}{j}"}
    settings |= {
        "--data.max_samples": ROLLOUTS * steps,
        "--rollout.batch_size": ROLLOUTS,
        "--train.batch_size": ROLLOUTS,
    }
    settings |= {"--rollout.micro_batch_size": ROLLOUTS // 2, "--train.micro_batch_size": ROLLOUTS // 2}
    for flag, value in settings.items():
        args[args.index(flag) + 1] = str(value)
    args.remove("--data.label_key")
    args.remove("label")
    args += ["--actor.adam.lr", LR, "--actor.lr_scheduler", "constant", "--train.seed", str(seed)]
    args += ["--logger.tensorboard_dir", str(out / "tensorboard"), "--logger.wandb.run_name", f"{soup}{j}"]
    return [sys.executable, "-m", "openrlhf_bonesoup.cli.train_ppo_ray", *args]


def _run(command: list[str], log: Path) -> None:
    # Its own process group: Ctrl-C here ends the launch and everything it started (Ray, vLLM) at once.
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    if code != 0:
        raise BoneSoupError(f"a training launch failed (exit {code}); its log: {log}")


@contextlib.contextmanager
def _quiet(log: Path):
    """stdout and stderr of this process, its libraries and the processes it starts (vLLM's engine)
    go to `log`: the demo's own output stays one line per stage."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def _prepare(output: Path) -> None:
    # A rerun replaces an earlier (or interrupted) demo; any other non-empty folder is never deleted.
    if output.exists() and any(output.iterdir()):
        if not (output / MARKER).is_file():
            raise BoneSoupError(f"{output} is not empty and holds no earlier demo: choose a new --output")
        shutil.rmtree(output)
    output.mkdir(parents=True)
    (output / MARKER).write_text("written by `openrlhf-bonesoup demo`; a rerun into this folder replaces it\n")


def sft_scores(paths: dict, generator: Generator, data: dict) -> np.ndarray:
    """(N, 2) scores of the SFT policy's responses, generated as the soups' are (by the same generator)."""
    from openrlhf_bonesoup import evaluate, objectives

    texts = evaluate.read_prompts(paths["prompts"], paths["policy"], **data)
    responses = generator.generate(paths["policy"], texts)  # the engine both evaluations reuse
    objs = objectives.load_objectives(str(paths["objectives"]))
    return evaluate.score_responses(objs, texts, responses, generator.sampling["batch_size"])


def figure(results: dict) -> tuple:
    """demo.png's figure: both fronts and the SFT point, drawn by plot.plot_fronts (evaluate's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openrlhf_bonesoup import plot

    fig, ax = plt.subplots(figsize=(6, 5))
    hv = results["hypervolume"]
    fronts = {
        f"{k} (beta {SOUPS[k]:g}, HV {hv[k]:.3g})": {"mean": v, "preferences": results["preferences"]}
        for k, v in results["fronts"].items()
    }
    drawn = plot.plot_fronts(ax, fronts, NAMES, results["sft"], reference_label="SFT policy (reference point)")
    ax.set_title("Tiny LMs trained by OpenRLHF PPO on CPU, 11 preferences\nreference point: the SFT policy", fontsize=9)
    fig.tight_layout()
    return fig, drawn


def run(output: str | os.PathLike, steps: int = STEPS, seed: int = 42, eval_prompts: int = 24, say=print) -> dict:
    """The whole demo into `output`; `say` gets one line per stage. Returns results.json's content."""
    from openrlhf_bonesoup import evaluate

    start = time.perf_counter()
    output = Path(output).resolve()
    _prepare(output)
    (output / "logs").mkdir()
    total = 2 + 2 * len(SOUPS) + len(SOUPS) + 1
    stage = iter(range(1, total + 1))

    def tell(text: str) -> None:
        say(f"[{next(stage)}/{total}] {text} ({time.perf_counter() - start:.0f} s)")

    with _quiet(output / "logs" / "build.log"):
        paths = build(output / "models", max(ROLLOUTS * steps, eval_prompts))
    tell(f"built the tiny SFT policy and objectives {NAMES} in {output / 'models'}")
    for soup_name in SOUPS:
        for j in range(2):
            command = launch_argv(paths, output, soup_name, j, steps, seed)
            if j == 1:  # the last backbone's post-training hook merges the soup's corner preferences
                command += ["--merge_preferences", "1,0;0,1"]
            log = output / "logs" / f"{soup_name}{j}.log"
            _run(command, log)
            tell(f"trained {soup_name} backbone {j}: {steps} PPO steps (log {log})")

    data = {**evaluate.DATA, "max_samples": eval_prompts}
    evaluated = {}
    with _quiet(output / "logs" / "evaluate.log"):  # importing vLLM logs
        generator = Generator({"max_new_tokens": 16})
    try:  # one vLLM engine for the SFT policy and both soups (a start costs 15-20 s here): ours to close
        with _quiet(output / "logs" / "evaluate.log"):
            sft = sft_scores(paths, generator, data)
        reference = sft.mean(axis=0)
        tell(f"evaluated the SFT policy: {dict(zip(NAMES, np.round(reference, 4).tolist(), strict=True))}")
        for soup_name in SOUPS:
            with _quiet(output / "logs" / "evaluate.log"):
                evaluated[soup_name] = evaluate.evaluate(
                    output / soup_name,
                    [mu.tolist() for mu in preference_grid(GRID)],
                    paths["prompts"],
                    output / "eval" / soup_name,
                    data=data,
                    generator=generator,
                    reference=reference.tolist(),
                    label=soup_name,
                )
            tell(f"merged and evaluated {soup_name} at {GRID} preferences through {evaluated[soup_name]['backend']}")
    finally:
        with _quiet(output / "logs" / "evaluate.log"):
            generator.close()

    results = clean(summary(output, evaluated, reference, steps, seed))  # 0.3, not 0.30000000000000004
    results["seconds"] = round(time.perf_counter() - start, 1)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    tell(f"wrote {output / 'results.json'} and {output / 'demo.png'}")
    return results


def summary(output: Path, evaluated: dict, reference: np.ndarray, steps: int, seed: int) -> dict:
    """results.json's content from both evaluations, and demo.png."""
    from openrlhf_bonesoup import indicators

    fronts = {k: np.asarray(v["mean"]) for k, v in evaluated.items()}
    # Backbone j itself is the soup merged at mu = row j of its B (lambda = e_j), a point of the grid.
    prefs = np.asarray(evaluated["bone_soup"]["preferences"])
    backbones = {
        k: [fronts[k][int(np.argmin(np.abs(prefs - row).sum(axis=1)))].tolist() for row in v["matrix"]]
        for k, v in evaluated.items()
    }
    results = {
        "format": FORMAT,
        "objectives": NAMES,
        "steps": steps,
        "seed": seed,
        "preferences": evaluated["bone_soup"]["preferences"],
        "sft": reference.tolist(),
        "reference_point": reference.tolist(),
        "reference_rule": "the SFT policy's mean scores",
        "fronts": {k: v.tolist() for k, v in fronts.items()},
        "hypervolume": {k: indicators.hypervolume(v, reference) for k, v in fronts.items()},
        "pareto": {k: indicators.pareto_mask(v).tolist() for k, v in fronts.items()},
        "backbones": backbones,
        # Training moved backbone j as intended: its reward h_j = B_j . r above the SFT policy's.
        "moved": {
            k: [bool(np.dot(row, v[j]) > np.dot(row, reference)) for j, row in enumerate(evaluated[k]["matrix"])]
            for k, v in backbones.items()
        },
        # ... and further than the other backbone did: each backbone is best at its own objective.
        "specialised": {k: [bool(v[j][j] > v[1 - j][j]) for j in range(2)] for k, v in backbones.items()},
        "soups": {k: str(output / k) for k in SOUPS},
        "plot": "demo.png",
        "logs": "logs/",
    }
    fig, _ = figure(results)
    fig.savefig(output / "demo.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return results
