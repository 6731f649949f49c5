"""Test set-up: the plugin's stand-in `flash_attn_2_cuda` everywhere, and tiny local checkpoints.

flash-attn's compiled CUDA extension cannot exist on a CPU machine, yet `import flash_attn` (so
openrlhf.models) needs it. The plugin provides a stand-in on machines without CUDA
(openrlhf_bonesoup/integration/imports.py, last on sys.meta_path: a real module always wins): here, and in
subprocesses and Ray workers through tests/boot/sitecustomize.py (named in PYTHONPATH). Everything else is
the installed, real openrlhf 0.11.2, vLLM (its CPU build), DeepSpeed and Ray.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from openrlhf_bonesoup.integration.imports import provide_flash_attn_2_cuda

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BOOT = TESTS / "boot"

provide_flash_attn_2_cuda()
_pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
if str(BOOT) not in _pythonpath:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *_pythonpath, str(BOOT)])
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries to download fails at once
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A checkpoint's own code (trust_remote_code tests) is copied here, not into ~/.cache/huggingface.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="bonesoup-hf-modules-"))

import tiny_models  # noqa: E402  (needs the path set-up above)

GPU_TESTS = TESTS / "gpu"
HEAVY_FIRST = ("test_demo_recipe.py", "test_launch.py", "test_upstream_recipes.py", "test_integration_ray.py")
HEAVY_FIRST += ("test_serve.py", "test_first_hour.py", "test_remote.py", "test_evaluate_vllm.py")
NO_CUDA = "no CUDA GPU here (torch.cuda.is_available() is False): run on a GPU machine, see docs/gpu.md"


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` selects by marker
def pytest_collection_modifyitems(config, items):
    """Every test under tests/gpu/ gets the `gpu` marker and, without CUDA, a one-line skip: the CPU
    suite and CI are unchanged. (One conftest for the whole suite: a second one in tests/gpu would be
    imported under the same module name, `conftest`, that the test modules import from.)"""
    import torch

    for item in items:
        if GPU_TESTS in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))
    # The heaviest files first (each starts several Ray + DeepSpeed + vLLM launches or engines): with
    # `--dist loadfile --no-loadscope-reorder` (pyproject.toml) xdist hands files to its processes in this
    # order; by its default order (most tests first) the heavy files, which have few tests, came last and one
    # ran alone at the end of the suite for minutes (CI, 2026-12-08). Stable sort: the rest keep their order.
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.fspath).name, len(rank)))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; without xdist: `pytest -o addopts=-ra tests`
def pytest_xdist_auto_num_workers(config) -> int | None:
    """`-n auto` (pyproject.toml). Without CUDA two processes, one per core of the CI machine: one process
    keeps the cores busy 67% of the time (it waits on the subprocesses, Ray actors and vLLM engines its
    tests start), two 96% (measured 2026-12-05, docs/testing.md). On a GPU machine none: the launch, serve
    and vLLM tests each take a share of the one GPU's memory and must not run at once. xdist's own
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    import torch

    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return 0 if torch.cuda.is_available() else 2


@pytest.fixture(scope="module", autouse=True)
def _environment_per_file():
    """Each test file starts from the environment the session started with. Commands run in-process set
    variables for the libraries they import (the CLI sets VLLM_LOGGING_LEVEL=ERROR before vLLM is imported);
    kept, they reached a later file's launches through their subprocesses (vLLM's INFO lines went missing)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints, built once per session:

    - policy: LLaMA causal LM, "llama" tokenizer (the SFT model)
    - rm_llama: OpenRLHF-format RM sharing the policy tokenizer
    - rm_gpt2: OpenRLHF-format RM on GPT-2 with its own "gpt2" tokenizer
    - classifier: HF GPT-2 sequence classifier (2 labels), "gpt2" tokenizer
    - deberta: HF DeBERTa-v2 sequence classifier (2 labels; no flash attention, no sdpa), "gpt2" tokenizer
    """
    root = tmp_path_factory.mktemp("tiny")
    names = ("policy", "gpt2_lm", "rm_llama", "rm_gpt2", "classifier", "deberta")
    paths = {name: root / name for name in names}
    llama_tok = tiny_models.make_tokenizer(root / "tok_llama", "llama")
    gpt2_tok = tiny_models.make_tokenizer(root / "tok_gpt2", "gpt2")
    tiny_models.make_llama_lm(paths["policy"], llama_tok, seed=0)
    tiny_models.make_gpt2_lm(paths["gpt2_lm"], gpt2_tok, seed=1)
    tiny_models.make_openrlhf_rm(paths["rm_llama"], paths["policy"], seed=2)
    tiny_models.make_openrlhf_rm(paths["rm_gpt2"], paths["gpt2_lm"], seed=3)
    tiny_models.make_hf_classifier(paths["classifier"], gpt2_tok, seed=4)
    tiny_models.make_deberta_classifier(paths["deberta"], gpt2_tok, seed=5)
    return paths


@pytest.fixture(scope="session")
def tiny_gpu(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints for tests/gpu, hidden size 256 with 4 heads: head size 64, which vLLM's
    attention kernels take; weight matrices of 256 x 512 and more (over 1e5 elements, DeepSpeed's
    default stage3_param_persistence_threshold), which ZeRO-3 really partitions and gathers.

    - policy: LLaMA causal LM, "llama" tokenizer
    - rm: OpenRLHF-format RM on it (the policy tokenizer)
    - classifier: HF GPT-2 sequence classifier (2 labels), "gpt2" tokenizer
    """
    root = tmp_path_factory.mktemp("tiny_gpu")
    paths = {name: root / name for name in ("policy", "rm", "classifier")}
    llama_tok = tiny_models.make_tokenizer(root / "tok_llama", "llama")
    gpt2_tok = tiny_models.make_tokenizer(root / "tok_gpt2", "gpt2")
    tiny_models.make_llama_lm(paths["policy"], llama_tok, seed=0, hidden_size=256)
    tiny_models.make_openrlhf_rm(paths["rm"], paths["policy"], seed=2)
    tiny_models.make_hf_classifier(paths["classifier"], gpt2_tok, seed=4, hidden_size=256)
    return paths


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_serve(args: list[str]) -> tuple[subprocess.Popen, str]:
    """`openrlhf-bonesoup serve ARGS --port P` started as a user starts it; returns (process, base URL) at once.
    Its output goes to files (a pipe nobody reads would block the server once full): `stop_serve` returns it."""
    import sys

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "openrlhf-bonesoup"), "serve", "--port", str(port), *args]
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = out
    return proc, f"http://127.0.0.1:{port}"


def serve_output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def wait_serve(proc: subprocess.Popen, url: str, timeout: float = 600) -> None:
    """Until GET /health answers (vLLM's engine start: 10-80 s on a busy 2-core machine)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}: {serve_output(proc)[-3000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline:
                stop_serve(proc)
                pytest.fail(f"serve did not answer /health within {timeout} s")
            time.sleep(0.5)


def stop_serve(proc: subprocess.Popen) -> str:
    """SIGTERM, as a service manager stops it; returns everything it printed (stdout and stderr)."""
    if proc.poll() is None:
        proc.terminate()
    proc.wait(timeout=120)
    return serve_output(proc)
