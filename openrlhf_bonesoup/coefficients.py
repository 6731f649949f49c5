"""Bone Soup arithmetic: the backbone matrix B, merge coefficients lambda and SFT extrapolation.

Backbone j is trained on h_j = sum_i B_ji r_i. To serve a preference mu we want a merged reward
sum_j lambda_j h_j = sum_i mu_i r_i, i.e. B^T lambda = mu (Xie et al. 2025, Sec. 3; the reference
code solves [[w11, w21], [w12, w22]] x = e_i, which is B^T). B is symmetric here, so B^T = B,
but we solve with B^T so the formula reads as derived.

Pure numpy on purpose: no torch, no openrlhf, so every stage (launcher, merge, evaluation) can use
it anywhere. All checks raise errors.BoneSoupError with a one-line message the CLI prints as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from openrlhf_bonesoup.errors import BoneSoupError

PREFERENCE_TOL = 1e-6
# The reference code tries k = 1/(1-a), a in {0.1, ..., 0.5}, and merges k*theta + (1-k)*theta_sft,
# which is (1+alpha)*theta - alpha*theta_sft with alpha = k - 1 = a/(1-a).
REFERENCE_ALPHAS = tuple(round(a / (1 - a), 12) for a in (0.1, 0.2, 0.3, 0.4, 0.5))


def backbone_matrix(beta: float, n: int) -> np.ndarray:
    """Symmetric circulant B with beta on the diagonal and (1-beta)/(n-1) elsewhere; rows sum to 1.

    beta must lie in (1/n, 1]: at beta = 1/n every backbone is the same model (B singular), and
    beta = 1 is plain Rewarded Soup (B = I).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise BoneSoupError(f"the number of objectives must be an integer >= 2, got {n!r}")
    beta = float(beta)
    if not np.isfinite(beta) or not (1.0 / n < beta <= 1.0):
        raise BoneSoupError(f"beta must lie in (1/n, 1] = ({1.0 / n:.6g}, 1] for n = {n}, got {beta:g}")
    off = (1.0 - beta) / (n - 1)
    return _checked(np.full((n, n), off) + np.eye(n) * (beta - off))


def backbone_matrix_from_row(row: Sequence[float]) -> np.ndarray:
    """B from an explicit first row (n >= 3): B[i, j] = row[(j - i) mod n].

    The row must make B symmetric (row[k] == row[n-k]), sum to 1, put beta = row[0] in (1/n, 1] and
    leave B invertible. For n = 2 the row is fixed by beta, so use backbone_matrix(beta, 2).
    """
    row = np.asarray(row, dtype=np.float64)
    n = row.size
    if row.ndim != 1 or n < 3:
        raise BoneSoupError(f"an explicit first row needs n >= 3 entries, got {row.size}")
    if not np.all(np.isfinite(row)):
        raise BoneSoupError(f"the first row has a non-finite entry: {row.tolist()}")
    if not np.allclose(row[1:], row[1:][::-1], rtol=0, atol=1e-12):
        raise BoneSoupError(f"row {row.tolist()} does not give a symmetric B: need row[k] == row[n-k]")
    if not (1.0 / n < row[0] <= 1.0):
        raise BoneSoupError(f"the diagonal entry row[0] must lie in (1/n, 1] = ({1.0 / n:.6g}, 1], got {row[0]:g}")
    return _checked(np.stack([np.roll(row, i) for i in range(n)]))


def _checked(matrix: np.ndarray) -> np.ndarray:
    # One place for the invariants every B must satisfy, whichever way it was built.
    if abs(matrix.sum(axis=1) - 1.0).max() > 1e-9:
        raise BoneSoupError(f"the rows of B must sum to 1, got sums {matrix.sum(axis=1).tolist()}")
    if np.linalg.cond(matrix) > 1e12:
        raise BoneSoupError("B is singular (or nearly so): no merge coefficients exist for it")
    return matrix


def check_matrix(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """Validate a B read back from a file (soup manifest): square, symmetric circulant, rows sum to 1."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise BoneSoupError(f"B must be a square matrix of size >= 2, got shape {matrix.shape}")
    n = matrix.shape[0]
    circulant = np.stack([np.roll(matrix[0], i) for i in range(n)])
    if not np.allclose(matrix, circulant, rtol=0, atol=1e-12) or not np.allclose(matrix, matrix.T, atol=1e-12):
        raise BoneSoupError("B must be symmetric circulant")
    return _checked(matrix)


def check_preference(mu: Sequence[float], n: int) -> np.ndarray:
    """A preference is a point of the simplex: n finite entries >= 0 that sum to 1 (within 1e-6)."""
    mu = np.asarray(mu, dtype=np.float64).reshape(-1)
    if mu.size != n:
        raise BoneSoupError(f"the preference has {mu.size} entries but there are {n} objectives")
    if not np.all(np.isfinite(mu)):
        raise BoneSoupError(f"the preference has a non-finite entry: {mu.tolist()}")
    if (mu < 0).any():
        raise BoneSoupError(f"preference entries must be >= 0, got {mu.tolist()}")
    if abs(mu.sum() - 1.0) > PREFERENCE_TOL:
        raise BoneSoupError(f"preference entries must sum to 1 (within {PREFERENCE_TOL:g}), got {mu.sum():.9g}")
    return mu


def merge_coefficients(matrix: np.ndarray, mu: Sequence[float]) -> np.ndarray:
    """lambda with B^T lambda = mu: the weights of the n backbones for preference mu.

    Entries may be negative (extrapolation beyond a backbone); they always sum to 1 because the
    rows of B do.
    """
    mu = check_preference(mu, matrix.shape[0])
    return np.linalg.solve(np.asarray(matrix, dtype=np.float64).T, mu)


def extrapolation_weights(lam: Sequence[float], alpha: float) -> tuple[np.ndarray, float]:
    """Weights for theta = (1 + alpha) sum_j lambda_j theta_j - alpha theta_sft.

    Returns ((1 + alpha) * lambda, -alpha): the backbone weights and the SFT weight, which sum to 1.
    alpha = 0 is no extrapolation; alpha must be finite and >= 0 (away from SFT, as in the paper).
    """
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise BoneSoupError(f"alpha must be a finite number >= 0, got {alpha:g}")
    return (1.0 + alpha) * np.asarray(lam, dtype=np.float64), -alpha


def soup_weights(
    matrix: np.ndarray, mu: Sequence[float], alpha: float | Sequence[float] = 0.0
) -> tuple[np.ndarray, float]:
    """Backbone weights and SFT weight of the merged model for preference mu.

    alpha is one SFT extrapolation strength, or one per objective as the reference code searches them
    (its k_i = 1 + alpha_i). The reference merges sum_i mu_i [(1 + alpha_i) lambda(e_i) theta - alpha_i
    theta_sft]; lambda is linear in mu, so the backbone weights are B^-T (mu * (1 + alpha)) and the SFT
    weight is -mu . alpha. With one alpha this is extrapolation_weights(merge_coefficients(B, mu), alpha).
    """
    mu = check_preference(mu, matrix.shape[0])
    alphas = np.asarray(alpha, dtype=np.float64)
    if alphas.ndim == 0:
        alphas = np.full(mu.shape, float(alphas))
    if alphas.shape != mu.shape or not np.all(np.isfinite(alphas)) or (alphas < 0).any():
        raise BoneSoupError(f"alpha must be a finite number >= 0 (one, or one per objective: {mu.size}), got {alpha}")
    return np.linalg.solve(np.asarray(matrix, dtype=np.float64).T, mu * (1.0 + alphas)), -float(mu @ alphas)


def preference_grid(points: int, n: int = 2) -> list[np.ndarray]:
    """The evenly spaced grid (mu_1, 1 - mu_1) with mu_1 = 0, 1/(points-1), ..., 1 (n = 2 only).

    The paper and the reference code evaluate 11 points: mu_1 in {0, 0.1, ..., 1}.
    """
    if n != 2:
        raise BoneSoupError(f"a --grid is defined for 2 objectives; give --preferences for n = {n}")
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
        raise BoneSoupError(f"the grid needs an integer number of points >= 2, got {points!r}")
    return [np.array([k / (points - 1), 1.0 - k / (points - 1)]) for k in range(points)]


def parse_floats(text: str, what: str) -> list[float]:
    """'0.3,0.7' -> [0.3, 0.7], or a BoneSoupError naming the flag (`what`)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise BoneSoupError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_preferences(text: str, n: int | None = None) -> list[list[float]]:
    """'0,1;0.5,0.5;1,0' -> [[0, 1], [0.5, 0.5], [1, 0]], each checked on the simplex (n: its size)."""
    try:
        prefs = [[float(x) for x in part.split(",")] for part in text.split(";") if part.strip()]
    except ValueError:
        raise BoneSoupError(f"preferences must look like '0,1;0.5,0.5;1,0', got {text!r}") from None
    if not prefs:
        raise BoneSoupError("no preference given")
    for mu in prefs:
        check_preference(mu, n or len(prefs[0]))
    return prefs


def preference_sweep(n: int, grid: int | None = None, text: str | None = None) -> list[list[float]]:
    """The preferences of a sweep flag pair: a `grid`-point grid (n = 2) or an explicit '0,1;...' list."""
    if grid is not None:
        return [mu.tolist() for mu in preference_grid(grid, n)]
    return parse_preferences(text, n)


def clean(values: Any) -> Any:
    """Numbers as a record or a console shows them: 12 decimals, so 0.3 and not 0.30000000000000004,
    0 and not -7.9e-17 from the solve (never used for a merge's arithmetic). Takes a number, an array,
    or a whole record (dicts and lists, nested): every float in it is rounded, the rest kept as is."""
    if isinstance(values, dict):
        return {k: clean(v) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return [clean(v) for v in values]
    if isinstance(values, (float, np.floating, np.ndarray)):
        return (np.round(np.asarray(values, dtype=np.float64), 12) + 0.0).tolist()
    return values.item() if isinstance(values, np.generic) else values  # str, int, bool, None
