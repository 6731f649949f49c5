"""The real demo: `openrlhf-bonesoup demo` end to end, as a user runs it.

Four real `--cpu` PPO launches (OpenRLHF 0.11.2, vLLM's CPU build, DeepSpeed), the post-training
hook, merges on the 11-point grid and evaluation through vLLM. The demo is first interrupted with
Ctrl-C (SIGINT) during its first launch, then rerun into the same folder: the interruption must leave
nothing that blocks it.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import psutil  # Ray's dependency: the interrupted run's process tree
import pytest
from conftest import launch_serve, stop_serve, wait_serve
from openai import OpenAI

from openrlhf_bonesoup import indicators, soup
from openrlhf_bonesoup.cli import build_parser, main
from openrlhf_bonesoup.demo import recipe

# A shortened demo: 16 of the default 24 steps (~40 s less). In two 24-step runs every backbone's training
# reward had risen from ~0.23 to 0.43-0.80 by step 16 (some fell again later); the first 16-step run
# (2026-12-05) moved each h_j by +0.21 to +0.66 over the SFT policy's.
STEPS = 16
CLI = [sys.executable, "-m", "openrlhf_bonesoup.cli", "demo"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # SIGINT at its default in the child, as at a terminal (a background test run ignores it, through exec)
    first = subprocess.Popen([*CLI, "--output", str(out), "--steps", str(STEPS)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    log = out / "logs" / "bone_soup0.log"
    deadline = time.monotonic() + 300
    while not (log.is_file() and "Ray" in log.read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(1)
    tree = psutil.Process(first.pid).children(recursive=True)  # the launch, Ray, its actors
    first.send_signal(signal.SIGINT)  # Ctrl-C, during the first PPO launch
    _, interrupted_err = first.communicate(timeout=120)
    _, alive = psutil.wait_procs(tree, timeout=60)

    start = time.perf_counter()
    done = subprocess.run([*CLI, "--output", str(out), "--steps", str(STEPS)], env=env, text=True,
                          capture_output=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    return {"out": out, "stdout": done.stdout, "seconds": time.perf_counter() - start, "first": first,
            "interrupted_err": interrupted_err, "tree": tree, "alive": alive}  # fmt: skip


def test_ctrl_c_ended_the_first_run_and_left_nothing_blocking(demo):
    assert demo["first"].returncode == 130
    assert "interrupted" in demo["interrupted_err"] and "Traceback" not in demo["interrupted_err"]
    assert len(demo["tree"]) > 3 and demo["alive"] == []  # Ray and the launch's processes ended with it


def test_every_file_it_writes(demo):
    out = demo["out"]
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == recipe.FORMAT and results["steps"] == STEPS
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / recipe.MARKER).is_file()
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["bone_soup0.log", "bone_soup1.log", "build.log", "evaluate.log",
                    "rewarded_soup0.log", "rewarded_soup1.log"]  # fmt: skip
    for name, beta in recipe.SOUPS.items():
        manifest = soup.read_soup(out / name)
        assert manifest["beta"] == beta and [o["name"] for o in manifest["objectives"]] == recipe.NAMES
        assert [b["status"] for b in manifest["backbones"]] == ["trained", "trained"]
        assert manifest["sft"] == str(out / "models" / "sft")
        # the last launch's post-training hook merged the corners
        assert sorted(p.name for p in (out / name / "merged").iterdir()) == ["mu_0.00_1.00", "mu_1.00_0.00"]
        evaluation = json.loads((out / "eval" / name / "results.json").read_text())
        assert evaluation["backend"] == "vllm" and len(evaluation["mean"]) == recipe.GRID
        assert evaluation["reference_point"] == results["sft"]
        assert results["fronts"][name] == evaluation["mean"]
        assert len(list((out / "eval" / name / "models").iterdir())) == recipe.GRID
    # one line per stage, then the summary and the serve command of the soup it trained
    lines = demo["stdout"].splitlines()
    assert [line.split("]")[0] for line in lines[:9]] == [f"[{k}/9" for k in range(1, 10)]
    assert lines[-1].strip() == f"openrlhf-bonesoup serve --soup_dir {out / 'bone_soup'}"
    build_parser().parse_args(lines[-1].split()[1:])  # a command serve takes (a bad flag raises)
    assert len(lines) <= 14, demo["stdout"]


def test_the_serve_command_it_prints_answers_the_openai_client(demo):
    """The printed command, as a user runs it (a free port added): the soup it trained, any preference."""
    words = demo["stdout"].splitlines()[-1].split()
    assert words[:2] == ["openrlhf-bonesoup", "serve"]
    proc, url = launch_serve(words[2:])
    try:
        wait_serve(proc, url)
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for mu in ([0.3, 0.7], [1.0, 0.0]):
            reply = client.completions.create(
                model="bonesoup:" + ",".join(map(str, mu)),
                prompt="Human: Tell me about tea. Assistant:",
                max_tokens=8,
                temperature=0,
                extra_body={"min_tokens": 1},
            )
            assert reply.bonesoup["preference"] == mu and reply.choices[0].text
    finally:
        stop_serve(proc)


def test_each_backbone_moved_its_reward_above_the_sft_policy(demo):
    results = json.loads((demo["out"] / "results.json").read_text())
    sft = np.asarray(results["sft"])
    # B by hand: Bone Soup's beta 0.7, Rewarded Soup's identity; backbone j was trained on h_j = B_j . r
    rows = {"bone_soup": [[0.7, 0.3], [0.3, 0.7]], "rewarded_soup": [[1.0, 0.0], [0.0, 1.0]]}
    gains = {
        name: [np.asarray(rows[name][j]) @ (np.asarray(scores) - sft) for j, scores in enumerate(backbones)]
        for name, backbones in results["backbones"].items()
    }
    assert results["moved"] == {name: [bool(g > 0) for g in gain] for name, gain in gains.items()}
    # Training moved every backbone towards its own h_j (docs/demo.md: in the measured runs by 0.21-0.73,
    # against a spread of ~0.04 for a mean over the 24 evaluation prompts).
    assert all(g > 0 for gain in gains.values() for g in gain), gains
    # the hypervolumes are those of the fronts against the SFT point
    for name, front in results["fronts"].items():
        assert results["hypervolume"][name] == pytest.approx(indicators.hypervolume(np.asarray(front), sft))


def test_the_plot_draws_the_fronts_in_results_json(demo):
    results = json.loads((demo["out"] / "results.json").read_text())
    fig, drawn = recipe.figure(results)
    lines = [np.column_stack(line.get_data()).tolist() for line in fig.axes[0].lines]
    for soup_name in ("bone_soup", "rewarded_soup"):
        # the joined line: results.json's non-dominated points of that soup, in the order of objective 1
        points = np.asarray(results["fronts"][soup_name])[np.asarray(results["pareto"][soup_name])]
        want = points[np.argsort(points[:, 0], kind="stable")].tolist()
        (label,) = [label for label in drawn if label.startswith(soup_name)]
        assert drawn[label]["front"] == want and want in lines  # returned, and on the saved axes
    assert [results["sft"]] in lines  # the reference point: the SFT policy's scores


def test_a_foreign_folder_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["demo", "--output", str(tmp_path), "--steps", "1"]) == 2
    assert main(["demo", "--output", str(tmp_path / "new"), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--steps" in err and "Traceback" not in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_the_objectives_score_the_text_a_user_sees(tmp_path):
    """OpenRLHF hands reward functions the rollouts decoded with their special tokens; the demo's
    objectives score them without, as vLLM, evaluate and serve return the text (with them, `</s>`
    alone, an immediate stop, earned `late` 0.25 and `<s>` 0.33)."""
    paths = recipe.build(tmp_path, prompts=2)
    early, late = (runpy.run_path(spec["path"])["reward_func"] for spec in json.loads(paths["objectives"].read_text()))
    prompt = "Human: Tell me about tea. Assistant:"
    responses = ["abc", "xyz", "</s>", "<s><s><pad>", "ab<s>yz</s>", " Ab, Yz!"]
    queries = [prompt + r for r in responses]
    assert early(queries, [prompt] * 6, None).tolist() == [1.0, 0.0, 0.0, 0.0, 0.5, 0.25]
    assert late(queries, [prompt] * 6, None).tolist() == [0.0, 1.0, 0.0, 0.0, 0.5, 0.25]
