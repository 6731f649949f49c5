"""GPU-only tests (docs/gpu.md): every test in this folder gets the `gpu` marker, and without CUDA it
is skipped with a one-line reason, so the CPU suite and CI are unchanged.

On a GPU machine: `python -m pytest tests -m gpu`. The fixtures of tests/conftest.py (tiny models,
stand-ins appended behind the real modules) apply here too.
"""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NO_CUDA = "no CUDA GPU here (torch.cuda.is_available() is False): run on a GPU machine, see docs/gpu.md"


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))
