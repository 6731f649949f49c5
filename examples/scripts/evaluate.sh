#!/usr/bin/env bash
# Evaluate a soup as the paper does: merge it at 11 preferences (0,1) ... (1,0), generate one response per
# held-out prompt with each merged model (vLLM on a GPU node, else transformers), score them with the
# soup's own objectives (the code the PPO reward ran), and report per-preference means, the Pareto front,
# hypervolume, controllability and pareto.png. With $RS_SOUP (train_bonesoup_backbones.sh COMBINER=single)
# Rewarded Soup is evaluated the same way and overlaid, with one reference point for both hypervolumes.
set -euo pipefail
source "$(dirname "$0")/common.bash"
parse_args "$@"

SETTING=${SETTING:-hh}
SOUP=${SOUP:-$PWD/soups/${SETTING}_bone_soup_b0.7}
RS_SOUP=${RS_SOUP:-}                           # a Rewarded Soup to compare with (optional)
DATA=${DATA:-$PWD/data}
OUT=${OUT:-$PWD/eval/$SETTING}
ALPHA=${ALPHA:-0}                              # or auto: the reference's extrapolation search on $DATA/*_val.jsonl
SAMPLES=${SAMPLES:-500}                        # held-out prompts per preference

case "$SETTING" in
    hh) MAX_NEW_TOKENS=128 ;;                  # the reference's generation lengths
    summary) MAX_NEW_TOKENS=48 ;;
    *) echo "SETTING must be hh or summary, got $SETTING" >&2; exit 2 ;;
esac
# The reference's sampling: top_p 0.9, temperature 1, one response per prompt; the same seed everywhere.
GENERATION=(--prompts "$DATA/${SETTING}_test.jsonl" --data.max_samples "$SAMPLES"
    --eval.max_new_tokens "$MAX_NEW_TOKENS" --eval.temperature 1.0 --eval.top_p 0.9 --eval.seed 42)

COMPARE=()
if [ -n "$RS_SOUP" ]; then
    run openrlhf-bonesoup evaluate --soup_dir "$RS_SOUP" --grid 11 "${GENERATION[@]}" \
        --label rewarded_soup --output "$OUT/rewarded_soup"
    COMPARE=(--compare "rewarded_soup=$OUT/rewarded_soup/results.json")
fi
run openrlhf-bonesoup evaluate --soup_dir "$SOUP" --grid 11 "${GENERATION[@]}" \
    --alpha "$ALPHA" --alpha_prompts "$DATA/${SETTING}_val.jsonl" \
    --label bone_soup "${COMPARE[@]}" --output "$OUT/bone_soup"
# Results: $OUT/bone_soup/results.json, results.csv, pareto.png, generations/mu_*.jsonl
