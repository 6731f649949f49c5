"""Every line that touches OpenRLHF internals (0.11.2), each seam mirroring upstream for diffing.

- actor.py: RewardModelActor holding all n objectives (in-cluster reward models)
- reward_func.py: the `--reward.remote_url <file>.py` entry for HTTP / function objectives
- worker.py: the Ray worker setup hook (per-objective metrics; no silently missing remote reward)
- lora_sync.py: a LoRA policy's weight sync to vLLM (patched in by worker.py)
- launcher.py: the drop-in `train_ppo_ray` launcher that installs all of the above
- cpu.py: `--cpu`, OpenRLHF's PPO loop on a machine without a GPU (its settings, CUDA-only call sites replaced)
- models.py: OpenRLHF's reward-model loader, for objectives.py and demo/tiny.py outside a Ray worker
- imports.py: import-time finders: patch a module when it is imported, stand-in and refused modules

No module outside this package imports openrlhf (tests/test_layering.py).
"""
