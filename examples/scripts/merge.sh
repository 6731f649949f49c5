#!/usr/bin/env bash
# Merge a trained soup for the preferences you want to serve: theta(mu) = sum_j lambda_j theta_j with
# lambda = B^-1 mu (B, the backbones and the SFT model are read from $SOUP/soup.json), optionally pushed
# away from the SFT model: (1 + alpha) theta - alpha theta_sft. Each output is a standard HF folder
# (transformers, vLLM) with bonesoup_merge.json (preference, beta, lambda, alpha, each input's size and sampled hash).
#
# The training launches already merged the 11-point sweep into $SOUP/merged (--merge_grid 11); this is
# for other preferences, or with extrapolation. The merge streams safetensors on CPU: run it on any
# machine that sees the checkpoints; it needs disk for the outputs, not GPU or much memory.
#
#   ALPHA=0.2                          a fixed extrapolation strength
#   ALPHA=auto ALPHA_PROMPTS=val.jsonl the reference's per-objective search (generates: use a GPU node)
set -euo pipefail
source "$(dirname "$0")/common.bash"
parse_args "$@"

SOUP=${SOUP:-$PWD/soups/hh_bone_soup_b0.7}
PREFERENCES=${PREFERENCES:-"0,1;0.2,0.8;0.4,0.6;0.5,0.5;0.6,0.4;0.8,0.2;1,0"}  # mu = (w_objective1, w_objective2)
ALPHA=${ALPHA:-0}
ALPHA_PROMPTS=${ALPHA_PROMPTS:-$PWD/data/hh_val.jsonl}
OUT=${OUT:-$SOUP/served}
WORKERS=${WORKERS:-4}                          # merge processes

EXTRA=()
if [ "$ALPHA" = auto ]; then EXTRA=(--alpha_prompts "$ALPHA_PROMPTS"); fi

# One sub-folder per preference: $OUT/mu_0.20_0.80, ...
run openrlhf-bonesoup merge --soup_dir "$SOUP" --preferences "$PREFERENCES" --alpha "$ALPHA" "${EXTRA[@]}" \
    --workers "$WORKERS" --output "$OUT"

