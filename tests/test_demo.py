"""The CPU demo: Theorem 1's interval measured through real soups, merges and evaluation code."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.optimize import minimize

from openrlhf_bonesoup import soup
from openrlhf_bonesoup.cli import main
from openrlhf_bonesoup.demo import analytic

# Theorem 1's interval of mu_1, ((1 - s) / 2, (1 + s) / 2) with s = sqrt(2 beta^2 - 2 beta + 1), worked
# out by hand: beta 0.6: s = sqrt(0.52); 0.7: sqrt(0.58); 0.8: sqrt(0.68).
THEOREM = {0.6: (0.139445, 0.860555), 0.7: (0.119211, 0.880789), 0.8: (0.087689, 0.912311)}


def measured_win_interval(beta: float) -> list[float]:
    """Where mu . r(Bone Soup) >= mu . r(Rewarded Soup) on the demo's instance, at mu_1 = 0, 0.01, ..., 1:
    from the closed-form optima (checked against scipy below) and numpy's own linear solve."""
    matrix = np.array([[beta, 1 - beta], [1 - beta, beta]])
    backbones = np.stack([analytic.optimum(row) for row in matrix])
    wins = []
    for m in np.linspace(0, 1, 101):
        mu = np.array([m, 1 - m])
        bone = analytic.rewards(np.linalg.solve(matrix.T, mu) @ backbones)
        rewarded = analytic.rewards(mu @ np.array(analytic.CENTERS))
        wins.append(mu @ bone >= mu @ rewarded - 1e-9)
    runs, start = [], None
    for k, win in enumerate([*wins, False]):
        if win and start is None:
            start = k
        elif not win and start is not None:
            runs.append((start, k - 1))
            start = None
    lo, hi = max(runs, key=lambda run: run[1] - run[0])
    return [lo / 100, hi / 100]


@pytest.mark.parametrize("beta", [0.6, 0.7, 0.8])
def test_demo_win_interval_contains_the_theorem_interval(tmp_path, beta):
    r = analytic.run_demo(tmp_path / "out", beta)
    lo, hi = THEOREM[beta]
    assert r["theorem_interval"] == [pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6)]
    assert r["win_interval"] == pytest.approx(measured_win_interval(beta), abs=1e-9)
    assert r["win_interval"][0] <= lo and hi <= r["win_interval"][1]
    # the stated instance: Bone Soup's hypervolume above Rewarded Soup's, below the MORLHF oracle's
    hv = r["hypervolume"]
    assert hv["rewarded_soup"] < hv["bone_soup"] < hv["morlhf"]
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"hypervolume", "beta", "win_interval", "theorem_interval", "reference_point"} <= written.keys()
    assert written["beta"] == beta and written["hypervolume"] == hv
    png = (tmp_path / "out" / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_demo_soups_and_merges_are_real(tmp_path):
    analytic.run_demo(tmp_path, 0.7)
    manifest = soup.read_soup(tmp_path / "bone_soup")
    assert manifest["beta"] == 0.7 and manifest["matrix"] == [[0.7, 0.3], [0.3, 0.7]]  # recorded as written
    backbones = [load_file(p + "/model.safetensors")["theta"] for p in soup.trained_backbones(manifest)]
    rewarded = soup.read_soup(tmp_path / "rewarded_soup")
    assert rewarded["matrix"] == [[1.0, 0.0], [0.0, 1.0]]
    assert [load_file(p + "/model.safetensors")["theta"].tolist() for p in soup.trained_backbones(rewarded)] == [
        [1.0, 0.0],
        [0.0, 1.0],
    ]
    # a merged checkpoint holds sum_j lambda_j theta_j, lambda = B^-1 mu, as the merge engine wrote it
    merged = tmp_path / "bone_soup" / "merged" / "mu_0.30_0.70"
    lam = [0.0, 1.0]  # lambda_i = (mu_i - 0.3) / 0.4 for B(0.7)
    expected = lam[0] * backbones[0] + lam[1] * backbones[1]
    np.testing.assert_allclose(load_file(str(merged / "model.safetensors"))["theta"], expected, rtol=1e-6)
    provenance = json.loads((merged / "bonesoup_merge.json").read_text())
    assert provenance["weights"] == pytest.approx(lam, abs=1e-12)
    assert len(list((tmp_path / "bone_soup" / "merged").iterdir())) == 101


def test_closed_form_optimum_matches_numerical_optimisation():
    for weights in ([1, 0], [0.7, 0.3], [0.2, 0.8]):
        found = minimize(lambda t, w=weights: -np.dot(w, analytic.rewards(t)), x0=np.zeros(2)).x
        np.testing.assert_allclose(analytic.optimum(weights), found, atol=1e-5)


def test_theorem_holds_on_random_instances():
    # The guarantee the demo measures, on 60 random instances per beta (closed forms, no files).
    rng = np.random.default_rng(0)
    for beta in (0.6, 0.7, 0.8):
        lo, hi = THEOREM[beta]
        matrix = np.array([[beta, 1 - beta], [1 - beta, beta]])
        mus = [np.array([m, 1 - m]) for m in np.linspace(lo, hi, 41)]
        for _ in range(60):
            c, a = rng.normal(size=(2, 3)), np.exp(rng.normal(size=(2, 3)))
            thetas = [analytic.optimum(row, c, a) for row in matrix]
            for mu in mus:
                lam = np.linalg.solve(matrix.T, mu)
                bone = analytic.rewards(lam[0] * thetas[0] + lam[1] * thetas[1], c, a)
                rewarded = analytic.rewards(mu[0] * c[0] + mu[1] * c[1], c, a)
                assert mu @ bone >= mu @ rewarded - 1e-9


def test_demo_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--analytic", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Theorem 1 guarantees [0.1192, 0.8808]" in printed and "demo.png" in printed
    assert main(["demo", "--analytic", "--output", str(out), "--beta", "0.8"]) == 0  # an earlier demo is replaced
    assert json.loads((out / "results.json").read_text())["beta"] == 0.8
    assert soup.read_soup(out / "bone_soup")["beta"] == 0.8

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", "--analytic", "--output", str(foreign)]) == 2
    assert main(["demo", "--analytic", "--output", str(tmp_path / "x"), "--beta", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "beta must lie in" in err and "Traceback" not in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("beta", [0.6, 0.7, 0.8])
def test_n3_region_where_bone_soup_wins(beta):
    """n = 3: checked against backbones found by numerical optimisation, not the closed form."""
    region = analytic.win_region_n3(beta)
    t = region["wins_where_min_mu_at_least"]
    assert 0 < t < 1 / 3 and 0.5 < region["share_won"] < 1
    c, a = np.eye(3), np.asarray(analytic.CURVATURES_3)
    b = np.full((3, 3), (1 - beta) / 2) + np.eye(3) * (beta - (1 - beta) / 2)  # B by hand: beta on the diagonal
    found = [minimize(lambda x, w=row: -np.dot(w, analytic.rewards(x, c, a)), x0=np.zeros(3)).x for row in b]
    rng = np.random.default_rng(0)
    for mu in rng.dirichlet([1, 1, 1], 400):
        bone = np.linalg.solve(b.T, mu) @ np.stack(found)
        gain = mu @ analytic.rewards(bone, c, a) - mu @ analytic.rewards(mu, c, a)  # Rewarded Soup: theta = mu
        if mu.min() >= t:
            assert gain >= -1e-5, (mu, gain)
    corner = np.array([1.0, 0.0, 0.0])  # r_1's own optimum is Rewarded Soup's corner: Bone Soup loses there
    bone = np.linalg.solve(b.T, corner) @ np.stack(found)
    assert corner @ analytic.rewards(bone, c, a) < corner @ analytic.rewards(corner, c, a) - 1e-3
