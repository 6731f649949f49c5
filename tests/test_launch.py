"""The whole recipe, for real: `--reward_combiner bonesoup --beta 0.7` inside OpenRLHF's own PPO loop.

OpenRLHF 0.11.2's `train_ppo_ray` with real Ray actor groups, DeepSpeed (ZeRO 2) policy, critic (GAE),
reference (KL) and our reward actor, a real vLLM engine generating the rollouts and receiving the
policy's weights after each step. On a machine without CUDA (CI) every launch adds `--cpu` (real vLLM's
CPU build, DeepSpeed's CPU accelerator, integration/cpu.py); on a GPU machine the same tests run without
it, one GPU shared through OpenRLHF's hybrid engine.

Objectives mix the three kinds a user has: an OpenRLHF-format RM on the policy's tokenizer, an HF
classifier on its own tokenizer, and a reward_func file reading the dataset's labels
(openrlhf_bonesoup/demo/tiny.py builds them, as `openrlhf-bonesoup tiny` does for users).

- backbone 0 through our launcher: 3 PPO steps at a learning rate that moves the policy. It saves a
  policy that differs from the SFT model, registers backbone 0 in soup.json, logs each objective's
  `train/reward/<name>` whose combination with row 0 of B(0.7) is `train/reward`, and OpenRLHF's own
  rollout-vs-trainer check `train/vllm_kl` (vLLM's log-probs of its rollouts minus the actor's, with
  `--algo.advantage.is_correction_level token`) stays below 1e-3 after the policy moved: the weights
  really reached vLLM.
- backbone 1 through OpenRLHF's own `python -m openrlhf.cli.train_ppo_ray` with patches/ applied; on CPU it runs
  OpenRLHF's PPO hybrid-engine recipe as written (tests/upstream_recipes), colocated.
- backbone 2 completes the soup and merges it; on CPU it runs as ProRL-v2's async REINFORCE++-baseline
  recipe, with the GPU recipes' speed/memory options that --cpu turns off.
- then `merge` at three preferences and `evaluate` through its vLLM branch.
- backbone 0 resumed from its checkpoints continues the running statistics; on CPU it runs with the sync
  dropped inside vLLM, and the check above shows the gap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import openrlhf
import pytest
import torch
import upstream
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from openrlhf_bonesoup import lora, soup
from openrlhf_bonesoup.demo import tiny
from openrlhf_bonesoup.integration import cpu
from openrlhf_bonesoup.integration.worker import STATE_KEY

ROOT = Path(__file__).resolve().parent.parent
PATCH = ROOT / "patches" / "openrlhf-0.11.2-bonesoup.patch"
CUDA = torch.cuda.is_available()
NAMES = ["helpful", "polite", "bonus"]
ROW0 = [0.7, 0.15, 0.15]  # row 0 of B(0.7) for n = 3
SYNC_GAP = 1e-3
OURS = [sys.executable, "-m", "openrlhf_bonesoup.cli.train_ppo_ray"]  # the plugin's launcher
# One GPU: OpenRLHF's hybrid engine (every group and vLLM on it, sleep modes), as on a small GPU box. On CPU
# backbone 1 runs colocated too (--train.colocate_all: one placement group; vLLM synced over gloo).
GPU_ARGS = ["--train.colocate_all", "--vllm.gpu_memory_utilization", "0.3", "--vllm.enable_sleep"]
GPU_ARGS += ["--ds.enable_sleep", "--ds.attn_implementation", "sdpa"]
for group in ("actor", "ref", "critic", "reward"):
    GPU_ARGS += [f"--{group}.num_nodes", "1", f"--{group}.num_gpus_per_node", "1"]
# What OpenRLHF 0.11's RL recipes (examples/scripts) add for GPU speed and memory; --cpu turns each off.
GPU_RECIPE_OPTIONS = ["--ds.packing_samples", "--train.dynamic_batch_enable", "--train.max_tokens_per_gpu", "4096"]
GPU_RECIPE_OPTIONS += ["--vllm.enable_sleep", "--ds.enable_sleep", "--vllm.sync_backend", "nccl"]
# ProRL-v2's async REINFORCE++-baseline (examples/scripts): rollouts of step k+1 generated while step k trains.
ASYNC_RECIPE = ["--train.async_enable", "--rollout.n_samples_per_prompt", "2"]
# GSPO: the sequence-level importance ratio in the policy loss (upstream's models/loss.py), fed h_j's advantages.
ASYNC_RECIPE += ["--actor.policy_loss_type", "gspo"]


def argv(models: dict, out: Path, index: int, tb: Path, steps: int) -> list[str]:
    args = tiny.rehearsal_argv(models, out, index)
    args[args.index("--data.max_samples") + 1] = str(4 * steps)
    args += ["--logger.tensorboard_dir", str(tb), "--logger.wandb.run_name", "run"]
    args += [
        "--actor.adam.lr",
        "1e-2",
        "--actor.lr_scheduler",
        "constant",
        "--algo.advantage.is_correction_level",
        "token",
    ]
    if CUDA:  # the same launch on a GPU: no --cpu, one GPU for everything
        args.remove("--cpu")
        args += GPU_ARGS
    return args


def launch(command: list[str], log: Path, env: dict | None = None) -> None:
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=1500)
    assert done.returncode == 0, log.read_text()[-8000:]


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard log folder: {tag: {step: value}}."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    return tiny.make_rehearsal(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def recipe(models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("recipe")
    # `bonus` normalised with running statistics, which backbone 0's checkpoints keep for the resumed launch
    specs = json.loads(models["objectives"].read_text())
    specs[NAMES.index("bonus")]["normalize"] = "running"
    models = {**models, "objectives": root / "objectives.json"}
    models["objectives"].write_text(json.dumps(specs))
    ckpt = ["--ckpt.path", str(root / "ckpt"), "--ckpt.save_steps", "1"]
    launch([*OURS, *argv(models, root, 0, root / "tb0", steps=3), *ckpt], root / "backbone0.log")

    # Backbone 1 through OpenRLHF's own launcher, patched: a copy of the installed package first on the path. On
    # CPU it runs OpenRLHF's PPO hybrid-engine recipe (tests/upstream_recipes: its flags as written, every group
    # colocated, --reward.normalize_enable, ZeRO 3, packing and sleep modes turned off by --cpu), the soup's
    # objectives given by --objectives in place of the recipe's one reward model.
    patched = root / "patched"
    shutil.copytree(Path(openrlhf.__file__).parent, patched / "openrlhf", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["patch", "-s", "-p1", "-i", str(PATCH)], cwd=patched, check=True)
    openrlhf_launcher = [sys.executable, "-m", "openrlhf.cli.train_ppo_ray"]
    path = os.pathsep.join([str(patched), os.environ.get("PYTHONPATH", "")])
    if CUDA:
        first = argv(models, root, 1, root / "tb1", steps=2)
    else:
        first = upstream.rehearsal("ppo_rm", root, models["policy"], models["prompts"], root / "ppo_rm")
        swaps = {"--ckpt.output_dir": [str(root / "backbone1")], "--logger.tensorboard_dir": [str(root / "tb1")]}
        first = upstream.replace(first, {"--reward.model_name_or_path": None, **swaps})
        first += ["--logger.wandb.run_name", "run", "--objectives", str(models["objectives"]), "--cpu"]
        first += ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "1"]
        first += ["--soup_dir", str(root / "soup")]
    launch([*openrlhf_launcher, *first], root / "backbone1.log", {"PYTHONPATH": path})
    # The last backbone's launch completes the soup: its post-training hook merges two preferences. On CPU it
    # also runs as ProRL-v2's async recipe does (ASYNC_RECIPE), with the speed/memory options of upstream's GPU
    # recipes, which --cpu turns off, one line each. (Upstream refuses async beside the one-GPU hybrid
    # engine's --vllm.enable_sleep.)
    last = argv(models, root, 2, root / "tb2", steps=2)
    if not CUDA:
        last[last.index("--algo.advantage.estimator") + 1] = "reinforce_baseline"
        last += [*GPU_RECIPE_OPTIONS, *ASYNC_RECIPE]
    launch([*OURS, *last, "--merge_preferences", "1,0,0;0,0,1"], root / "backbone2.log")
    return {"root": root, "models": models}


def test_backbone0_trains_saves_registers_and_logs_each_objective(recipe):
    root, models = recipe["root"], recipe["models"]
    saved = AutoModelForCausalLM.from_pretrained(str(root / "backbone0"), dtype="auto")
    sft = AutoModelForCausalLM.from_pretrained(str(models["policy"]))
    before, after = sft.state_dict(), saved.state_dict()
    assert before.keys() == after.keys()  # rounded as saved: rounding alone never counts as moving
    assert any(not torch.equal(before[k].to(after[k].dtype), after[k]) for k in before), "the policy did not move"

    manifest = soup.read_soup(root / "soup")
    assert manifest["beta"] == 0.7 and [o["name"] for o in manifest["objectives"]] == NAMES
    backbone = manifest["backbones"][0]
    assert backbone["status"] == "trained" and backbone["checkpoint"] == str((root / "backbone0").resolve())

    logs = scalars(root / "tb0" / "run")
    assert set(logs["train/reward"]) == {1, 2, 3}, sorted(logs)
    for step in (1, 2, 3):
        values = [logs[f"train/reward/{name}"][step] for name in NAMES]
        combined = sum(w * v for w, v in zip(ROW0, values, strict=True))
        assert logs["train/reward"][step] == pytest.approx(combined, rel=1e-4, abs=1e-5)


def test_the_weights_reach_vllm_after_each_step(recipe):
    """OpenRLHF's train/vllm_kl: vLLM's log-probs of the rollouts it generated minus the actor's. Rollouts
    come from vLLM (only its sampler gives rollout log-probs); after the actor moved (KL to the reference
    above zero) they still agree: the weights were synced."""
    logs = scalars(recipe["root"] / "tb0" / "run")
    assert logs["train/kl"][3] > 1e-3, "the actor did not move away from the reference"
    for step in (2, 3):
        assert abs(logs["train/vllm_kl"][step]) < SYNC_GAP, logs["train/vllm_kl"]


def test_vllm_runs_its_model_in_the_engine_core_process(recipe):
    """As on a GPU at tensor parallel size 1 (OpenRLHF's "uni" executor); with --cpu, cpu.worker_env_vars
    keeps vLLM's CPU build from moving the model into a worker process of its own."""
    log = (recipe["root"] / "backbone0.log").read_text()
    assert re.search(r"\(EngineCore(_DP\d+)? pid=\d+\).*Starting to load model", log), "the model ran elsewhere"


def test_backbone1_through_openrlhf_patched_and_backbone2_complete_the_soup(recipe):
    root = recipe["root"]
    manifest = soup.read_soup(root / "soup")
    for j in (1, 2):
        backbone = manifest["backbones"][j]
        assert backbone["status"] == "trained" and backbone["checkpoint"] == str((root / f"backbone{j}").resolve())
        logs = scalars(root / f"tb{j}" / "run")
        row = [0.7 if i == j else 0.15 for i in range(3)]
        for step in (1, 2):
            values = [logs[f"train/reward/{name}"][step] for name in NAMES]
            combined = sum(w * v for w, v in zip(row, values, strict=True))
            assert logs["train/reward"][step] == pytest.approx(combined, rel=1e-4, abs=1e-5)


def test_the_last_launch_merges_the_soup_after_training(recipe):
    root = recipe["root"]
    merged = sorted(p.name for p in (root / "soup" / "merged").iterdir())
    assert merged == ["mu_0.00_0.00_1.00", "mu_1.00_0.00_0.00"]
    log = (root / "backbone2.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("merged: ")] == [
        f"merged: {root / 'soup' / 'merged' / name}" for name in ("mu_1.00_0.00_0.00", "mu_0.00_0.00_1.00")
    ]
    assert "merged: " not in (root / "backbone0.log").read_text()  # the soup was not complete yet
    if not CUDA:  # the GPU recipe's options ran turned off, each said in one line
        said = dict(  # option -> (now, was)
            (m[1], (m[2], m[3])) for m in re.finditer(r"^\[bonesoup\] --cpu: --(\S+) (\S+) \(was (\S+)\): ", log, re.M)
        )
        for option in ("ds.packing_samples", "train.dynamic_batch_enable", "vllm.enable_sleep", "ds.enable_sleep"):
            assert said[option] == ("False", "True"), said
        assert said["vllm.sync_backend"] == ("gloo", "nccl")
        assert "(PPOTrainerAsync pid=" in log and "(GenerateSamplesActor pid=" in log  # upstream's async trainer


def test_the_soup_merges_and_evaluates_through_vllm(recipe, tmp_path):
    """The recipe's last stages on the trained soup: merge at three preferences, evaluate through vLLM."""
    root, models = recipe["root"], recipe["models"]
    preferences = "1,0,0;0.2,0.5,0.3;0,0,1"
    cli = [sys.executable, "-m", "openrlhf_bonesoup.cli"]
    merged = subprocess.run(
        [*cli, "merge", "--soup_dir", str(root / "soup"), "--preferences", preferences,
         "--output", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr[-3000:]
    folders = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert len(folders) == 3
    corner = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m" / folders[-1]))  # mu = (1, 0, 0)
    assert corner.config.architectures == ["LlamaForCausalLM"]

    out = tmp_path / "eval"
    evaluated = subprocess.run(
        [*cli, "evaluate", "--soup_dir", str(root / "soup"), "--preferences", preferences,
         "--prompts", str(models["prompts"]), "--data.max_samples", "4", "--eval.max_new_tokens", "8",
         "--output", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "vllm" and results["objectives"] == NAMES
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # each preference's mean is that of its 4 responses' scores, as generations/ records them one per line
    assert len(results["preferences"]) == len(results["mean"]) == 3
    for mu, mean in zip(results["preferences"], results["mean"], strict=True):
        lines = (out / "generations" / f"mu_{'_'.join(f'{x:.2f}' for x in mu)}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 4 and all(r["response"] for r in records)
        assert mean == pytest.approx([sum(r[name] for r in records) / 4 for name in NAMES], rel=1e-6, abs=1e-9)


def test_a_lora_backbone_on_the_reward_func_route_under_zero3(models, tmp_path):
    """DAPO's recipe shape (group_norm, 2 samples per prompt, dynamic filtering) with its reward functions
    given upstream's way, `--reward.remote_url bonus.py,length.py`: no model objective, so the rollout workers
    score through the plugin's reward_func file (labels read from the dataset); ZeRO 3 shards a LoRA policy
    (`--ds.lora.rank`), whose weight sync OpenRLHF 0.11.2 cannot do alone (integration/lora_sync.py).
    Backbone 0 trains, vLLM gets its merged weights, the adapter is registered, and the log holds the
    combination. (The filter's own effect on h_j: test_integration_ray.py; here its range keeps every group.)"""
    (tmp_path / "bonus.py").write_text(models["reward_func"].read_text())
    (tmp_path / "length.py").write_text(
        "def reward_func(queries, prompts, labels):\n    return [len(q) / 100 for q in queries]\n"
    )
    args = argv(models, tmp_path, 0, tmp_path / "tb", steps=2)
    del args[args.index("--objectives") : args.index("--objectives") + 2]
    args += ["--reward.remote_url", f"{tmp_path / 'bonus.py'},{tmp_path / 'length.py'}"]
    args[args.index("--algo.advantage.estimator") + 1] = "group_norm"
    args += ["--rollout.n_samples_per_prompt", "2", "--algo.dynamic_filtering_enable"]
    args += ["--algo.dynamic_filtering_range", "-10", "10"]
    args[args.index("--ds.zero_stage") + 1] = "3"
    args += ["--ds.lora.rank", "8", "--ds.lora.alpha", "16"]
    # LoRA at ten times full fine-tuning's rate, as LoRA recipes run: step 1 must move the policy well beyond
    # the sync gap below. At 1e-2 its B (zero at the start) moved so little that step 2's k1 estimate of
    # the distance to the reference once came out at -7e-4, inside the gap (CI, 2026-12-07).
    args[args.index("--actor.adam.lr") + 1] = "1e-1"
    plan = json.loads(subprocess.run([*OURS, *args, "--dry_run"], capture_output=True, text=True, timeout=300).stdout)
    assert plan["bonesoup"]["route"] == "reward_func" and plan["critic.model_name_or_path"] is None
    assert [o["name"] for o in plan["bonesoup"]["objectives"]] == ["bonus", "length"]  # upstream's order, file stems
    launch([*OURS, *args], tmp_path / "log")

    backbone = tmp_path / "backbone0"
    assert soup.read_soup(tmp_path / "soup")["backbones"][0]["status"] == "trained"
    assert lora.is_adapter(backbone)  # the hook converted ZeRO 3's .bin into safetensors
    adapter = load_file(str(backbone / lora.ADAPTER_WEIGHTS))
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    logs = scalars(tmp_path / "tb" / "run")
    for step in (1, 2):
        values = [logs[f"train/reward/{name}"][step] for name in ("bonus", "length")]
        assert logs["train/reward"][step] == pytest.approx(0.7 * values[0] + 0.3 * values[1], rel=1e-4, abs=1e-5)
        # upstream's filter ran and kept every group: its rate is samples kept per prompt drawn, x 100 (2 per prompt)
        assert logs["train/dynamic_filtering_pass_rate"][step] == 200.0
    # LoRA's B starts at zero: step 2's rollouts are the first from a moved policy, generated by vLLM
    # from the merged weights the sync sent after step 1. Had vLLM kept its start (= the reference), its
    # log-probs would differ from the actor's as the reference's do: train/vllm_kl = -train/kl (k1, a
    # per-sample estimate of either sign), which is far from zero. vLLM runs W + s B A rounded once to bf16,
    # the actor W x + s B A x: their gap grows with the adapter (2e-3 at train/kl 9e-2, 2026-12-07), so it is
    # bounded relative to the distance from the reference.
    kl, vllm_kl = logs["train/kl"][2], logs["train/vllm_kl"][2]
    assert abs(kl) > 3 * SYNC_GAP, "the LoRA policy did not move"
    assert abs(vllm_kl) < abs(kl) / 10, logs["train/vllm_kl"]


@pytest.fixture(scope="module")
def resumed(recipe, tmp_path_factory) -> Path:
    """Backbone 0's launch resumed (--ckpt.load_enable, from its step-3 checkpoint) for a fourth step. On CPU
    vLLM receives the weights but keeps its own (cpu.DROP_SYNC_ENV): the sync check's negative control,
    in a launch whose policy starts 3 steps away from the SFT model vLLM holds."""
    root = tmp_path_factory.mktemp("resumed")
    again = argv(recipe["models"], root, 0, root / "tb", steps=4)
    ckpt = ["--ckpt.path", str(recipe["root"] / "ckpt"), "--ckpt.save_steps", "1", "--ckpt.load_enable"]
    launch([*OURS, *again, *ckpt], root / "log", None if CUDA else {cpu.DROP_SYNC_ENV: "1"})
    return root


def test_a_resumed_launch_continues_the_running_statistics(recipe, resumed):
    """The resumed launch's trainer starts from the running normalisation statistics saved with the step it
    resumes (OpenRLHF's checkpoint client_states), not from empty ones."""
    ckpt = recipe["root"] / "ckpt" / "_actor"

    def bonus_statistics(step: int) -> dict[str, float]:
        path = ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt"
        state = torch.load(path, map_location="cpu", weights_only=False)[STATE_KEY]
        return {key: state[key][NAMES.index("bonus")] for key in ("count", "mean", "m2")}

    step3, step4 = bonus_statistics(3), bonus_statistics(4)

    # 4 rollouts per step: the step-3 checkpoint counted 12; the resumed run's step 4 adds its own 4 to
    # those (statistics that started empty would count 4), and its mean is the 16 values' mean.
    assert step3["count"] == 12.0
    assert step4["count"] == 16.0
    logs = scalars(resumed / "tb" / "run")
    raw = logs["train/reward_raw/bonus"][4]  # the mean of step 4's 4 raw values
    assert step4["mean"] == pytest.approx((12 * step3["mean"] + 4 * raw) / 16, rel=1e-4, abs=1e-6)
    assert step4["m2"] >= step3["m2"]
    # step 4's rewards were normalised with those 16 values' statistics (combiners.Combination)
    std = (step4["m2"] / 16) ** 0.5
    assert logs["train/reward/bonus"][4] == pytest.approx((raw - step4["mean"]) / std, rel=1e-3, abs=1e-4)
    log = (resumed / "log").read_text()
    assert "Global step 4:" in log and "Global step 3:" not in log  # it resumed after step 3
    if CUDA:  # the sync kept: the resumed policy reached vLLM before its first rollouts
        assert abs(logs["train/vllm_kl"][4]) < SYNC_GAP, logs["train/vllm_kl"]


@pytest.mark.skipif(CUDA, reason="the sync is dropped inside the --cpu replacement of WorkerWrap.update_weight")
def test_with_the_sync_dropped_vllm_falls_behind(resumed):
    """test_the_weights_reach_vllm_after_each_step's check can fail: the resumed policy never reached vLLM,
    which still samples from the SFT model, the reference. Both are k1 estimates on vLLM's rollouts:
    train/kl averages log pi - log pi_ref per sample, train/vllm_kl log pi_vllm - log pi per token, so with
    pi_vllm = pi_ref one is about minus the other (measured in three runs: 0.8491 and -0.8489, 0.5982 and
    -0.5979, -0.0130 and 0.0133: how far 3 steps move the policy varies from run to run)."""
    logs = scalars(resumed / "tb" / "run")
    assert abs(logs["train/kl"][4]) > SYNC_GAP, "the resumed policy is the SFT model"
    assert abs(logs["train/vllm_kl"][4]) > SYNC_GAP, logs["train/vllm_kl"]  # the check above would fail
    assert logs["train/vllm_kl"][4] == pytest.approx(-logs["train/kl"][4], rel=0.25)  # vLLM holds pi_ref
