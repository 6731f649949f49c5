#!/usr/bin/env bash
# Choose beta the way the paper does: short PPO runs for each beta in {0.6, 0.7, 0.8}, evaluate each
# short soup on an 11-point preference grid, keep the beta whose front has the largest hypervolume.
#
# A short run is train_bonesoup_backbones.sh (OpenRLHF's own recipe) on a fraction of the prompts
# (--data.max_samples): the number of PPO steps is max_samples / rollout.batch_size per episode, so 20%
# of the prompts is 20% of the steps (the LR schedule is compressed to match). Every setting of the
# two scripts it calls (SETTING, SFT, DATA, LAUNCH, RAY_ADDRESS, ...) passes through the environment.
set -euo pipefail
source "$(dirname "$0")/common.bash"
parse_args "$@"

SETTING=${SETTING:-hh}
FULL_SAMPLES=${FULL_SAMPLES:-100000}           # prompts of a full run
FRACTION=${FRACTION:-0.2}                      # short run = this fraction of the steps
BETAS=${BETAS:-"0.6 0.7 0.8"}
OUT=${OUT:-$PWD/beta_selection/$SETTING}
SCRIPTS=$(cd "$(dirname "$0")" && pwd)

SHORT_SAMPLES=$(python3 -c "print(int($FULL_SAMPLES * $FRACTION))")
run mkdir -p "$OUT"
results=()
for beta in $BETAS; do
    # Both backbones of the short soup (one `ray job submit` each), then merge, generate, score.
    SETTING=$SETTING BETA=$beta MAX_SAMPLES=$SHORT_SAMPLES SOUP=$OUT/soup_b$beta \
        bash "$SCRIPTS/train_bonesoup_backbones.sh" ${DRY_RUN:+--dry_run}
    SETTING=$SETTING SOUP=$OUT/soup_b$beta OUT=$OUT/eval_b$beta bash "$SCRIPTS/evaluate.sh" ${DRY_RUN:+--dry_run}
    results+=("$OUT/eval_b$beta/bone_soup/results.json")
done

# The largest hypervolume, all runs against one reference point (their common nadir).
run openrlhf-bonesoup select-beta "${results[@]}"
run_to "$OUT/select_beta.json" openrlhf-bonesoup select-beta "${results[@]}" --json
[ -n "$DRY_RUN" ] || echo "Train the full soup with the chosen beta: BETA=<best> bash $SCRIPTS/train_bonesoup_backbones.sh"
