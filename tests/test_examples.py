"""examples/: every script parses; run with recorders in place of the `ray` and `openrlhf-bonesoup`
commands (they write down their arguments, nothing is launched: what is tested is that every command
the scripts issue is accepted by the real parsers), every command is parsed by the real parsers: OpenRLHF
0.11.2's train_ppo_ray behind the launcher's dry run, and the `openrlhf-bonesoup` CLI. The objective
specs load, and the summary reward_func files score what the plugin hands them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.runtime_env.runtime_env import _merge_runtime_env
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from openrlhf_bonesoup import cli, coefficients, objectives, scoring
from openrlhf_bonesoup.coefficients import parse_preferences
from openrlhf_bonesoup.integration import launcher, worker

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = EXAMPLES / "scripts"
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
"""
SETTINGS = ("SETTING", "LAUNCH", "COMBINER", "ALGO", "BETA", "SFT", "DATA", "SOUP", "OUT", "ALPHA", "RS_SOUP", "BETAS")


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, tmp_path: Path, **settings: str) -> list[list[str]]:
    """Run examples/scripts/<name> in tmp_path; returns the ray / openrlhf-bonesoup calls it made."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in ("ray", "openrlhf-bonesoup"):
        (bin_dir / command).write_text(RECORDER.format(python=sys.executable))
        (bin_dir / command).chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    calls.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", CALLS=str(calls), **settings)
    subprocess.run(["bash", str(SCRIPTS / name)], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


# A `ray` or `openrlhf-bonesoup` that notes its call and fails: on a PATH without the venv, the only
# ones a script could find.
FORBIDDEN = """#!/bin/sh
echo "$0 $*" >> "$STARTED"
exit 1
"""
ALL_SCRIPTS = ["train_bonesoup_backbones.sh", "merge.sh", "evaluate.sh", "select_beta.sh", "prepare_prompts.py"]


def run_bare(name: str, args: list[str], tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    """Run examples/scripts/<name> ARGS in tmp_path/work with no `ray` and no venv on PATH."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    for command in ("ray", "openrlhf-bonesoup"):
        (bin_dir / command).write_text(FORBIDDEN)
        (bin_dir / command).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", STARTED=str(tmp_path / "started"), **settings)
    command = [sys.executable] if name.endswith(".py") else ["bash"]
    return subprocess.run(
        [*command, str(SCRIPTS / name), *args], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_help_dry_run_and_a_wrong_argument_start_nothing(tmp_path, name):
    assert sorted(p.name for p in SCRIPTS.iterdir() if p.suffix in (".sh", ".py")) == sorted(ALL_SCRIPTS)
    positional = ["hh", "data"] if name.endswith(".py") else []  # prepare_prompts.py SETTING OUTPUT

    r = run_bare(name, ["--help"], tmp_path)
    assert r.returncode == 0 and "--dry_run" in r.stdout, r.stderr
    first = (SCRIPTS / name).read_text().splitlines()[1].lstrip('#" ').split(":")[0]
    assert first in r.stdout  # what it does: the header
    for variable in re.findall(r"^([A-Z_]+)=\$\{", (SCRIPTS / name).read_text(), flags=re.M):
        assert f"{variable}=" in r.stdout  # and its settings

    r = run_bare(name, [*positional, "--dry_run"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == "", r.stderr

    r = run_bare(name, [*positional, "--nope"], tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--nope" in r.stderr, r.stderr
    assert r.stdout == ""

    assert not (tmp_path / "started").exists()  # no `ray` and no `openrlhf-bonesoup` was called
    assert list((tmp_path / "work").iterdir()) == []  # and nothing was written


@pytest.mark.parametrize("name", ["train_bonesoup_backbones.sh", "merge.sh", "evaluate.sh", "select_beta.sh"])
def test_dry_run_prints_the_commands_a_run_issues(tmp_path, name):
    settings = {"RS_SOUP": str(tmp_path / "rs")} if name == "evaluate.sh" else {}
    calls = run_script(name, tmp_path / "work", **settings)
    printed = run_bare(name, ["--dry_run"], tmp_path, **settings)
    commands = [shlex.split(line) for line in printed.stdout.splitlines()]
    commands = [c[: c.index(">")] if ">" in c else c for c in commands]  # run_to prints `CMD > FILE`
    assert all(c[0] in ("ray", "openrlhf-bonesoup", "mkdir") for c in commands), printed.stdout
    assert [c for c in commands if c[0] != "mkdir"] == calls
    assert not (tmp_path / "started").exists()


TINY_POLICY: list = []  # the session's tiny policy (set by the autouse fixture below)


@pytest.fixture(autouse=True)
def _tiny_policy(tiny):
    TINY_POLICY[:] = [tiny["policy"]]


def launch(call: list[str], monkeypatch) -> tuple[str, dict]:
    """A recorded `ray job submit ... -- python3 -m MODULE args`: MODULE and the launcher's dry-run plan
    for args, as the job's driver would compute it (under the job's runtime_env)."""
    assert call[:3] == ["ray", "job", "submit"]
    job_env = json.loads(next(a.split("=", 1)[1] for a in call if a.startswith("--runtime-env-json=")))
    python = call[call.index("--") + 1 :]
    assert python[:2] == ["python3", "-m"]
    args = python[3:]
    # The launcher checks the SFT checkpoint before anything runs: a tiny one stands where the script points.
    sft = Path(args[args.index("--actor.model_name_or_path") + 1])
    if sft.is_absolute() and not sft.exists():
        shutil.copytree(TINY_POLICY[0], sft)
    with monkeypatch.context() as m:
        m.setenv(launcher.JOB_CONFIG_ENV, json.dumps({"runtime_env": job_env}))
        plan, _ = launcher.resolve(args)  # OpenRLHF's real parser: an unknown flag exits here
    assert _merge_runtime_env(job_env, plan["runtime_env"]) is not None  # Ray accepts both together
    return python[2], plan


def test_every_script_parses():
    scripts = sorted(SCRIPTS.glob("*.sh"))
    names = {s.name for s in scripts}
    assert {"train_bonesoup_backbones.sh", "merge.sh", "evaluate.sh", "select_beta.sh"} <= names
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("launch_form", ["dropin", "patched"])
def test_training_launches_one_job_per_backbone(tmp_path, monkeypatch, launch_form):
    calls = run_script("train_bonesoup_backbones.sh", tmp_path, LAUNCH=launch_form, BETA="0.7")
    assert len(calls) == 2
    module = {"dropin": "openrlhf_bonesoup.cli.train_ppo_ray", "patched": "openrlhf.cli.train_ppo_ray"}[launch_form]
    matrix = coefficients.backbone_matrix(0.7, 2)
    for j, call in enumerate(calls):
        used, plan = launch(call, monkeypatch)
        assert used == module
        assert plan["bonesoup"]["weights"] == pytest.approx(matrix[j]) and plan["backbone_index"] == j
        assert [o["name"] for o in plan["bonesoup"]["objectives"]] == ["harmless", "helpful"]
        # all models: upstream's reward group, holding our actor
        assert plan["reward.model_name_or_path"] == (
            "Ray2333/gpt2-large-harmless-reward_model,Ray2333/gpt2-large-helpful-reward_model"
        )
        assert plan["soup_dir"] == str(tmp_path / "soups" / "hh_bone_soup_b0.7")
        assert plan["output_dir"] == str(tmp_path / "soups" / "hh_bone_soup_b0.7" / f"backbone{j}")
        assert len(plan["merge_preferences"]) == 11
        assert plan["runtime_env"]["worker_process_setup_hook"] == worker.SETUP_HOOK
        argv = plan["openrlhf_argv"]
        assert argv[argv.index("--critic.model_name_or_path") + 1] == str(tmp_path / "models" / "llama-2-7b-sft-hh")
        assert argv[argv.index("--rollout.max_new_tokens") + 1] == "128"


def test_summary_and_rewarded_soup_launches(tmp_path, monkeypatch):
    calls = run_script("train_bonesoup_backbones.sh", tmp_path, SETTING="summary", COMBINER="single")
    assert len(calls) == 2
    for j, call in enumerate(calls):
        _, plan = launch(call, monkeypatch)
        assert plan["bonesoup"]["combiner"] == "single" and plan["bonesoup"]["weights"] == np.eye(2)[j].tolist()
        assert [o["kind"] for o in plan["bonesoup"]["objectives"]] == ["function", "function"]
        # reward_func files that load models (gpu: true): scored on the reward GPUs, never beside vLLM
        assert plan["bonesoup"]["route"] == worker.ROUTE_ACTORS and plan["reward.remote_url"] is None
        assert plan["soup_dir"] == str(tmp_path / "soups" / "summary_rewarded_soup")
        argv = plan["openrlhf_argv"]
        assert argv[argv.index("--rollout.max_new_tokens") + 1] == "48"


@pytest.mark.parametrize(
    "algo, estimator, samples, kl",
    [("grpo", "group_norm", 8, "k3"), ("reinforce_baseline", "reinforce_baseline", 4, "k2")],
)
def test_grpo_and_reinforce_baseline_launches(tmp_path, monkeypatch, algo, estimator, samples, kl):
    calls = run_script("train_bonesoup_backbones.sh", tmp_path, ALGO=algo)
    assert len(calls) == 2
    for j, call in enumerate(calls):
        _, plan = launch(call, monkeypatch)  # through OpenRLHF's parser and the launcher's checks
        assert plan["backbone_index"] == j and plan["critic.model_name_or_path"] is None
        assert plan["soup_dir"] == str(tmp_path / "soups" / f"hh_bone_soup_b0.7_{algo}")
        argv = plan["openrlhf_argv"]
        assert argv[argv.index("--algo.advantage.estimator") + 1] == estimator
        assert argv[argv.index("--rollout.n_samples_per_prompt") + 1] == str(samples)
        assert argv[argv.index("--algo.kl.estimator") + 1] == kl and "--algo.kl.use_loss" in argv
        assert int(argv[argv.index("--rollout.batch_size") + 1]) * samples == 1024
        assert not any(a.startswith("--critic.") for a in argv)


def test_a_bad_setting_stops_the_script(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as e:
        run_script("train_bonesoup_backbones.sh", tmp_path, SETTING="chat")
    assert e.value.returncode == 2 and b"SETTING must be hh or summary" in e.value.stderr


def parsed_cli(call: list[str]):
    assert call[0] == "openrlhf-bonesoup"
    return cli.build_parser().parse_args(call[1:])  # BoneSoupError on an unknown flag


def test_merge_script(tmp_path):
    (call,) = run_script("merge.sh", tmp_path)
    args = parsed_cli(call)
    assert args.command == "merge" and args.soup_dir == str(tmp_path / "soups" / "hh_bone_soup_b0.7")
    assert len(parse_preferences(args.preferences, 2)) == 7 and args.alpha == "0" and args.alpha_prompts is None
    (call,) = run_script("merge.sh", tmp_path, ALPHA="auto")
    args = parsed_cli(call)
    assert args.alpha == "auto" and args.alpha_prompts == str(tmp_path / "data" / "hh_val.jsonl")


def test_evaluate_script_compares_with_rewarded_soup(tmp_path):
    calls = run_script("evaluate.sh", tmp_path, SETTING="summary", RS_SOUP=str(tmp_path / "rs"))
    rs, bs = (parsed_cli(c) for c in calls)
    assert rs.command == bs.command == "evaluate" and rs.soup_dir == str(tmp_path / "rs")
    assert bs.soup_dir == str(tmp_path / "soups" / "summary_bone_soup_b0.7")
    assert rs.grid == bs.grid == 11 and rs.max_new_tokens == bs.max_new_tokens == 48
    assert (rs.prompts, rs.max_samples, rs.seed, rs.top_p) == (bs.prompts, bs.max_samples, bs.seed, bs.top_p)
    assert bs.compare == [f"rewarded_soup={rs.output}/results.json"]


def test_select_beta_runs_short_soups_and_compares_them(tmp_path, monkeypatch):
    calls = run_script("select_beta.sh", tmp_path, FULL_SAMPLES="1000", FRACTION="0.2")
    jobs = [c for c in calls if c[0] == "ray"]
    commands = [parsed_cli(c) for c in calls if c[0] == "openrlhf-bonesoup"]
    assert len(jobs) == 6  # 3 betas x 2 backbones
    for job, (beta, j) in zip(jobs, [(b, j) for b in (0.6, 0.7, 0.8) for j in (0, 1)], strict=True):
        _, plan = launch(job, monkeypatch)
        assert plan["bonesoup"]["weights"] == pytest.approx(coefficients.backbone_matrix(beta, 2)[j])
        argv = plan["openrlhf_argv"]
        assert argv[argv.index("--data.max_samples") + 1] == "200"  # 20% of the prompts
    evaluations = [c for c in commands if c.command == "evaluate"]
    assert [e.soup_dir for e in evaluations] == [
        str(tmp_path / f"beta_selection/hh/soup_b{b}") for b in (0.6, 0.7, 0.8)
    ]
    select = [c for c in commands if c.command == "select-beta"]
    assert len(select) == 2 and select[0].results == [f"{e.output}/results.json" for e in evaluations]


# --- objective specs and the summary reward_func files ----------------------------------------------


def test_objective_specs_parse():
    hh = objectives.parse_objectives(str(EXAMPLES / "objectives" / "helpful_harmless.yaml"))
    assert [(o["name"], o["kind"], o["max_len"]) for o in hh] == [
        ("harmless", "model", 1024),
        ("helpful", "model", 1024),
    ]
    summary = objectives.parse_objectives(str(EXAMPLES / "objectives" / "summary.yaml"))
    assert [(o["name"], o["kind"]) for o in summary] == [("faithful", "function"), ("summary", "function")]
    assert all(Path(o["path"]).is_file() for o in summary)


def test_prompt_formats_are_the_reference_codes():
    prepare = load(SCRIPTS / "prepare_prompts.py")
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."
    assert prepare.hh_prompt(chosen) == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke. \n\nAssistant:"
    assert prepare.summary_prompt("line one\nline two") == (
        "### Instruction: Generate a one-sentence summary of this post. ### Input: line one line two ### Response: "
    )


def test_summary_reward_funcs_score_the_summary_against_the_post(tiny, monkeypatch):
    prepare = load(SCRIPTS / "prepare_prompts.py")
    post = "The weather today is sunny with a light breeze; tomorrow may bring rain and colder air."
    prompts = [prepare.summary_prompt(post)] * 2
    summaries = ["sunny today, rain tomorrow", "a fox jumps over a dog"]
    responses = [summaries[0] + "</s>", summaries[1]]  # the policy's eos, as OpenRLHF decodes a query
    for env in ("FAITHFUL_MODEL", "SUMMARY_MODEL"):  # the tiny GPT-2 classifier instead of the downloads
        monkeypatch.setenv(env, str(tiny["classifier"]))
    objs = objectives.load_objectives(str(EXAMPLES / "objectives" / "summary.yaml"))
    scores = scoring.score_texts(objs, prompts, responses)  # as `evaluate` and `score` call them

    tokenizer = AutoTokenizer.from_pretrained(str(tiny["classifier"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["classifier"])).eval()
    with torch.no_grad():
        faithful = [model(**tokenizer(text=s, text_pair=post, return_tensors="pt")).logits[0, 1] for s in summaries]
        preferred = [
            model(**tokenizer(f"{s} <|endoftext|> {post}", return_tensors="pt")).logits[0, 0] for s in summaries
        ]
    np.testing.assert_allclose(scores[:, 0], torch.stack(faithful).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores[:, 1], torch.stack(preferred).numpy(), rtol=1e-5, atol=1e-6)
    assert scores[0, 0] != scores[1, 0]  # the two summaries are told apart
