#!/usr/bin/env bash
# Offline install of this plugin and the OpenRLHF 0.11.2 stack on a Linux x86-64 machine that has its
# CUDA build of torch and no package index (docs/gpu.md). Both steps are idempotent.
#   bash scripts/install-gpu-offline.sh download DIR [--python-version 3.12] [--torch 2.11.0] [--glibc 2.35]
#        [--no-vllm]                       # any machine with PyPI, run with a Python that has torch
#   bash scripts/install-gpu-offline.sh install DIR [--venv PATH]      # the GPU machine, offline
#
# torch is never downloaded nor installed: uv resolves the pins for the target with its torch as a real
# requirement, the lists leave out what that torch brings (torch, triton, nvidia-*, cuda-*), and install
# pip-installs exactly the lists with --no-deps, so pip resolves nothing and cannot reach for torch.
# vllm 0.29.0 pins torch 2.13.0: its set is a second list, taken only where the machine has that torch.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
UV_VERSION=0.13.9

# The `user` set of scripts/install-cpu.sh (tests/test_repo.py checks it), plus the test tools and this
# plugin; the plugin's own dependencies (numpy, scipy, moocore, ...) come with it. fastapi and uvicorn
# are not pinned here: vllm 0.29.0 needs fastapi < 0.137, and the resolver picks versions both sets accept.
STACK=(openrlhf==0.11.2 deepspeed==0.19.6 "ray[default]==2.55.0" transformers==5.15.0 flash-attn==2.8.3
    accelerate datasets peft einops jsonlines loralib optree packaging tensorboard torchdata torchmetrics tqdm
    aiohttp "grpcio>=1.74.0" "huggingface-hub>=1.0.0" pylatexenc sympy "pynvml>=12.0.0" safetensors
    pytest pytest-xdist hypothesis fastapi uvicorn)
VLLM=vllm==0.29.0   # openrlhf 0.11.2's [vllm] extra

die() { echo "install-gpu-offline: $*" >&2; exit 1; }
# Quiet on success; on failure the command's whole output, then the command.
run() {
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        die "failed: $*"
    fi
}

usage() { sed -n '4,6p' "$0" >&2; exit 2; }

download() {
    local dir=$1 pyver=3.12 torch=2.11.0 glibc=2.35 vllm=1
    shift
    while [ $# -gt 0 ]; do
        case $1 in
            --python-version) pyver=$2; shift 2 ;;
            --torch) torch=$2; shift 2 ;;
            --glibc) glibc=$2; shift 2 ;;
            --no-vllm) vllm=0; shift ;;
            *) usage ;;
        esac
    done
    local py=${PYTHON:-$ROOT/.venv/bin/python}
    [ -x "$py" ] || py=python3
    "$py" -c 'import torch' 2>/dev/null || die "$py has no torch: flash-attn's and deepspeed's setup.py import it (any build; set PYTHON)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT

    # PyPI has only source archives of deepspeed and flash-attn: both build as pure-Python wheels (the
    # CUDA kernels of flash-attn cannot be built without the target's toolkit: docs/gpu.md); the plugin
    # comes from this checkout.
    run env DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" deepspeed==0.19.6
    run env FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE \
        "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" flash-attn==2.8.3
    run "$py" -m pip wheel -q --no-deps -w "$dir" "$ROOT"
    local plugin
    plugin=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml")

    run "$py" -m pip install -q --target "$tmp/uv" "uv==$UV_VERSION"
    # openrlhf goes in without its metadata's dependencies, as in install-cpu.sh (they pin flash-attn's
    # CUDA build, vllm, bitsandbytes, wandb, ...); uv reads this instead of openrlhf's own list.
    printf '[[dependency-metadata]]\nname = "openrlhf"\nversion = "0.11.2"\nrequires-dist = []\n' >"$tmp/uv.toml"
    local uv=(env UV_PYTHON_DOWNLOADS=never "$tmp/uv/bin/uv" pip compile -q --no-header --no-annotate
        --config-file "$tmp/uv.toml" --python-version "$pyver" --python-platform "x86_64-manylinux_${glibc/./_}"
        --only-binary :all: --find-links "$dir")

    # resolve OUT REQUIREMENT...: the pinned set for the target, less torch and what torch brings.
    resolve() {
        local out=$1
        shift
        printf '%s\n' "${STACK[@]}" "openrlhf-bonesoup==$plugin" "$@" >"$tmp/in.txt"
        run "${uv[@]}" -o "$tmp/all.txt" "$tmp/in.txt"
        grep '^torch==' "$tmp/all.txt" >"$tmp/torch.txt"
        run "${uv[@]}" -o "$tmp/torch-all.txt" "$tmp/torch.txt"
        grep -E '^(torch|triton|nvidia-.*|cuda-.*)==' "$tmp/torch-all.txt" | cut -d= -f1 >"$tmp/skip.txt"
        {
            echo "# resolved for $(cat "$tmp/torch.txt"), Python $pyver, manylinux glibc $glibc by install-gpu-offline.sh"
            echo "# not downloaded (the target's torch brings them): $(tr '\n' ' ' <"$tmp/skip.txt")"
            awk -F'==' 'NR == FNR { skip[$1]; next } !($1 in skip)' "$tmp/skip.txt" "$tmp/all.txt"
        } >"$out"
    }
    resolve "$dir/requirements.txt" "torch==$torch"
    local lists=("$dir/requirements.txt")
    rm -f "$dir/requirements-vllm.txt"
    if [ "$vllm" = 1 ]; then
        resolve "$dir/requirements-vllm.txt" "$VLLM"
        lists+=("$dir/requirements-vllm.txt")
    fi

    # pip matches platform tags literally: name every manylinux tag the target's glibc accepts.
    local platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
    local minor
    for minor in $(seq 5 "${glibc#*.}"); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
    local list
    for list in "${lists[@]}"; do  # one list at a time: the two may pin different versions of a package
        run "$py" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
            "${platforms[@]}" --find-links "$dir" -d "$dir" -r "$list"
    done
    sort -u "${lists[@]}" | grep -v '^#' >"$tmp/keep.txt"

    # Exactly the lists' wheels stay (a re-run with other options leaves no stale ones).
    local f name rest
    for f in "$dir"/*.whl; do
        name=${f##*/}
        rest=${name#*-}
        name=$(echo "${name%%-*}" | tr 'A-Z_.' 'a-z--')
        grep -qxF "$name==${rest%%-*}" "$tmp/keep.txt" || rm -f "$f"
    done
    echo "downloaded $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1), into $dir"
    echo "  $(head -1 "$dir/requirements.txt" | cut -c3-): $(grep -vc '^#' "$dir/requirements.txt") packages"
    if [ "$vllm" = 1 ]; then
        echo "  with vllm, $(head -1 "$dir/requirements-vllm.txt" | cut -c3-): $(grep -vc '^#' "$dir/requirements-vllm.txt") packages"
    fi
}

install() {
    local dir=$1 venv=""
    shift
    while [ $# -gt 0 ]; do
        case $1 in
            --venv) venv=$2; shift 2 ;;
            *) usage ;;
        esac
    done
    [ -f "$dir/requirements.txt" ] ||
        { echo "install-gpu-offline: $dir/requirements.txt not found: run the download step first" >&2; exit 2; }
    local py=${PYTHON:-python3}
    if [ -n "$venv" ]; then
        # --system-site-packages: the venv sees the machine's torch and leaves it where it is.
        [ -x "$venv/bin/python" ] || run "$py" -m venv --system-site-packages "$venv"
        py=$venv/bin/python
    fi
    # DIR alone: no pip configuration file or PIP_* setting may add an index or another folder.
    unset "${!PIP_@}"
    export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1

    # stdout only (importing torch may warn on stderr). A real flash-attn build has its compiled CUDA
    # extension; the pure-Python package from the folder must not replace it.
    local torch_query='import torch; print(torch.__version__, torch.version.cuda or "none", torch.cuda.is_available())'
    local flash_query=$'\ntry:\n    import flash_attn_2_cuda as m\n    print(m.__file__.endswith(".so"))\nexcept ImportError:\n    print(False)'
    local probe before flash
    probe=$("$py" -c "$torch_query$flash_query" 2>/dev/null) ||
        { "$py" -c "$torch_query" >&2 || true; die "torch is not importable by $py: install the machine's CUDA torch first"; }
    before=${probe%%$'\n'*}
    flash=${probe##*$'\n'}
    echo "torch $before (version, CUDA, GPU visible) in $py: kept as it is"

    local list=$dir/requirements.txt want
    if [ -f "$dir/requirements-vllm.txt" ]; then
        want=$(sed -n '1s/^# resolved for torch==\([^,]*\),.*/\1/p' "$dir/requirements-vllm.txt")
        if [ "$want" = "${before%%[+ ]*}" ]; then
            list=$dir/requirements-vllm.txt
        else
            echo "vllm skipped: vllm 0.29.0 pins torch $want, this machine has torch ${before%% *} (never replaced); everything else is installed"
        fi
    fi
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    grep -v '^#' "$list" >"$tmp"
    grep -q '^torch==' "$tmp" && die "$list names torch: refusing (the machine's torch is never replaced)"
    if [ "$flash" = True ]; then
        echo "flash-attn: keeping this machine's build (it has its CUDA extension)"
        sed -i '/^flash-attn==/d' "$tmp"
    fi
    run "$py" -m pip install -q --no-index --find-links "$dir" --no-deps -r "$tmp"

    local after
    after=$("$py" -c "$torch_query" 2>/dev/null) ||
        { "$py" -c "$torch_query" >&2 || true; die "torch no longer imports after the install"; }
    [ "$after" = "$before" ] || die "torch changed during the install: before '$before', after '$after'"
    # pip check's lines about a package of the list, as the one that requires or the one required
    # ("X 1.0 has requirement Y<2, but you have Y 2.1."); not openrlhf's own list: it goes in without
    # its dependencies, as in install-cpu.sh.
    local broken
    broken=$("$py" -m pip check 2>&1 | awk '
        function norm(name) { name = tolower(name); gsub(/[-_.]+/, "-", name); return name }
        NR == FNR { split($0, pin, "=="); ours[pin[1]]; next }
        $1 != "openrlhf" && (norm($1) in ours || (/but you have/ && norm($(NF - 1)) in ours))' "$tmp" - || true)
    [ -z "$broken" ] || die "the install left broken requirements (pip check):"$'\n'"$broken"
    echo "installed from $dir ($(basename "$list"), --no-index --no-deps): $("$py" -c '
import importlib.metadata as m
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "not installed"
print(", ".join(f"{n} {v(n)}" for n in ("openrlhf", "openrlhf-bonesoup", "ray", "deepspeed", "transformers", "vllm")))')"
}

[ $# -ge 2 ] || usage
mode=$1
shift
case $mode in
    download) download "$@" ;;
    install) install "$@" ;;
    *) usage ;;
esac
