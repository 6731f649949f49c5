"""Every advantage estimator of OpenRLHF 0.11.2 trains the backbone on h_j.

The plugin combines the objectives once per batch (combiners.Combination, in the trainer process's
make_experience: integration/worker.py) and hands upstream one reward per sample; everything after that
is upstream's own `RemoteExperienceMaker.compute_advantages_and_returns`, run here as it is (no Ray: the
method reads only the experiences and args). Expected advantages are computed independently in float64
from h = B_j . (normalised r): the group baselines, whitening and per-token returns written out by hand.

GSPO (`--actor.policy_loss_type gspo`) changes only the policy loss (models/loss.py), which reads these
advantages: its input is what this test checks.
"""

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

from openrlhf_bonesoup.coefficients import backbone_matrix
from openrlhf_bonesoup.combiners import Combination

N_PROMPTS, N_SAMPLES, T = 3, 4, 6
ESTIMATORS = ["gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce"]
SPECS = [{"name": "helpful", "normalize": "none"}, {"name": "harmless", "normalize": "running"}]


def _args(estimator: str) -> NS:
    return NS(
        algo=NS(advantage=NS(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False), kl=NS(use_loss=False)),
        rollout=NS(n_samples_per_prompt=N_SAMPLES, max_new_tokens=None),
        data=NS(max_len=64),
        reward=NS(clip_range=(-10, 10), overlong_buffer_len=None, overlong_penalty_factor=1.0,
                  stop_properly_penalty_coef=None),
    )  # fmt: skip


def _expected(h: np.ndarray, lengths: np.ndarray, estimator: str) -> np.ndarray:
    """Per-sample advantage on every action token (the reward sits on the last action token; gamma 1, no KL,
    critic values 0 for gae with lambda 1: each action token's return is the sample's shaped reward)."""
    g = h.reshape(N_PROMPTS, N_SAMPLES)
    shaped = {
        "gae": g,
        "reinforce": g,
        "rloo": g - (g.sum(1, keepdims=True) - g) / (N_SAMPLES - 1),
        "reinforce_baseline": g - g.mean(1, keepdims=True),
        "dr_grpo": g - g.mean(1, keepdims=True),
        "group_norm": (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-9),
        "flash_reinforce": g - g.mean(),
    }[estimator].reshape(-1)
    if estimator in ("gae", "reinforce", "reinforce_baseline"):  # whitened over every action token
        tokens = np.repeat(shaped, lengths)
        shaped = (shaped - tokens.mean()) / np.sqrt(max(tokens.var(), 1e-8))
    return shaped


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("row", [0, 1])
def test_upstreams_estimators_see_the_backbones_own_reward(estimator, row):
    rng = np.random.default_rng(7 + row)
    raw = rng.normal(size=(N_PROMPTS * N_SAMPLES, 2)) * [1.0, 3.0] + [0.0, 2.0]
    weights = backbone_matrix(0.7, 2)[row]
    h_by_hand = raw[:, 0] * weights[0] + (raw[:, 1] - raw[:, 1].mean()) / raw[:, 1].std() * weights[1]

    reward, _ = Combination(SPECS, weights)(raw)  # what the plugin hands upstream as experience.rewards
    np.testing.assert_allclose(reward, h_by_hand, rtol=1e-12)

    # Two micro-batches, their samples out of prompt order (upstream regroups them by experience.index).
    lengths = rng.integers(2, T + 1, size=len(raw))
    order = rng.permutation(len(raw))
    experiences = []
    for part in np.array_split(order, 2):
        mask = torch.tensor([[t < lengths[i] for t in range(T)] for i in part])
        experiences.append(
            Experience(
                rewards=torch.from_numpy(reward[part]).float(),
                action_mask=mask,
                kl=torch.zeros(len(part), T),
                values=torch.zeros(len(part), T) if estimator == "gae" else None,
                response_length=torch.from_numpy(lengths[part]).float(),
                truncated=torch.zeros(len(part), dtype=torch.bool),
                index=part.tolist(),
                info={"reward": torch.from_numpy(reward[part]).float()},
            )
        )
    maker = RemoteExperienceMaker(None, None, None, None, FixedKLController(0.0), NS(args=_args(estimator)), None)
    out = maker.compute_advantages_and_returns(experiences)

    expected = _expected(h_by_hand, lengths, estimator)
    for experience, part in zip(out, np.array_split(order, 2), strict=True):
        mask = experience.action_mask.numpy()
        got = experience.advantages.numpy()
        want = np.broadcast_to(expected[part][:, None], got.shape)
        np.testing.assert_allclose(got[mask], want[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stop_coef", [0.5, -0.5])
def test_length_penalties_apply_to_the_combined_reward_as_upstream_applies_them_to_its_one(stop_coef):
    """DAPO's overlong penalty, then ProRL's stop-properly penalty, act on h_j: upstream applies both to
    experience.rewards inside compute_advantages_and_returns, after the plugin combined the objectives."""
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(N_PROMPTS * N_SAMPLES, 2))
    weights = backbone_matrix(0.7, 2)[0]
    reward, _ = Combination([{**s, "normalize": "none"} for s in SPECS], weights)(raw)
    lengths = rng.integers(1, T + 1, size=len(raw))
    truncated = lengths == T
    args = _args("dr_grpo")
    args.rollout.max_new_tokens, args.reward.overlong_buffer_len, args.reward.overlong_penalty_factor = T, 3, 2.0
    args.reward.stop_properly_penalty_coef = stop_coef
    experience = Experience(
        rewards=torch.from_numpy(reward).float(),
        action_mask=torch.tensor([[t < n for t in range(T)] for n in lengths]),
        kl=torch.zeros(len(raw), T),
        response_length=torch.from_numpy(lengths).float(),
        truncated=torch.from_numpy(truncated),
        index=list(range(len(raw))),
        info={"reward": torch.from_numpy(reward).float()},
    )
    maker = RemoteExperienceMaker(None, None, None, None, FixedKLController(0.0), NS(args=args), None)
    out = maker.compute_advantages_and_returns([experience])[0]

    h = raw @ weights
    h = h - np.clip(lengths - (T - 3), 0, 3) / 3 * 2.0  # overlong: past max_new_tokens - buffer, capped
    h = np.where(truncated, h * stop_coef if stop_coef >= 0 else stop_coef, h)  # then stop-properly
    np.testing.assert_allclose(out.info["reward"].numpy(), h, rtol=1e-5, atol=1e-6)  # logged as train/reward
    g = h.reshape(N_PROMPTS, N_SAMPLES)
    expected = (g - g.mean(1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(out.advantages.numpy()[:, 0], expected, rtol=1e-4, atol=1e-5)
