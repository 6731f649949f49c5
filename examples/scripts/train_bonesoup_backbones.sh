#!/usr/bin/env bash
# Train the n = 2 Bone Soup backbones with OpenRLHF's hybrid-engine PPO recipe (Ray, vLLM rollouts,
# DeepSpeed ZeRO-3, all models colocated on 8 GPUs): one `ray job submit` per backbone j, trained on
# h_j = sum_i B_ji r_i (row j of B(beta)). Each job registers its backbone in $SOUP/soup.json; the
# last one to finish merges the 11-point preference sweep into $SOUP/merged.
#
#   SETTING=hh       the paper's Helpful Assistant setting (objectives/helpful_harmless.yaml)
#   SETTING=summary  the paper's Reddit Summary setting (objectives/summary.yaml)
#   LAUNCH=dropin    python3 -m openrlhf_bonesoup.cli.train_ppo_ray (OpenRLHF unmodified)
#   LAUNCH=patched   python3 -m openrlhf.cli.train_ppo_ray (OpenRLHF with patches/openrlhf-0.11.2-bonesoup.patch)
#   COMBINER=single  Rewarded Soup's baseline instead: backbone j trained on r_j alone (a soup with B = I)
#   ALGO=ppo         PPO with a GAE critic (the paper's); grpo: GRPO (group_norm, 8 samples per prompt, k3
#                    KL loss); reinforce_baseline: REINFORCE++-baseline (4 samples, k2 KL loss), as
#                    OpenRLHF's own recipes run them; no critic for either
#
# Before: `ray start --head` (and workers); the plugin installed on every node; the SFT model and the
# reward models downloaded (examples/README.md); prompts from prepare_prompts.py. $SOUP, the checkpoints
# and this examples/ folder must be on a filesystem that every node sees (absolute paths).
set -euo pipefail
source "$(dirname "$0")/common.bash"
parse_args "$@"

SETTING=${SETTING:-hh}
LAUNCH=${LAUNCH:-dropin}
COMBINER=${COMBINER:-bonesoup}
ALGO=${ALGO:-ppo}
BETA=${BETA:-0.7}                              # diagonal of B; the paper picks it from {0.6, 0.7, 0.8}
SFT=${SFT:-$PWD/models/llama-2-7b-sft-$SETTING}  # policy init, critic init and the soup's SFT model
DATA=${DATA:-$PWD/data}                        # prepare_prompts.py output
MAX_SAMPLES=${MAX_SAMPLES:-100000}             # prompts of the run (select_beta.sh runs a fraction)
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
EXAMPLES=$(cd "$(dirname "$0")/.." && pwd)

case "$SETTING" in
    hh) OBJECTIVES=$EXAMPLES/objectives/helpful_harmless.yaml MAX_NEW_TOKENS=128 ;;
    summary) OBJECTIVES=$EXAMPLES/objectives/summary.yaml MAX_NEW_TOKENS=48 ;;
    *) echo "SETTING must be hh or summary, got $SETTING" >&2; exit 2 ;;
esac
case "$LAUNCH" in
    dropin) MODULE=openrlhf_bonesoup.cli.train_ppo_ray ;;
    patched) MODULE=openrlhf.cli.train_ppo_ray ;;
    *) echo "LAUNCH must be dropin or patched, got $LAUNCH" >&2; exit 2 ;;
esac
# Each algorithm's own flags; the rest of the launch is shared. Rollouts per step stay 1024 samples.
case "$ALGO" in
    ppo) ALGO_FLAGS=(--critic.num_nodes 1 --critic.num_gpus_per_node 8 --critic.model_name_or_path "$SFT"
        --critic.adam.lr 9e-6 --rollout.batch_size 1024 --rollout.n_samples_per_prompt 1 --algo.kl.init_coef 0.01) ;;
    grpo) ALGO_FLAGS=(--algo.advantage.estimator group_norm --rollout.batch_size 128 --rollout.n_samples_per_prompt 8
        --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef 1e-3) ;;
    reinforce_baseline) ALGO_FLAGS=(--algo.advantage.estimator reinforce_baseline --rollout.batch_size 256
        --rollout.n_samples_per_prompt 4 --algo.kl.use_loss --algo.kl.estimator k2 --algo.kl.init_coef 1e-4) ;;
    *) echo "ALGO must be ppo, grpo or reinforce_baseline, got $ALGO" >&2; exit 2 ;;
esac
SUFFIX=$([ "$ALGO" = ppo ] && echo "" || echo "_$ALGO")
case "$COMBINER" in
    bonesoup) SOUP=${SOUP:-$PWD/soups/${SETTING}_bone_soup_b$BETA$SUFFIX} ;;
    single) SOUP=${SOUP:-$PWD/soups/${SETTING}_rewarded_soup$SUFFIX} ;;
    *) echo "COMBINER must be bonesoup or single, got $COMBINER" >&2; exit 2 ;;
esac

for j in 0 1; do
    if [ "$COMBINER" = bonesoup ]; then
        REWARD=(--reward_combiner bonesoup --beta "$BETA" --backbone_index "$j")
    else
        REWARD=(--reward_combiner single --objective "$j")
    fi
    # The reward models were downloaded beforehand: no hub access from the workers.
    run ray job submit --address="$RAY_ADDRESS" \
        --runtime-env-json='{"env_vars": {"HF_HUB_OFFLINE": "1"}}' \
        -- python3 -m "$MODULE" \
        --ref.num_nodes 1 \
        --ref.num_gpus_per_node 8 \
        --reward.num_nodes 1 \
        --reward.num_gpus_per_node 8 \
        --actor.num_nodes 1 \
        --actor.num_gpus_per_node 8 \
        --vllm.num_engines 4 \
        --vllm.tensor_parallel_size 2 \
        --train.colocate_all \
        --vllm.gpu_memory_utilization 0.5 \
        --actor.model_name_or_path "$SFT" \
        --objectives "$OBJECTIVES" \
        "${REWARD[@]}" \
        --soup_dir "$SOUP" \
        --merge_grid 11 \
        --ckpt.output_dir "$SOUP/backbone$j" \
        --ckpt.path "$SOUP/ds_ckpt/backbone$j" \
        --train.batch_size 128 \
        --train.max_epochs 1 \
        --data.max_len $((512 + MAX_NEW_TOKENS)) \
        --rollout.max_new_tokens "$MAX_NEW_TOKENS" \
        --data.max_samples "$MAX_SAMPLES" \
        --ds.zero_stage 3 \
        --ds.param_dtype bf16 \
        --actor.adam.lr 5e-7 \
        "${ALGO_FLAGS[@]}" \
        --data.prompt_dataset "$DATA/${SETTING}_train.jsonl" \
        --data.input_key input \
        --actor.gradient_checkpointing_enable \
        --vllm.sync_backend nccl \
        --vllm.enforce_eager \
        --vllm.enable_sleep \
        --ds.enable_sleep
done

# --critic.model_name_or_path: the critic reads the policy's token ids, so it starts from the SFT model (the
# launcher's default too; upstream would start it from the first reward model, here a GPT-2).
# Upstream's --ds.packing_samples and --train.dynamic_batch_enable are left out: the composite reward
# actor has not been run with packed sequences on a GPU. 512 + MAX_NEW_TOKENS: prompt + response tokens.
