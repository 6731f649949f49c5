#!/usr/bin/env bash
# Choose beta the way the paper does: short PPO runs for each beta in {0.6, 0.7, 0.8}, evaluate each
# short soup on an 11-point preference grid, keep the beta whose front has the largest hypervolume.
#
# A short run is OpenRLHF's own recipe on a fraction of the prompts (--data.max_samples): the number of
# PPO steps is max_samples / rollout.batch_size per episode, so 20% of the prompts is 20% of the steps
# (the LR schedule is compressed to match). Each backbone is one `ray job submit` of the drop-in
# launcher; set the paths below, and the GPU layout flags to your cluster.
set -euo pipefail

SFT=${SFT:-OpenRLHF/Llama-3-8b-sft-mixture}                 # policy init and SFT model of every soup
OBJECTIVES=${OBJECTIVES:-path/to/rm_helpful,path/to/rm_harmless} # r_1, r_2: comma list or objectives.yaml
PROMPTS=${PROMPTS:-OpenRLHF/prompt-collection-v0.1}             # PPO prompts
EVAL_PROMPTS=${EVAL_PROMPTS:-eval.jsonl}                         # held-out prompts, {"input": ...} per line
FULL_SAMPLES=${FULL_SAMPLES:-100000}                             # prompts of a full run
FRACTION=${FRACTION:-0.2}                                        # short run = this fraction of the steps
BETAS=${BETAS:-"0.6 0.7 0.8"}
OUT=${OUT:-beta_selection}

SHORT_SAMPLES=$(python3 -c "print(int($FULL_SAMPLES * $FRACTION))")
mkdir -p "$OUT"

for beta in $BETAS; do
    for j in 0 1; do  # backbone j trains on h_j = sum_i B_ji r_i
        ray job submit --address="http://127.0.0.1:8265" \
            --runtime-env-json='{"working_dir": "."}' \
            -- python3 -m openrlhf_bonesoup.cli.train_ppo_ray \
            --actor.model_name_or_path "$SFT" \
            --reward.model_name_or_path "$OBJECTIVES" \
            --reward_combiner bonesoup --beta "$beta" --backbone_index "$j" \
            --soup_dir "$OUT/soup_b$beta" \
            --ckpt.output_dir "$OUT/soup_b$beta/backbone$j" \
            --data.prompt_dataset "$PROMPTS" --data.input_key context_messages --data.apply_chat_template \
            --data.max_samples "$SHORT_SAMPLES" \
            --train.num_episodes 1 --rollout.batch_size 1024 --train.batch_size 128 \
            --rollout.max_new_tokens 1024 --data.max_len 2048 \
            --actor.adam.lr 5e-7 --critic.adam.lr 9e-6 --algo.kl.init_coef 0.01 \
            --ref.num_nodes 1 --ref.num_gpus_per_node 8 \
            --reward.num_nodes 1 --reward.num_gpus_per_node 8 \
            --critic.num_nodes 1 --critic.num_gpus_per_node 8 \
            --actor.num_nodes 1 --actor.num_gpus_per_node 8 \
            --vllm.num_engines 4 --vllm.tensor_parallel_size 2 --vllm.gpu_memory_utilization 0.5 \
            --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
            --ds.zero_stage 3 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable
    done
    # every backbone of the short soup is now registered in soup.json: merge, generate, score
    openrlhf-bonesoup evaluate --soup_dir "$OUT/soup_b$beta" --grid 11 \
        --prompts "$EVAL_PROMPTS" --data.max_samples 500 --output "$OUT/eval_b$beta"
done

# The largest hypervolume, all runs against one reference point (their common nadir).
results=()
for beta in $BETAS; do results+=("$OUT/eval_b$beta/results.json"); done
openrlhf-bonesoup select-beta "${results[@]}" | tee "$OUT/select_beta.txt"
openrlhf-bonesoup select-beta "${results[@]}" --json > "$OUT/select_beta.json"
echo "Train the full soup with the chosen beta: the same launches without --data.max_samples $SHORT_SAMPLES."
