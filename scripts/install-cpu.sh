#!/usr/bin/env bash
# CPU install of the real OpenRLHF 0.11.2 stack plus this plugin into ./.venv. Idempotent: a second
# run only checks what is there.
#
# The recipe (measured on 2-core CPU machines, no GPU): torch is always named with its pin, so pip can
# never resolve a multi-GB CUDA build; openrlhf goes in with --no-deps because its metadata pins
# flash-attn (a CUDA build) and vllm; flash-attn goes in as its pure-Python package. Its CUDA
# extension and vllm cannot exist on CPU: tests/stand_ins/ covers them, for the tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH="torch==2.13.0"

[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

"${PIP[@]}" "$TORCH"
"${PIP[@]}" --no-deps openrlhf==0.11.2
"${PIP[@]}" "$TORCH" deepspeed==0.19.6 "ray[default]==2.55.0" transformers==5.15.0 accelerate datasets \
    peft einops jsonlines loralib optree packaging tensorboard torchdata torchmetrics tqdm \
    aiohttp "grpcio>=1.74.0" "huggingface-hub>=1.0.0" pylatexenc sympy "pynvml>=12.0.0" safetensors
if ! "$VENV/bin/python" -m pip show -q flash-attn >/dev/null 2>&1; then
    FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE \
        "${PIP[@]}" --no-build-isolation flash-attn==2.8.3
fi
# The plugin (editable) and its test tools. --no-deps: its declared dependencies are all above, and
# letting pip resolve openrlhf's own pins would pull flash-attn's CUDA build and vllm.
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "$TORCH" numpy scipy matplotlib moocore pyyaml pytest hypothesis ruff openai==3.54.0
# `serve` and openrlhf.cli.serve_rm (the remote RM server the tests run) need these; openrlhf's metadata omits them.
"${PIP[@]}" fastapi==0.165.0 uvicorn==0.54.0
"$VENV/bin/python" -c 'import torch, transformers, importlib.metadata as m; print("installed:", "torch", torch.__version__, "openrlhf", m.version("openrlhf"), "transformers", transformers.__version__)'
