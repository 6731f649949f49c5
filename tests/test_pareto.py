"""Fronts and indicators (indicators.py) against values worked out by hand, the plot, and select-beta."""

import json

import matplotlib.figure
import numpy as np
import pytest

from openrlhf_bonesoup import evaluate, indicators
from openrlhf_bonesoup.cli import main
from openrlhf_bonesoup.errors import BoneSoupError

# ---------------------------------------------------------------------------------------------------
# Hypervolume (maximisation): every expected value is a sum of rectangles drawn on paper.


@pytest.mark.parametrize(
    "points, reference, expected",
    [
        # one box 2 x 3
        ([[2, 3]], [0, 0], 6.0),
        # staircase: columns [0,1] x 3, [1,2] x 2, [2,3] x 1
        ([[1, 3], [2, 2], [3, 1]], [0, 0], 3 + 2 + 1),
        # a dominated point and a duplicate add nothing
        ([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2]], [0, 0], 6.0),
        # reference (1, 1): columns [1,2] x (4-1), [2,3] x (2-1)
        ([[3, 2], [2, 4]], [1, 1], 3 + 1),
        # a point below the reference in one objective adds nothing: only the 2 x 2 box
        ([[2, 2], [5, -1]], [0, 0], 4.0),
        # negative rewards, as reward models give: 10 x 10 above (-11, -11)
        ([[-1, -1]], [-11, -11], 100.0),
        # points on the reference's axes span no area
        ([[0, 5], [5, 0]], [0, 0], 0.0),
        # 3 objectives: boxes 1x1x1 and 2x2x0.5 overlap in 1x1x0.5
        ([[1, 1, 1], [2, 2, 0.5]], [0, 0, 0], 1 + 2 - 0.5),
    ],
)
def test_hypervolume_by_hand(points, reference, expected):
    assert indicators.hypervolume(np.array(points, dtype=float), reference) == pytest.approx(expected)


def test_common_reference_is_the_nadir_of_all_fronts():
    a = np.array([[1.0, 5.0], [4.0, 2.0]])
    b = np.array([[0.5, 6.0], [3.0, 3.0]])
    assert indicators.common_reference([a, b]).tolist() == [0.5, 2.0]


def test_pareto_mask():
    points = np.array([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2], [0.5, 3]], dtype=float)
    # (1,1) and (0.5,3) are dominated; of the two (2,2) the first is kept
    assert indicators.pareto_mask(points).tolist() == [True, True, True, False, False, False]


# ---------------------------------------------------------------------------------------------------
# Controllability: Spearman correlation of each objective's score with its weight.

GRID = np.array([[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]])


def test_controllability_monotone():
    # objective 1 rises with mu_1 (not linearly), objective 2 rises with mu_2 = 1 - mu_1
    means = np.stack([GRID[:, 0] ** 3 - 4.0, np.exp(GRID[:, 1])], axis=1)
    assert indicators.controllability(GRID, means) == [pytest.approx(1.0), pytest.approx(1.0)]


def test_controllability_non_monotone_and_reversed():
    # y = [0, 3, 1, 4, 2]: ranks [1, 4, 2, 5, 3] against [1..5]; sum d^2 = 10; rho = 1 - 6*10/(5*24) = 0.5
    # objective 2 falls as its own weight rises: rho = -1
    means = np.array([[0, 0], [3, 1], [1, 2], [4, 3], [2, 4]], dtype=float)
    assert indicators.controllability(GRID, means) == [pytest.approx(0.5), pytest.approx(-1.0)]


def test_controllability_undefined_for_a_constant_score():
    means = np.array([[1, 0], [1, 1], [1, 2], [1, 3], [1, 4]], dtype=float)
    assert indicators.controllability(GRID, means) == [None, pytest.approx(-1.0)]


# ---------------------------------------------------------------------------------------------------
# Win interval: where mu . ours >= mu . theirs.


def test_win_interval_longest_run():
    theirs = np.zeros((5, 2))
    ours = np.array([[-1, -1], [1, 1], [0, 0], [1, 1], [-1, -1]], dtype=float)  # ties count as wins
    assert indicators.win_interval(GRID, ours, theirs) == [0.25, 0.75]
    ours = np.array([[1, 1], [-1, -1], [1, 1], [1, 1], [1, 1]], dtype=float)
    assert indicators.win_interval(GRID, ours, theirs) == [0.5, 1.0]
    assert indicators.win_interval(GRID, -np.ones((5, 2)), theirs) is None


def test_win_interval_uses_the_scalarised_reward():
    # at mu = (0.25, 0.75): ours 0.25*4 + 0.75*0 = 1 < theirs 0.25*0 + 0.75*2 = 1.5
    ours = np.array([[0, 0], [4, 0], [0, 0], [0, 0], [0, 0]], dtype=float)
    theirs = np.array([[0, 0], [0, 2], [0, 0], [0, 0], [0, 0]], dtype=float)
    assert indicators.win_interval(GRID, ours, theirs) == [0.5, 1.0]


def test_win_interval_ties_lost_to_round_off_still_win():
    """Exact ties in decimal arithmetic that binary floats get wrong by one rounding still count as
    wins (relative to the scores' size), and a real loss, even a small one, does not."""
    prefs = np.array([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0]])
    same = [1.0, 1.0]
    # at mu = (0.1, 0.9): -0.1 + 0.45 = 0.35 = 0.08 + 0.27, but in floats 0.35 < 0.35000000000000003
    ours, theirs = np.array([same, [-1.0, 0.5], same]), np.array([same, [0.8, 0.3], same])
    assert indicators.win_interval(prefs, ours, theirs) == [0.0, 1.0]
    # scores near 5e7: 12709100 - 66966299.55 = 12870200 - 67127399.55 = -54257199.55, 7e-9 apart in floats
    ours = np.array([same, [127091000.0, -74406999.5], same])
    theirs = np.array([same, [128702000.0, -74585999.5], same])
    assert indicators.win_interval(prefs, ours, theirs) == [0.0, 1.0]
    # 0.9 * 1e-6 below a tie: a loss, so the two single wins at mu_1 = 0 and 1; the first is kept
    ours = np.array([same, [-1.0, 0.5 - 1e-6], same])
    assert indicators.win_interval(prefs, ours, np.array([same, [0.8, 0.3], same])) == [0.0, 0.0]


def test_win_interval_tolerance_is_1e_9_absolute_below_1_and_relative_above():
    """The tolerance's size pinned from both sides. Near a score of 0 it is 1e-9 absolute: a decimal tie
    whose float sum lands ~1e-10 below 0 is a win (no tolerance, or one relative to |0|, calls it a loss).
    A real loss of 3e-9 near 0.35, or of 3e-9 relative near 5e7, stays a loss (a tolerance of 1e-8 or more
    would call it a win). Expected intervals by hand: [0, 1] for a win in the middle, else [0, 0]."""
    prefs = np.array([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0]])
    same = [1.0, 1.0]
    # 0.1 * 9000007.2 + 0.9 * -1000000.8 = 900000.72 - 900000.72 = 0 in decimal; in floats ~1.2e-10 below 0
    assert -1e-9 < 0.1 * 9000007.2 + 0.9 * -1000000.8 < -1e-11
    ours, theirs = np.array([same, [9000007.2, -1000000.8], same]), np.array([same, [0.0, 0.0], same])
    assert indicators.win_interval(prefs, ours, theirs) == [0.0, 1.0]
    # -0.1 * (1 + 3e-8) + 0.45 = 0.35 - 3e-9 against 0.08 + 0.27 = 0.35: a loss
    ours, theirs = np.array([same, [-1.0 - 3e-8, 0.5], same]), np.array([same, [0.8, 0.3], same])
    assert indicators.win_interval(prefs, ours, theirs) == [0.0, 0.0]
    # near -54257199.55: 1.5 less on objective 1 is 0.15 less at mu_1 = 0.1, 2.8e-9 of the score: a loss
    ours = np.array([same, [127091000.0 - 1.5, -74406999.5], same])
    theirs = np.array([same, [128702000.0, -74585999.5], same])
    assert indicators.win_interval(prefs, ours, theirs) == [0.0, 0.0]


def test_summarise_mean_sem_front():
    samples = [np.array([[1.0, 4.0], [3.0, 6.0]]), np.array([[0.0, 0.0], [0.0, 2.0]]), np.array([[5.0, 1.0]])]
    prefs = [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    out = indicators.summarise(prefs, samples, ["a", "b"])
    assert out["mean"] == [[2.0, 5.0], [0.0, 1.0], [5.0, 1.0]]
    # sem = std(ddof=1) / sqrt(2): std of (1, 3) is sqrt(2), so 1; one sample has none
    assert out["sem"] == [[pytest.approx(1.0), pytest.approx(1.0)], [0.0, pytest.approx(1.0)], [None, None]]
    assert out["pareto"] == [True, False, True]
    assert out["samples"] == [2, 2, 1]


# ---------------------------------------------------------------------------------------------------
# select-beta


def test_pareto_png_draws_the_fronts_of_results_json(tmp_path, monkeypatch):
    # Preference order zigzags; by hand: (2, 2) is dominated by (3, 4), the rest is the front, which in
    # the order of objective 1 is (1, 5), (3, 4), (4, 3), (5, 1).
    prefs = [[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]]
    means = [[1.0, 5.0], [3.0, 4.0], [2.0, 2.0], [5.0, 1.0], [4.0, 3.0]]
    rewarded = {"mean": [[2.5, 0.5], [0.5, 4.0], [1.5, 1.0]], "preferences": [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]}
    results = {"label": "bone_soup", **indicators.summarise(prefs, [np.array([m]) for m in means], ["r1", "r2"])}
    indicators.add_fronts(results, {"rewarded_soup": rewarded}, None)
    figures = []  # the figure pareto.png is saved from, read back below
    savefig = matplotlib.figure.Figure.savefig

    def recorded(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recorded)
    evaluate.write_results(results, tmp_path, {"rewarded_soup": rewarded})

    written = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "pareto.png").stat().st_size > 0 and len(figures) == 1
    ax = figures[0].axes[0]
    drawn = {line.get_label(): line.get_xydata().tolist() for line in ax.lines}
    front = [m for m, on in zip(written["mean"], written["pareto"], strict=True) if on]
    assert drawn["bone_soup"] == sorted(front) == [[1, 5], [3, 4], [4, 3], [5, 1]]  # joined in objective order
    assert drawn["bone_soup (dominated)"] == [[2, 2]]  # marked apart, not joined
    assert drawn["rewarded_soup"] == [[0.5, 4], [1.5, 1], [2.5, 0.5]] and "rewarded_soup (dominated)" not in drawn
    assert drawn["reference (common nadir)"] == [written["reference_point"]] == [[0.5, 0.5]]
    labels = {(text.get_text(), tuple(text.xy)) for text in ax.texts}  # every point labelled with its mu
    assert ("0.25,0.75", (3.0, 4.0)) in labels and ("0.5,0.5", (1.5, 1.0)) in labels and len(labels) == 8


def _write_run(path, beta, mean, prefs=((0.0, 1.0), (0.5, 0.5), (1.0, 0.0)), objectives=("a", "b")):
    path.write_text(json.dumps({"beta": beta, "objectives": list(objectives), "preferences": prefs, "mean": mean}))
    return str(path)


def test_select_beta_picks_the_largest_hypervolume(tmp_path, capsys):
    # common nadir (1, 1): the corner points span no area; beta 0.7's middle point (2, 2.5) spans
    # 1 x 1.5, beta 0.8's (2, 2) spans 1 x 1, beta 0.6's (1.5, 1.5) spans 0.5 x 0.5.
    runs = [
        _write_run(tmp_path / "b06.json", 0.6, [[1, 3], [1.5, 1.5], [3, 1]]),
        _write_run(tmp_path / "b07.json", 0.7, [[1, 3], [2, 2.5], [3, 1]]),
        _write_run(tmp_path / "b08.json", 0.8, [[1, 3], [2, 2], [3, 1]]),
    ]
    out = indicators.select_beta(runs)
    assert out["reference_point"] == [1.0, 1.0]
    assert [r["hypervolume"] for r in out["runs"]] == [pytest.approx(0.25), pytest.approx(1.5), pytest.approx(1.0)]
    assert out["best"]["beta"] == 0.7

    assert main(["select-beta", *runs]) == 0
    assert "best: beta 0.7" in capsys.readouterr().out
    # a stated reference point (0, 0): each front's staircase of columns, beta 0.7 still largest
    assert main(["select-beta", *runs, "--reference", "0,0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reference_point"] == [0.0, 0.0]
    assert [r["hypervolume"] for r in out["runs"]] == [
        pytest.approx(1 * 3 + 0.5 * 1.5 + 1.5 * 1),
        pytest.approx(1 * 3 + 1 * 2.5 + 1 * 1),
        pytest.approx(1 * 3 + 1 * 2 + 1 * 1),
    ]


def test_select_beta_refuses_incomparable_runs(tmp_path, capsys):
    a = _write_run(tmp_path / "a.json", 0.6, [[1, 3], [2, 2], [3, 1]])
    b = _write_run(tmp_path / "b.json", 0.7, [[1, 3], [3, 1]], prefs=((0.0, 1.0), (1.0, 0.0)))
    c = _write_run(tmp_path / "c.json", 0.8, [[1, 3], [2, 2], [3, 1]], objectives=("a", "c"))
    with pytest.raises(BoneSoupError, match="different preferences"):
        indicators.select_beta([a, b])
    with pytest.raises(BoneSoupError, match="objectives"):
        indicators.select_beta([a, c])
    twin = _write_run(tmp_path / "a2.json", 0.6, [[1, 3], [2, 2.5], [3, 1]])
    with pytest.raises(BoneSoupError, match="beta 0.6 is given twice"):
        indicators.select_beta([a, twin])
    (tmp_path / "d.json").write_text(json.dumps({"mean": [[1, 2]], "objectives": ["a", "b"]}))
    assert main(["select-beta", a, str(tmp_path / "d.json")]) == 2
    assert main(["select-beta", a]) == 2
    assert main(["select-beta", a, str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("openrlhf-bonesoup: error:") == 3 and "Traceback" not in err
