"""The tests never touch a Ray cluster the user runs on the same machine (RLHF engineers work on Ray nodes).

A cluster started with `ray start --head`, named by RAY_ADDRESS: the way `ray.init()` without an address
finds a running cluster (the other way, /tmp/ray/ray_current_cluster, is shared by everyone on this
machine, so the foreign cluster here keeps its own temp dir). The suite's Ray tests start local clusters
of their own (`address="local"`) and leave the foreign one running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import ROOT, TESTS

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_ray_tests_leave_a_cluster_the_user_runs_alone():
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rayx-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [str(RAY), "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--num-cpus=1", "--block",
         "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not answers(port):
            assert head.poll() is None and time.monotonic() < deadline, "the foreign Ray head did not start"
            time.sleep(1)
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        test = TESTS / "test_merge.py::test_ray_tasks_when_ray_is_initialised"
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", str(test)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:]
        assert head.poll() is None and answers(port)  # the foreign cluster still runs
    finally:
        head.terminate()  # `ray start --block` stops its cluster on SIGTERM
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
