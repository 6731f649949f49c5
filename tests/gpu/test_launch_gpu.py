"""A real launch on one GPU: `python -m openrlhf_bonesoup.cli.train_ppo_ray`, as a user types it.

OpenRLHF's hybrid engine at the smallest scale (examples/scripts/train_bonesoup_backbones.sh's recipe
on one GPU): --train.colocate_all, one vLLM engine of tensor parallel size 1, vLLM and DeepSpeed sleep
modes, ZeRO-3, PPO with GAE (the critic starts from the policy, the launcher's default) and a
reference model. A tiny policy (head size 64, for vLLM's kernels) and two tiny RMs (an OpenRLHF RM on
the policy's tokenizer, an HF classifier on its own), --reward_combiner bonesoup --beta 0.7, backbone 0
(weights 0.7, 0.3); 8 prompts from a local JSONL, rollout and train batches of 4: two PPO steps.

It must return 0, save the policy (the whole model: ZeRO-3's consolidated state dict), register
backbone 0 in soup.json as trained with that checkpoint, and log, for each step, `reward/<name>` of
each objective through OpenRLHF's TensorboardLogger (`train/reward/<name>`, with the policy actor's
sample-weighted means), whose combination is the logged `train/reward`.

Skipped without CUDA (tests/conftest.py) and, module-level, without a real vllm (the CPU stand-in in
tests/stand_ins does not count), ray, deepspeed or tensorboard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed", reason="deepspeed is not installed (see docs/gpu.md)")
pytest.importorskip("ray", reason="ray is not installed (see docs/gpu.md)")
pytest.importorskip("tensorboard", reason="tensorboard is not installed (see docs/gpu.md)")

import rollouts
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from openrlhf_bonesoup import evaluate, soup

REAL_VLLM = "vllm is not installed for real (the CPU stand-in in tests/stand_ins does not count)"
pytestmark = pytest.mark.skipif(not evaluate.vllm_usable(), reason=REAL_VLLM)
WEIGHTS = {"helpful": 0.7, "polite": 0.3}  # row 0 of B(0.7) for n = 2


def launch_argv(tiny_gpu, tmp_path) -> list[str]:
    objectives = tmp_path / "objectives.yaml"
    objectives.write_text(
        json.dumps(
            [
                {"name": "helpful", "path": str(tiny_gpu["rm"])},
                {"name": "polite", "path": str(tiny_gpu["classifier"]), "label": 1, "normalize": "running"},
            ]
        )
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input": p}) + "\n" for p, _ in rollouts.PROMPTS))
    argv = ["--actor.model_name_or_path", str(tiny_gpu["policy"]), "--objectives", str(objectives)]
    argv += ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"]
    argv += ["--soup_dir", str(tmp_path / "soup"), "--ckpt.output_dir", str(tmp_path / "backbone0")]
    argv += ["--logger.tensorboard_dir", str(tmp_path / "tb"), "--logger.wandb.run_name", "launch"]
    for group in ("actor", "ref", "reward", "critic"):
        argv += [f"--{group}.num_nodes", "1", f"--{group}.num_gpus_per_node", "1"]
    argv += ["--train.colocate_all", "--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "1"]
    argv += ["--vllm.gpu_memory_utilization", "0.3", "--vllm.enforce_eager", "--vllm.enable_sleep"]
    argv += ["--ds.enable_sleep", "--ds.zero_stage", "3", "--ds.param_dtype", "bf16"]
    argv += ["--ds.attn_implementation", "sdpa"]  # no flash-attn build needed
    argv += ["--data.prompt_dataset", str(prompts), "--data.input_key", "input", "--data.max_samples", "8"]
    argv += ["--data.max_len", "128", "--rollout.max_new_tokens", "16", "--rollout.n_samples_per_prompt", "1"]
    argv += ["--rollout.batch_size", "4", "--rollout.micro_batch_size", "2"]
    argv += ["--train.batch_size", "4", "--train.micro_batch_size", "2", "--train.max_epochs", "1"]
    return argv


def scalars(log_dir) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard log folder: {tag: {step: value}}."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_a_real_launch_trains_logs_saves_and_registers_the_backbone(tiny_gpu, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray cluster
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        command = [sys.executable, "-m", "openrlhf_bonesoup.cli.train_ppo_ray", *launch_argv(tiny_gpu, tmp_path)]
        returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=1500).returncode
    assert returncode == 0, log.read_text()[-6000:]

    # The policy, saved whole by OpenRLHF's save_model.
    checkpoint = tmp_path / "backbone0"
    saved = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    sft = AutoModelForCausalLM.from_pretrained(str(tiny_gpu["policy"]))
    assert {k: v.shape for k, v in saved.state_dict().items()} == {k: v.shape for k, v in sft.state_dict().items()}

    manifest = soup.read_soup(tmp_path / "soup")
    assert manifest["beta"] == 0.7 and [o["name"] for o in manifest["objectives"]] == list(WEIGHTS)
    backbone = manifest["backbones"][0]
    assert backbone["status"] == "trained" and backbone["checkpoint"] == str(checkpoint.resolve())
    assert backbone["sha256_headers_and_samples"] == soup.checkpoint_identity(checkpoint)["sha256_headers_and_samples"]
    assert manifest["backbones"][1] is None  # not launched

    logs = scalars(tmp_path / "tb" / "launch")
    assert "train/reward" in logs, sorted(logs)
    assert set(logs["train/reward"]) == {1, 2}  # two PPO steps
    for step in (1, 2):
        values = {name: logs[f"train/reward/{name}"][step] for name in WEIGHTS}
        assert all(f"train/reward_raw/{name}" in logs for name in WEIGHTS)
        combined = sum(WEIGHTS[name] * value for name, value in values.items())
        assert logs["train/reward"][step] == pytest.approx(combined, rel=1e-4, abs=1e-5)
