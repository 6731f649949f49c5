"""`openrlhf-bonesoup coefficients`: output, and one-line exit-2 errors for every bad input."""

import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "openrlhf_bonesoup.cli", "coefficients", *args], capture_output=True, text=True
    )


def test_json_output():
    r = run("--beta", "0.7", "--preference", "0.3,0.7", "--alpha", "0.2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["matrix"][0] == pytest.approx([0.7, 0.3]) and out["matrix"][1] == pytest.approx([0.3, 0.7])
    # 0.7 x + 0.3 y = 0.3, 0.3 x + 0.7 y = 0.7 -> x = 0, y = 1 (mu = row 2 of B is backbone 2 itself)
    assert out["lambda"] == pytest.approx([0.0, 1.0], abs=1e-12)
    assert out["sft_weight"] == pytest.approx(-0.2)
    assert out["lambda_extrapolated"] == pytest.approx([0.0, 1.2], abs=1e-12)


def test_no_sft_weight_without_alpha_and_n3():
    r = run("--beta", "0.6", "--preference", "0.2,0.3,0.5", "--json")
    out = json.loads(r.stdout)
    assert "sft_weight" not in out
    assert len(out["matrix"]) == 3 and out["matrix"][0] == pytest.approx([0.6, 0.2, 0.2])


def test_human_output():
    # mu = (0.3, 0.7) is row 2 of B(0.7): lambda = (0, 1), nowhere in the echoed inputs
    r = run("--preference", "0.3,0.7")
    assert r.returncode == 0
    assert "lambda = B^-1 mu: [0. 1.]" in r.stdout.splitlines()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--beta", "0.4", "--preference", "0.3,0.7"], "beta"),
        (["--beta", "1.5", "--preference", "0.3,0.7"], "beta"),
        (["--preference", "0.3,0.3"], "sum to 1"),
        (["--preference", "1.3,-0.3"], ">= 0"),
        (["--preference", "1"], "objectives must be"),
        (["--preference", "a,b"], "comma-separated"),
        (["--preference", "0.25,0.25,0.25,0.25", "--row", "0.5,0.25,0,0.25"], "singular"),
        (["--preference", "0.3,0.3,0.4", "--row", "0.5,0.5"], "--row has 2"),
        (["--preference", "0.3,0.7", "--alpha", "-1"], "alpha"),
        (["--preference", "0.3,0.7", "--alpha", "x"], "invalid float"),
        (["--beta", "0.7"], "required"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, words):
    r = run(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and words in lines[0]


def test_console_script_installed():
    # The console script declared in pyproject.toml is what users type.
    from pathlib import Path

    exe = Path(sys.executable).parent / "openrlhf-bonesoup"
    r = subprocess.run([exe, "coefficients", "--preference", "0.3,0.7", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["lambda"] == pytest.approx([0.0, 1.0], abs=1e-12)
