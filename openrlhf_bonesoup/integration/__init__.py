"""Every line that touches OpenRLHF internals (0.11.2), each seam mirroring upstream for diffing.

- actor.py: RewardModelActor holding all n objectives (in-cluster reward models)
- reward_func.py: the `--reward.remote_url <file>.py` entry for HTTP / function objectives
- worker.py: the Ray worker setup hook (per-objective metrics; no silently missing remote reward)
- launcher.py: the drop-in `train_ppo_ray` launcher that installs all of the above
"""
