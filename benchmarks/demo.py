"""Demo benchmark: `openrlhf-bonesoup demo` end to end against its one-minute budget on 2 CPU cores.

    .venv/bin/python benchmarks/demo.py

Runs the README's main command (after install) three times in fresh processes, cold imports included,
for beta 0.6, 0.7, 0.8, and prints each wall time, the demo's own time (soups, 202 merges, evaluation,
plot) and the ratio to the 60 s budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 60.0
CLI = Path(sys.executable).with_name("openrlhf-bonesoup")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for beta in ("0.6", "0.7", "0.8"):
            out = Path(tmp) / f"demo_{beta}"
            start = time.perf_counter()
            subprocess.run(
                [str(CLI), "demo", "--analytic", "--output", str(out), "--beta", beta], check=True, capture_output=True
            )
            wall = time.perf_counter() - start
            inner = json.loads((out / "results.json").read_text())["seconds"]
            print(
                f"beta {beta}: wall {wall:5.1f} s (demo itself {inner:4.1f} s), "
                f"{wall / BUDGET_S:.2f} of the {BUDGET_S:.0f} s budget"
            )


if __name__ == "__main__":
    main()
