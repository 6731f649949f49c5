"""Demo benchmark: `openrlhf-bonesoup demo` end to end, as the README runs it, in fresh processes.

    .venv/bin/python benchmarks/demo.py [--seeds 1,2,3] [--steps 24]
    .venv/bin/python benchmarks/demo.py --analytic

The real demo (four --cpu PPO launches, merges, vLLM evaluation) once per training seed: prints each
wall time against the 10-minute budget on 2 cores with the load average, each backbone's own objective
against the SFT policy's, both hypervolumes (SFT point as reference) and their spread over the seeds.
--analytic: the Theorem 1 demo for beta 0.6, 0.7, 0.8 against its one-minute budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from openrlhf_bonesoup.coefficients import backbone_matrix
from openrlhf_bonesoup.demo.recipe import SOUPS, STEPS

CLI = Path(sys.executable).with_name("openrlhf-bonesoup")


def analytic(tmp: Path) -> None:
    for beta in ("0.6", "0.7", "0.8"):
        out = tmp / f"demo_{beta}"
        start = time.perf_counter()
        command = [str(CLI), "demo", "--analytic", "--output", str(out), "--beta", beta]
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
        inner = json.loads((out / "results.json").read_text())["seconds"]
        print(f"beta {beta}: wall {wall:5.1f} s (demo itself {inner:4.1f} s), {wall / 60:.2f} of the 60 s budget")


def recipe(tmp: Path, seeds: list[int], steps: int) -> None:
    hv: dict[str, list[float]] = {"bone_soup": [], "rewarded_soup": []}
    for seed in seeds:
        out = tmp / f"demo_{seed}"
        load = os.getloadavg()[0]
        start = time.perf_counter()
        command = [str(CLI), "demo", "--output", str(out), "--seed", str(seed), "--steps", str(steps)]
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
        r = json.loads((out / "results.json").read_text())
        print(f"seed {seed}: wall {wall:5.0f} s, {wall / 600:.2f} of the 10-minute budget "
              f"(load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at the end)", flush=True)  # fmt: skip
        print(f"  SFT policy {np.round(r['sft'], 4).tolist()}")
        for name, backbones in r["backbones"].items():
            own = [round(h[j], 4) for j, h in enumerate(backbones)]
            matrix = backbone_matrix(SOUPS[name], 2)  # backbone j was trained on h_j = B_j . r
            gain = [round(float(matrix[j] @ np.subtract(h, r["sft"])), 3) for j, h in enumerate(backbones)]
            print(f"  {name}: backbone j's objective j {own}, h_j gain over SFT {gain}, "
                  f"moved {r['moved'][name]}, specialised {r['specialised'][name]}, "
                  f"hypervolume {r['hypervolume'][name]:.3g}", flush=True)  # fmt: skip
            hv[name].append(r["hypervolume"][name])
    for name, values in hv.items():
        print(f"{name}: hypervolume mean {np.mean(values):.3g}, std {np.std(values):.2g} over seeds {seeds}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--analytic", action="store_true")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.analytic:
            analytic(Path(tmp))
        else:
            recipe(Path(tmp), [int(s) for s in args.seeds.split(",")], args.steps)


if __name__ == "__main__":
    main()
