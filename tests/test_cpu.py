"""integration/cpu.py: each CUDA-site replacement of `--cpu` is needed by the upstream code it names, and none
is active without `--cpu`.

Each site runs OpenRLHF's own code (DeepspeedStrategy.setup_distributed on a one-process gloo world, its
replay buffer, its log-prob helper, its weight-sync group) in a process of its own that imports OpenRLHF
after the replacements, as a Ray worker of a `--cpu` launch runs it: once with every replacement (it must
work), once with that one left out (it must fail, in the site's code). The whole launch, with the weight
sync into a real vLLM engine, is tests/test_launch.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.integration import cpu, launcher, worker

# The upstream call each replacement stands for, run after `cpu.apply(...)`.
SETUP = """
import argparse, os
from openrlhf.utils.deepspeed import DeepspeedStrategy
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
ns = argparse.Namespace
args = ns(ds=ns(param_dtype="bf16", ring_attn_size=1, tensor_parallel_size=1), train=ns(dynamic_batch_enable=False),
          local_rank=-1)
strategy = DeepspeedStrategy(args=args)
strategy.setup_distributed()
"""
SITES = {
    "torch.cuda.set_device": SETUP,  # deepspeed.py:97
    # deepspeed.py:105-106 builds its mesh with init_device_mesh("cuda"): on gloo that works as it is
    # (its groups take the world's backend), so it needs no replacement; the dp group is used below.
    "torch.cuda.current_device": SETUP
    + "assert strategy.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]\n"
    + "torch.distributed.all_reduce(torch.ones(1), group=strategy.ds_device_mesh['dp'].get_group())",
    "torch.cuda.synchronize": SETUP
    + "from openrlhf.utils.distributed_util import torch_dist_barrier_and_cuda_sync\n"
    + "torch_dist_barrier_and_cuda_sync()",
    "replay_buffer.target_device": """
from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer
assert NaiveReplayBuffer(2).target_device == torch.device("cpu")
""",
    "torch.cuda.current_stream": "torch.cuda.current_stream()  # ppo_actor.py:436, the broadcast's stream",
    "flash_attn.ops.triton.cross_entropy": """
from openrlhf.models.utils import log_probs_from_logits
logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
expected = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
assert torch.allclose(log_probs_from_logits(logits, labels).double(), expected, atol=1e-5)
""",
    # Two ranks in two threads of one process: a stateless group, rank 0 broadcasts, rank 1 receives.
    "distributed_util.stateless_init_process_group": """
import threading
from openrlhf.utils import distributed_util
received = torch.zeros(3)
def rank(r):
    group = distributed_util.stateless_init_process_group("127.0.0.1", PORT, r, 2, torch.device("cpu"))
    tensor = torch.arange(3.0) if r == 0 else received
    group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
errors = []
def run(r):
    try:
        rank(r)
    except BaseException as e:
        errors.append(e)
threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
[t.start() for t in threads]; [t.join(120) for t in threads]
assert not errors, errors
assert received.tolist() == [0.0, 1.0, 2.0]
from openrlhf.trainer.ray import ppo_actor  # ppo_actor.py:24 imports the name: it gets the replacement
assert ppo_actor.stateless_init_process_group is distributed_util.stateless_init_process_group
""",
}


# One interpreter imports torch and DeepSpeed (~6 s on 2 cores) and forks a process per run: each run
# applies its replacements, then imports OpenRLHF's modules itself, as a Ray worker of a --cpu launch does
# after the worker hook. Fresh interpreters per run cost a minute of CI for the same imports.
FORKS = """
import json, os, signal, sys, traceback
import torch, deepspeed  # noqa: F401  (not OpenRLHF: each run imports it after its replacements)
runs, results = json.load(open(sys.argv[1])), {}
for i, (key, (names, code)) in enumerate(runs.items()):
    log = f"{sys.argv[1]}.{i}.log"
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT)
        os.dup2(fd, 1), os.dup2(fd, 2)
        signal.alarm(240)  # a run that hangs ends alone, not the whole fixture
        try:
            from openrlhf_bonesoup.integration import cpu
            cpu.apply(names)
            exec(compile(code, "<site>", "exec"), {"torch": torch, "PORT": 29500 + os.getppid() % 1000 + 2 * i})
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    results[key] = [os.waitstatus_to_exitcode(status), open(log).read()]
json.dump(results, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, list]:
    """{run: [exit code, output]}: every site with every replacement ("all"), each site without its own."""
    runs = {"all": [list(cpu.REPLACEMENTS), SETUP + "\n".join(s.replace(SETUP, "") for s in SITES.values())]}
    runs |= {name: [[n for n in cpu.REPLACEMENTS if n != name], code] for name, code in SITES.items()}
    path = tmp_path_factory.mktemp("sites") / "runs.json"
    path.write_text(json.dumps(runs))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", cpu.ENV: "1"}
    done = subprocess.run(
        [sys.executable, "-c", FORKS, str(path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(path.read_text())


def test_every_site_runs_with_every_replacement(sites):
    code, output = sites["all"]
    assert code == 0, output[-3000:]


@pytest.mark.parametrize("name", sorted(SITES))
def test_each_site_fails_without_its_replacement(sites, name):
    code, output = sites[name]
    assert code != 0, f"{name}: the upstream site ran without its replacement"
    assert 'File "<site>"' in output, output[-3000:]  # it failed in the site's code, not before it ran


def test_every_replacement_has_a_site_test():
    # vllm_worker_wrap.update_weight runs only inside a vLLM engine: test_launch.py's weight-sync check.
    assert set(cpu.REPLACEMENTS) - set(SITES) == {"vllm_worker_wrap.update_weight"}


def test_nothing_is_replaced_without_cpu():
    """The Ray hook and vLLM's plugin entry in a process without OPENRLHF_BONESOUP_CPU: upstream as it is."""
    script = """
import torch
upstream = (torch.cuda.current_device, torch.cuda.set_device, torch.cuda.synchronize, torch.cuda.current_stream)
from openrlhf_bonesoup.integration import cpu, worker
worker.setup()
cpu.vllm_plugin()
from openrlhf_bonesoup.integration.imports import provide_flash_attn_2_cuda
provide_flash_attn_2_cuda()  # the import stand-in only: openrlhf.models needs it on any CPU machine
from openrlhf.utils import distributed_util
from openrlhf.trainer.ppo_utils import replay_buffer
from openrlhf.trainer.ray import ppo_actor, vllm_worker_wrap
import flash_attn.ops.triton.cross_entropy  # importable: nothing blocks it
assert (torch.cuda.current_device, torch.cuda.set_device, torch.cuda.synchronize, torch.cuda.current_stream) == upstream
assert distributed_util.stateless_init_process_group.__module__ == "openrlhf.utils.distributed_util"
assert ppo_actor.stateless_init_process_group is distributed_util.stateless_init_process_group
assert replay_buffer.NaiveReplayBuffer.__init__.__module__ == "openrlhf.trainer.ppo_utils.replay_buffer"
assert vllm_worker_wrap.WorkerWrap.update_weight.__module__ == "openrlhf.trainer.ray.vllm_worker_wrap"
"""
    env = {k: v for k, v in os.environ.items() if k != cpu.ENV}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_vllm_multiprocessing_value_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.delenv(cpu.VLLM_MP_ENV, raising=False)
    assert launcher.runtime_env({}, cpu_launch=True)["env_vars"][cpu.VLLM_MP_ENV] == "0"
    monkeypatch.setenv(cpu.VLLM_MP_ENV, "1")
    assert launcher.runtime_env({}, cpu_launch=True)["env_vars"][cpu.VLLM_MP_ENV] == "1"


def reward_funcs(tmp_path) -> str:
    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text("def reward_func(queries, prompts, labels):\n    return [0.0]\n")
    return f"{tmp_path / 'a.py'},{tmp_path / 'b.py'}"


def test_the_launcher_sets_cpu_only_with_cpu(tiny, tmp_path):
    """--dry_run: without --cpu the Ray workers get no CPU switch and OpenRLHF's options are untouched;
    with it, the switch and what --cpu changed (gloo weight sync, eager attention, the KV-cache share)."""
    policy = tiny["policy"]
    argv = ["--actor.model_name_or_path", str(policy), "--reward.model_name_or_path", reward_funcs(tmp_path)]
    argv += ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"]
    argv += ["--ckpt.output_dir", str(tmp_path / "ckpt"), "--logger.wandb.run_name", "run"]
    plain, args = launcher.resolve(argv)
    assert cpu.ENV not in plain["runtime_env"]["env_vars"] and plain["cpu"] is None
    assert cpu.VLLM_MP_ENV not in plain["runtime_env"]["env_vars"]  # vLLM's own process layout on a GPU
    assert args.vllm.sync_backend == "nccl" and args.ds.attn_implementation == "flash_attention_2"

    env = {k: v for k, v in os.environ.items() if k != cpu.VLLM_MP_ENV}  # a value set here would be kept
    done = subprocess.run(
        [sys.executable, "-m", "openrlhf_bonesoup.cli.train_ppo_ray", *argv, "--cpu", "--dry_run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout)
    assert plan["runtime_env"]["env_vars"][cpu.ENV] == "1"
    assert plan["runtime_env"]["env_vars"][cpu.VLLM_MP_ENV] == "0"  # the model in the engine core's process
    assert plan["runtime_env"]["worker_process_setup_hook"] == worker.SETUP_HOOK
    assert {option: change[:2] for option, change in plan["cpu"].items()} == {
        **{f"{group}.num_gpus_per_node": [8, 1] for group in ("actor", "ref", "critic", "reward")},
        "vllm.num_engines": [None, 1],
        "vllm.sync_backend": ["nccl", "gloo"],
        "ds.attn_implementation": ["flash_attention_2", "eager"],
        "vllm.gpu_memory_utilization": [0.95, 0.05],
        "vllm.enforce_eager": [False, True],
    }
    assert all(isinstance(why, str) and why for _, _, why in plan["cpu"].values())  # each says why


def test_cpu_alone_rehearses_openrlhfs_own_launch(tiny, tmp_path):
    """`--cpu` without a combiner: OpenRLHF's launch as it is (its one reward model, its reward path, upstream's
    critic default), with what --cpu changes; no Bone Soup config reaches the workers. Without --cpu the
    launcher still asks for a combiner."""
    argv = ["--actor.model_name_or_path", str(tiny["policy"]), "--reward.model_name_or_path", str(tiny["rm_llama"])]
    argv += ["--ckpt.output_dir", str(tmp_path / "ckpt")]
    plan, args = launcher.resolve([*argv, "--cpu"])
    assert plan["bonesoup"] is None and plan["soup"] is None
    assert plan["reward.model_name_or_path"] == str(tiny["rm_llama"]) and plan["reward.remote_url"] is None
    assert plan["critic.model_name_or_path"] is None  # upstream starts its critic from the reward model
    env_vars = plan["runtime_env"]["env_vars"]
    assert worker.CONFIG_ENV not in env_vars and env_vars[cpu.ENV] == "1"
    assert plan["cpu"]["vllm.sync_backend"][1] == "gloo" and args.vllm.sync_backend == "gloo"
    with pytest.raises(BoneSoupError, match="--reward_combiner is required"):
        launcher.resolve(argv)


# What each GPU-only option is set to by upstream's recipes (examples/scripts of 0.11.2) when given.
GIVEN = {
    "ds.packing_samples": [],
    "train.dynamic_batch_enable": [],
    "vllm.enable_sleep": [],
    "ds.enable_sleep": [],
    "vllm.sync_with_ray": [],
    "vllm.sync_backend": ["nccl"],
    "ds.ring_attn_size": ["2"],
    "ds.tensor_parallel_size": ["2"],
    "vllm.tensor_parallel_size": ["2"],
}


def test_gpu_only_options_are_turned_off_with_cpu_not_refused(tiny, tmp_path):
    """--cpu rehearses the user's exact command: options that only change a GPU launch's speed or memory are
    set to what runs here, each listed with why; without --cpu they stay as given."""
    assert set(GIVEN) == set(cpu.CPU_OFF)
    argv = ["--actor.model_name_or_path", str(tiny["policy"]), "--reward.model_name_or_path", reward_funcs(tmp_path)]
    argv += ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"]
    for option, value in GIVEN.items():
        argv += [f"--{option}", *value]
    _, args = launcher.resolve(argv)
    assert args.ds.packing_samples and args.vllm.enable_sleep and args.ds.ring_attn_size == 2  # upstream's
    plan, args = launcher.resolve([*argv, "--cpu"])
    for option, (off, why) in cpu.CPU_OFF.items():
        group, name = option.split(".")
        assert getattr(getattr(args, group), name) == off, option
        assert plan["cpu"][option][1:] == [off, why], option
    assert plan["cpu"]["ds.ring_attn_size"][0] == 2 and plan["cpu"]["ds.packing_samples"][0] is True


def test_4bit_loading_stays_refused_in_one_line_exit_2(tiny, tmp_path):
    """Turning 4-bit loading off would rehearse full-precision weights: the one refusal that stays."""
    assert set(cpu.CPU_REFUSED) == {"ds.load_in_4bit"}
    argv = ["--actor.model_name_or_path", str(tiny["policy"]), "--reward.model_name_or_path", reward_funcs(tmp_path)]
    argv += ["--cpu", "--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0", "--dry_run"]
    done = subprocess.run(
        [sys.executable, "-m", "openrlhf_bonesoup.cli.train_ppo_ray", *argv, "--ds.load_in_4bit"],
        capture_output=True,
        text=True,
    )
    refusal = "error: --ds.load_in_4bit cannot run with --cpu: " + cpu.CPU_REFUSED["ds.load_in_4bit"]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(refusal)


def test_each_change_is_one_printed_line(tiny, tmp_path, capsys):
    """A launch prints what --cpu changed, one line each (stopped where Ray would start)."""
    argv = ["--actor.model_name_or_path", str(tiny["policy"]), "--reward.model_name_or_path", reward_funcs(tmp_path)]
    argv += ["--cpu", "--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"]
    argv += ["--vllm.enable_sleep", "--ds.packing_samples"]
    launch, _ = launcher.resolve(argv)

    class Started(Exception):
        pass

    def no_ray(env, local):  # Ray would start here, right after the lines are printed
        raise Started

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launcher, "_start_ray", no_ray)
        with pytest.raises(Started):
            launcher.apply(launch)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[bonesoup] --cpu:")]
    assert "[bonesoup] --cpu: --vllm.enable_sleep False (was True): " + cpu.CPU_OFF["vllm.enable_sleep"][1] in lines
    assert any(line.startswith("[bonesoup] --cpu: --ds.packing_samples False (was True): ") for line in lines)
    assert len(lines) == len(set(lines)) >= 6  # sleep, packing, sync backend, attention, memory, engines, ...
