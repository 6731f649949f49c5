"""Import-time machinery: every finder the plugin puts on `sys.meta_path`, in one place.

- `on_import(name, patch)`: patch an OpenRLHF module right after it is imported (worker.py, cpu.py).
- `provide_flash_attn_2_cuda()`: a stand-in for flash-attn's compiled CUDA extension on a machine
  without CUDA (cpu.py, models.py, the tests' sitecustomize); `without_gpu_stack()`: for as long as
  OpenRLHF's parser runs, a stand-in `vllm` too (the launcher's --help and --dry_run).
- `refuse_import(name, reason)`: make an importable module fail to import (cpu.py).

Standard library only: the worker hook runs in every Ray worker and vLLM process, which must not pay for
heavy imports, and tests/boot/sitecustomize.py imports this module in every test subprocess.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Collection, Iterator
from types import ModuleType

FLASH_ATTN_2_CUDA = "flash_attn_2_cuda"


class PatchOnImport(importlib.abc.MetaPathFinder):
    # Finds `name` with the finders after it (site-packages, editable installs...) and runs
    # `patch(module)` right after the module's own code. It removes itself first: one module, one
    # patch, no recursion.
    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        upstream_exec = spec.loader.exec_module

        def exec_module(module):
            upstream_exec(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


def on_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run `patch(module)` when module `name` is imported, or now if it already is (once per name)."""
    if name in sys.modules:
        patch(sys.modules[name])
    elif not any(isinstance(f, PatchOnImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, PatchOnImport(name, patch))


class StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # Placeholder modules for `names` and their submodules, while `needed()` holds. Appended last on
    # sys.meta_path, so it is asked only when no installed module was found: a real one always wins.
    # Any name taken from a placeholder is a class that raises when called or instantiated: importing
    # works (`from vllm import LLM`), using fails loudly, never silently.
    def __init__(self, names: Collection[str], needed: Callable[[], bool] = lambda: True):
        self.names, self.needed = tuple(names), needed

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.names or not self.needed():
            return None
        origin = f"openrlhf_bonesoup (a stand-in: {fullname} is not installed here)"
        return importlib.util.spec_from_loader(fullname, self, origin=origin, is_package=True)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        def missing(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def refuse(*args, **kwargs):
                from openrlhf_bonesoup.errors import BoneSoupError  # only when a stand-in is used

                raise BoneSoupError(f"{module.__name__}.{attr}: {module.__name__} is not installed here")

            return type(attr, (), {"__init__": refuse, "__call__": refuse})

        module.__getattr__ = missing


def _no_cuda() -> bool:
    # Asked only once flash_attn (so torch) is being imported: the CUDA check costs nothing then.
    return not sys.modules["torch"].cuda.is_available()


def provide_flash_attn_2_cuda() -> None:
    """A stand-in `flash_attn_2_cuda` on a machine without CUDA, never ahead of a real one.

    flash-attn's compiled CUDA extension cannot exist there, yet `import flash_attn` (and so
    `openrlhf.models`) needs it; OpenRLHF calls only flash-attn's pure-PyTorch padding helpers on the
    paths that run on CPU (`--cpu`, and `score`, `evaluate`, `serve` loading OpenRLHF-format reward models).
    """
    if not any(isinstance(f, StandIn) and FLASH_ATTN_2_CUDA in f.names for f in sys.meta_path):
        sys.meta_path.append(StandIn((FLASH_ATTN_2_CUDA,), needed=_no_cuda))


@contextlib.contextmanager
def without_gpu_stack() -> Iterator[None]:
    """While the block runs, OpenRLHF's train_ppo_ray imports and parses its flags on a machine without its
    GPU stack: stand-ins for `vllm` and `flash_attn_2_cuda` (CUDA or not: a GPU machine may lack the compiled
    extension too), forgotten after, sys.modules included. Real modules are found first."""
    finder = StandIn(("vllm", FLASH_ATTN_2_CUDA))
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if getattr(m, "__loader__", None) is finder]:
            del sys.modules[name]


class _Refused(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise ImportError(f"{self.name}: {self.reason}")
        return None


def refuse_import(name: str, reason: str) -> None:
    """From now on in this process, `import name` raises ImportError(reason), as where it is not installed."""
    if not any(isinstance(f, _Refused) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _Refused(name, reason))
    sys.modules.pop(name, None)
