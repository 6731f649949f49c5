"""Combiners: weight vectors of bonesoup / linear / single, and Combination's normalisation and sum.

Expected values are written out by hand or computed with numpy from the definitions (mean and
population standard deviation of everything seen so far), independently of the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from openrlhf_bonesoup import combiners
from openrlhf_bonesoup.errors import BoneSoupError


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_combiner_weights():
    np.testing.assert_allclose(combiners.combiner_weights("bonesoup", 2, beta=0.7, backbone_index=0), [0.7, 0.3])
    np.testing.assert_allclose(combiners.combiner_weights("bonesoup", 2, beta=0.7, backbone_index=1), [0.3, 0.7])
    np.testing.assert_allclose(
        combiners.combiner_weights("bonesoup", 3, beta=0.6, backbone_index=1), [0.2, 0.6, 0.2], atol=1e-12
    )
    np.testing.assert_allclose(
        combiners.combiner_weights("linear", 3, reward_weights=[0.5, 0.25, 0.25]), [0.5, 0.25, 0.25]
    )
    np.testing.assert_allclose(combiners.combiner_weights("single", 3, objective=2), [0, 0, 1])


@pytest.mark.parametrize(
    "combiner, kwargs, match",
    [
        ("bonesoup", {"beta": 0.7}, "needs --backbone_index"),
        ("bonesoup", {"backbone_index": 0}, "needs --beta"),
        ("bonesoup", {"beta": 0.7, "backbone_index": 2}, "0..1"),
        ("bonesoup", {"beta": 0.4, "backbone_index": 0}, "beta must lie"),
        ("bonesoup", {"beta": 0.7, "backbone_index": 0, "objective": 1}, "does not apply"),
        ("linear", {"reward_weights": [0.5, 0.6]}, "sum to 1"),
        ("linear", {"reward_weights": [1.0]}, "2 objectives"),
        ("single", {"objective": 5}, "0..1"),
        ("mean", {}, "unknown reward combiner"),
    ],
)
def test_combiner_errors(combiner, kwargs, match):
    with pytest.raises(BoneSoupError, match=match) as e:
        combiners.combiner_weights(combiner, 2, **kwargs)
    one_line(e)


def specs(*how):
    return [{"name": f"o{i}", "normalize": h} for i, h in enumerate(how)]


def test_fixed_and_running_normalisation_and_the_weighted_sum():
    combination = combiners.Combination(specs("none", {"mean": 10, "std": 4}, "running"), [0.5, 0.3, 0.2])
    first = np.array([2.0, 4.0, 1.0])
    second = np.array([6.0, 3.0])
    combination(np.repeat(first[:, None], 3, axis=1))
    reward, values = combination(np.repeat(second[:, None], 3, axis=1))
    np.testing.assert_allclose(values[:, 0], second)
    np.testing.assert_allclose(values[:, 1], (second - 10) / 4)
    seen = np.concatenate([first, second])  # running: everything seen so far, this batch included
    np.testing.assert_allclose(values[:, 2], (second - seen.mean()) / seen.std())
    np.testing.assert_allclose(reward, 0.5 * values[:, 0] + 0.3 * values[:, 1] + 0.2 * values[:, 2])


def test_running_statistics_do_not_depend_on_how_samples_are_split():
    rng = np.random.default_rng(0)
    raw = rng.normal(3.0, 2.0, size=(12, 1))
    whole = combiners.Combination(specs("running"), [1.0])
    parts = combiners.Combination(specs("running"), [1.0])
    whole(raw)
    for chunk in np.split(raw, [1, 5, 6]):
        parts(chunk)
    np.testing.assert_allclose([parts.mean[0], parts.m2[0] / parts.count[0]], [raw.mean(), raw.var()], rtol=1e-12)
    np.testing.assert_allclose([whole.mean[0], whole.m2[0] / whole.count[0]], [raw.mean(), raw.var()], rtol=1e-12)


def test_update_false_leaves_statistics_and_starts_as_identity():
    combination = combiners.Combination(specs("running"), [1.0])
    reward, _ = combination(np.array([[5.0], [7.0]]), update=False)
    np.testing.assert_allclose(reward, [5.0, 7.0])  # nothing seen yet: mean 0, std 1
    assert combination.count[0] == 0
    combination(np.array([[1.0], [3.0]]))
    reward, _ = combination(np.array([[4.0]]), update=False)
    np.testing.assert_allclose(reward, [(4.0 - 2.0) / 1.0])
    assert combination.count[0] == 2


def test_running_constant_score_gives_finite_zero_rewards():
    """An objective whose score never varies has standard deviation 0: its normalised value is 0 (the
    score equals the mean), not 0/0. A constant reward model (or a saturated check) must not give NaN."""
    combination = combiners.Combination(specs("running", "none"), [0.5, 0.5])
    for _ in range(2):  # two batches: the statistics have seen 3, then 6 equal scores
        reward, values = combination(np.array([[3.0, 2.0], [3.0, 4.0], [3.0, 6.0]]))
        assert np.isfinite(values).all() and np.isfinite(reward).all()
        assert values[:, 0].tolist() == [0.0, 0.0, 0.0]
        assert reward.tolist() == [1.0, 2.0, 3.0]  # 0.5 * 0 + 0.5 * (2, 4, 6)
    reward, values = combination(np.array([[3.0, 0.0]]), update=False)
    assert values.tolist() == [[0.0, 0.0]] and reward.tolist() == [0.0]


def test_running_tiny_but_real_spread_is_normalised_to_unit_size():
    """The floor on std only guards a spread of zero: scores 0 and 2e-7 (mean 1e-7, population std 1e-7,
    by hand) normalise to -1 and +1 like any others; a floor of 1e-6 would shrink them to -0.1 and +0.1."""
    combination = combiners.Combination(specs("running"), [1.0])
    reward, _ = combination(np.array([[0.0], [2e-7]]))
    np.testing.assert_allclose(reward, [-1.0, 1.0], rtol=1e-9)


def test_update_false_after_one_sample_keeps_std_1():
    """One sample seen: its mean is that sample, but one value has no spread, so the standard deviation
    stays at its start value 1 until a second sample arrives: (5 - 3) / 1 = 2 by hand."""
    combination = combiners.Combination(specs("running"), [1.0])
    reward, values = combination(np.array([[3.0]]))
    assert reward.tolist() == [0.0] and combination.count[0] == 1  # 3 - mean 3
    reward, _ = combination(np.array([[5.0], [1.0]]), update=False)
    assert reward.tolist() == [2.0, -2.0]
    assert combination.count[0] == 1


def test_weights_must_match_the_objectives():
    with pytest.raises(BoneSoupError, match="3 combiner weights for 2 objectives") as e:
        combiners.Combination(specs("none", "none"), [0.2, 0.3, 0.5])
    one_line(e)
