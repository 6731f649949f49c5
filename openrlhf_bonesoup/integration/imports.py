"""Patch a module right after it is imported: a one-shot import finder.

The Ray worker hook (worker.py) and the `--cpu` replacements (cpu.py) both patch OpenRLHF modules
when OpenRLHF itself imports them. The finder lives here, in its own module, so that neither of the
two takes the other's private names and they do not import each other. Standard library only: the
hook runs in every Ray worker and vLLM process, which must not pay for heavy imports.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


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
