"""Every line that touches OpenRLHF internals (0.11.2), each seam mirroring upstream for diffing.

- actor.py: RewardModelActor holding all n objectives (in-cluster reward models)
- reward_func.py: the `--reward.remote_url <file>.py` entry for HTTP / function objectives
- worker.py: the Ray worker setup hook (per-objective metrics; no silently missing remote reward)
- launcher.py: the drop-in `train_ppo_ray` launcher that installs all of the above
- cpu.py: `--cpu`, OpenRLHF's PPO loop on a machine without a GPU (CUDA-only call sites replaced)
- models.py: OpenRLHF's reward-model loader, for objectives.py and demo/tiny.py outside a Ray worker
- imports.py: patch a module when it is imported (worker.py and cpu.py)

No module outside this package imports openrlhf (tests/test_layering.py).
"""
