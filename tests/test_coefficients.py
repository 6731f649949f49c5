"""The Bone Soup arithmetic: B, lambda = B^-1 mu, SFT extrapolation, and their validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_bonesoup.coefficients import (
    REFERENCE_ALPHAS,
    BoneSoupError,
    backbone_matrix,
    backbone_matrix_from_row,
    check_matrix,
    check_preference,
    extrapolation_weights,
    merge_coefficients,
    preference_grid,
    soup_weights,
)


def is_symmetric_circulant(m):
    n = m.shape[0]
    return all(m[i, j] == pytest.approx(m[0, (j - i) % n]) for i in range(n) for j in range(n)) and np.allclose(m, m.T)


def test_n2_matrix_is_the_papers():
    # h_1 = beta r_1 + (1-beta) r_2, h_2 = (1-beta) r_1 + beta r_2
    np.testing.assert_allclose(backbone_matrix(0.7, 2), [[0.7, 0.3], [0.3, 0.7]])
    np.testing.assert_allclose(backbone_matrix(1.0, 3), np.eye(3))  # beta = 1 is Rewarded Soup


@pytest.mark.parametrize("beta", [0.6, 0.7, 0.8])
def test_lambda_matches_reference_solve_on_11_point_grid(beta):
    # The reference code: weight1 = w11 (r_1 in backbone 1), weight2 = w21 (r_1 in backbone 2),
    # solution_i = solve([[w11, w21], [w12, w22]], e_i), merge weight of backbone j for mu is
    # mu_1 * solution1[j] + mu_2 * solution2[j].
    w11, w21 = beta, 1 - beta
    w12, w22 = 1 - w11, 1 - w21
    m = np.array([[w11, w21], [w12, w22]])
    s1, s2 = np.linalg.solve(m, [1, 0]), np.linalg.solve(m, [0, 1])
    b = backbone_matrix(beta, 2)
    for mu1 in np.round(np.arange(0, 1.05, 0.1), 1):
        mu = [mu1, 1 - mu1]
        expected = mu[0] * s1 + mu[1] * s2
        np.testing.assert_allclose(merge_coefficients(b, mu), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("beta_frac", [0.15, 0.5, 0.9, 1.0])
def test_lambda_matches_the_closed_form(n, beta_frac):
    # B = (beta - c) I + c J with c = (1 - beta) / (n - 1) and rows summing to 1, so for mu on the
    # simplex B^-1 mu = (mu - c 1) / (beta - c): written out here, no linear solve.
    beta = 1 / n + beta_frac * (1 - 1 / n)
    c = (1 - beta) / (n - 1)
    rng = np.random.default_rng(n)
    for mu in [np.eye(n)[0], np.full(n, 1 / n), rng.dirichlet(np.ones(n))]:
        np.testing.assert_allclose(merge_coefficients(backbone_matrix(beta, n), mu), (mu - c) / (beta - c), atol=1e-12)


def test_the_merge_undoes_the_backbone_rewards():
    # Backbone j trains on h_j = w_j . r with w_j its combiner weights (combiners.py, row j of B); the
    # merge sum_j lambda_j theta_j then trades off the objectives with weights sum_j lambda_j w_j = mu.
    from openrlhf_bonesoup.combiners import combiner_weights

    for n, beta in ((2, 0.7), (3, 0.6), (5, 0.8)):
        rows = [combiner_weights("bonesoup", n, beta=beta, backbone_index=j) for j in range(n)]
        mu = np.random.default_rng(0).dirichlet(np.ones(n))
        lam = merge_coefficients(backbone_matrix(beta, n), mu)
        np.testing.assert_allclose(sum(l_j * w_j for l_j, w_j in zip(lam, rows, strict=True)), mu, atol=1e-12)


def test_lambda_extrapolates_at_the_ends():
    lam = merge_coefficients(backbone_matrix(0.7, 2), [1.0, 0.0])
    # by hand: 0.7 x + 0.3 y = 1 and 0.3 x + 0.7 y = 0 give x = 1.75, y = -0.75
    np.testing.assert_allclose(lam, [1.75, -0.75])


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 8),
    frac=st.floats(0.01, 1.0),
    raw=st.lists(st.floats(0, 1, allow_nan=False), min_size=8, max_size=8),
)
def test_properties_for_n_up_to_8(n, frac, raw):
    beta = 1 / n + frac * (1 - 1 / n)
    b = backbone_matrix(beta, n)
    assert is_symmetric_circulant(b)
    np.testing.assert_allclose(b.sum(axis=1), np.ones(n))
    assert b[0, 0] == pytest.approx(beta)
    w = np.array(raw[:n]) + 1e-3
    mu = w / w.sum()
    lam = merge_coefficients(b, mu)
    np.testing.assert_allclose(b.T @ lam, mu, atol=1e-8)  # the defining property
    assert lam.sum() == pytest.approx(1.0)
    weights, sft = extrapolation_weights(lam, 0.25)
    assert weights.sum() + sft == pytest.approx(1.0)


def test_explicit_row():
    b = backbone_matrix_from_row([0.6, 0.1, 0.2, 0.1])
    assert is_symmetric_circulant(b)
    np.testing.assert_allclose(b[1], [0.1, 0.6, 0.1, 0.2])
    mu = [0.1, 0.2, 0.3, 0.4]
    np.testing.assert_allclose(b @ merge_coefficients(b, mu), mu)
    assert check_matrix(b.tolist()) is not None


@pytest.mark.parametrize(
    "row, message",
    [
        ([0.6, 0.1, 0.3], "symmetric"),  # row[1] != row[2]
        ([0.6, 0.3, 0.3], "sum to 1"),
        ([0.3, 0.35, 0.35], "diagonal"),  # beta below 1/n
        ([0.5, 0.5], "n >= 3"),
        ([0.5, float("nan"), 0.5], "non-finite"),
    ],
)
def test_explicit_row_rejected(row, message):
    with pytest.raises(BoneSoupError, match=message):
        backbone_matrix_from_row(row)


def test_singular_matrix_rejected():
    # Symmetric circulant, rows sum to 1, diagonal 0.5 > 1/4, yet singular: eigenvalue for k = 2
    # is 0.5 - 0.25 + 0 - 0.25 = 0.
    with pytest.raises(BoneSoupError, match="singular"):
        backbone_matrix_from_row([0.5, 0.25, 0.0, 0.25])


@pytest.mark.parametrize("beta, n", [(0.5, 2), (0.2, 3), (1.01, 2), (float("nan"), 2), (0.7, 1)])
def test_beta_out_of_range(beta, n):
    with pytest.raises(BoneSoupError):
        backbone_matrix(beta, n)


@pytest.mark.parametrize(
    "mu, message",
    [([0.5, 0.5, 0.0], "3 entries"), ([1.2, -0.2], ">= 0"), ([0.3, 0.6], "sum to 1"), ([np.inf, 0], "non-finite")],
)
def test_bad_preferences(mu, message):
    with pytest.raises(BoneSoupError, match=message):
        check_preference(mu, 2)


def test_preference_tolerance_is_1e_6():
    check_preference([0.3, 0.7 + 5e-7], 2)
    with pytest.raises(BoneSoupError):
        check_preference([0.3, 0.7 + 5e-6], 2)


def test_extrapolation_weights():
    weights, sft = extrapolation_weights([1.75, -0.75], 0.2)
    np.testing.assert_allclose(weights, [2.1, -0.9])
    assert sft == pytest.approx(-0.2)
    with pytest.raises(BoneSoupError, match="alpha"):
        extrapolation_weights([0.5, 0.5], -0.1)


def test_reference_alphas_are_k_minus_1():
    # k = 1/(1-a) multiplies the soup and 1-k weights the SFT model: alpha = k - 1.
    for a, alpha in zip((0.1, 0.2, 0.3, 0.4, 0.5), REFERENCE_ALPHAS, strict=True):
        k = 1 / (1 - a)
        assert 1 + alpha == pytest.approx(k)


def test_grid():
    grid = preference_grid(11)
    assert len(grid) == 11
    np.testing.assert_allclose(grid[0], [0, 1])
    np.testing.assert_allclose(grid[3], [0.3, 0.7])
    with pytest.raises(BoneSoupError):
        preference_grid(11, n=3)


def test_soup_weights_with_one_alpha_is_extrapolation_weights():
    for beta in (0.6, 0.7, 0.8, 1.0):
        matrix = backbone_matrix(beta, 2)
        for mu in ([0.0, 1.0], [0.3, 0.7], [1.0, 0.0]):
            for alpha in (0.0, 0.25, 1.0):
                ref_weights, ref_sft = extrapolation_weights(merge_coefficients(matrix, mu), alpha)
                for form in (alpha, [alpha, alpha]):
                    weights, sft = soup_weights(matrix, mu, form)
                    np.testing.assert_allclose(weights, ref_weights, atol=1e-12)
                    assert sft == pytest.approx(ref_sft)


def test_soup_weights_per_objective_alpha_is_the_reference_codes():
    # Reference: x_j = sum_i mu_i k_i sol_i[j], SFT weight sum_i mu_i (1 - k_i), k_i = 1 + alpha_i,
    # sol_i = solve([[w11, w21], [w12, w22]], e_i).
    (w11, w12), (w21, w22) = backbone_matrix(0.7, 2)
    sols = [np.linalg.solve([[w11, w21], [w12, w22]], e) for e in ([1, 0], [0, 1])]
    alphas, mu = [0.25, 1.0], [0.3, 0.7]
    ks = [1 + a for a in alphas]
    weights, sft = soup_weights(backbone_matrix(0.7, 2), mu, alphas)
    np.testing.assert_allclose(weights, [sum(mu[i] * ks[i] * sols[i][j] for i in range(2)) for j in range(2)])
    assert sft == pytest.approx(sum(mu[i] * (1 - ks[i]) for i in range(2)))
    with pytest.raises(BoneSoupError, match="alpha"):
        soup_weights(backbone_matrix(0.7, 2), [0.5, 0.5], [-0.1, 0.0])
    with pytest.raises(BoneSoupError, match="alpha"):
        soup_weights(backbone_matrix(0.7, 2), [0.5, 0.5], [0.1, 0.2, 0.3])
