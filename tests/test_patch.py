"""patches/openrlhf-0.11.2-bonesoup.patch on a copy of the installed openrlhf 0.11.2 package.

The patch changes one file, openrlhf/cli/train_ppo_ray.py. The launch checks run the patched package as
users do, `python -m openrlhf.cli.train_ppo_ray`, in a subprocess with the copy first on PYTHONPATH. The
parser checks run in this process: `openrlhf.cli` is pointed at the copy's cli folder, so the module of
that name is the patched one, imported with the installed package's other (identical) modules.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openrlhf.cli
import pytest

from openrlhf_bonesoup.integration import launcher

ROOT = Path(__file__).resolve().parent.parent
PATCH = ROOT / "patches" / "openrlhf-0.11.2-bonesoup.patch"
OURS = ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "1"]


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """A copy of the installed openrlhf package with the patch applied; returns the folder holding it."""
    root = tmp_path_factory.mktemp("patched")
    shutil.copytree(Path(openrlhf.__file__).parent, root / "openrlhf", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)  # paths relative to root, whatever encloses it
    subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=root, check=True)
    subprocess.run(["git", "apply", str(PATCH)], cwd=root, check=True)
    return root


def argv(tmp_path: Path, *extra: str) -> list[str]:
    # --logger.wandb.run_name: upstream's default holds the current minute.
    return [
        "--actor.model_name_or_path", "OpenRLHF/Llama-3-8b-sft-mixture",
        "--reward.model_name_or_path", "rm/harmless,rm/helpful",
        "--ckpt.output_dir", str(tmp_path / "ckpt1"), "--rollout.batch_size", "8",
        "--logger.wandb.run_name", "run", *extra,
    ]  # fmt: skip


@pytest.fixture
def run_patched(patched, monkeypatch):
    """Run the patched `openrlhf.cli.train_ppo_ray` as __main__ here, as the launcher runs upstream's."""

    def run(args: list[str]) -> None:
        with monkeypatch.context() as m:
            m.setattr(openrlhf.cli, "__path__", [str(patched / "openrlhf" / "cli")])
            m.delitem(sys.modules, launcher.UPSTREAM, raising=False)  # imported as a module by another test
            m.setattr(sys, "argv", [launcher.UPSTREAM, *args])
            runpy.run_module(launcher.UPSTREAM, run_name="__main__", alter_sys=True)

    return run


def parsed(run) -> tuple[object, bool]:
    """OpenRLHF's args right after its parser and hierarchize, from `run()` (one of upstream's mains), and
    whether that main ran inside the plugin's launcher (which the patched main hands over to)."""
    seen = {}

    class Stop(Exception):
        pass

    def stop(args):
        seen.update(args=args, handed_over=launcher._running_openrlhf)
        raise Stop

    with launcher._hierarchize_then(stop), pytest.raises(Stop):
        run()
    return seen["args"], seen["handed_over"]


def test_the_patch_touches_only_train_ppo_ray():
    text = PATCH.read_text()
    files = [line.split()[-1] for line in text.splitlines() if line.startswith("+++ ")]
    assert files == ["b/openrlhf/cli/train_ppo_ray.py"]
    assert sum(line.startswith("+") and not line.startswith("+++") for line in text.splitlines()) <= 20


def test_the_patched_launch_is_the_drop_in_launchers(patched, tmp_path):
    args = argv(tmp_path, *OURS, "--soup.dir", str(tmp_path / "soup"), "--merge.grid", "11", "--dry_run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(patched), os.environ["PYTHONPATH"]])}
    run = subprocess.run(
        [sys.executable, "-m", "openrlhf.cli.train_ppo_ray", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    plan = json.loads(run.stdout[run.stdout.index("{\n") :])  # DeepSpeed logs a line to stdout first
    # What the drop-in launcher's --dry_run plans for this launch, written out: OpenRLHF's argv without our
    # flags, both objectives to the reward actors, row 1 of B(0.7), the critic from the policy, an
    # 11-point sweep, and our hook with the config in Ray's runtime_env.
    objectives = [
        {"name": "harmless", "path": "rm/harmless", "kind": "model", "normalize": "none"},
        {"name": "helpful", "path": "rm/helpful", "kind": "model", "normalize": "none"},
    ]
    bonesoup = {"objectives": objectives, "weights": pytest.approx([0.3, 0.7]), "combiner": "bonesoup"}
    assert plan["bonesoup"] == {**bonesoup, "route": "reward_actors"}
    assert plan["openrlhf_argv"] == argv(tmp_path)
    assert plan["reward.model_name_or_path"] == "rm/harmless,rm/helpful" and plan["reward.remote_url"] is None
    assert plan["critic.model_name_or_path"] == "OpenRLHF/Llama-3-8b-sft-mixture"
    assert (plan["backbone_index"], plan["output_dir"], plan["soup_dir"]) == (
        1,
        str(tmp_path / "ckpt1"),
        str(tmp_path / "soup"),
    )
    np.testing.assert_allclose(plan["merge_preferences"], [[k / 10, 1 - k / 10] for k in range(11)], atol=1e-12)
    assert plan["runtime_env"]["worker_process_setup_hook"] == "openrlhf_bonesoup.integration.worker.setup"
    assert json.loads(plan["runtime_env"]["env_vars"]["OPENRLHF_BONESOUP_CONFIG"]) == plan["bonesoup"]
    assert plan["cpu"] is None


def test_without_the_plugin_a_combiner_is_a_one_line_error(patched, tmp_path):
    # Hide the editable install's finder; nothing else puts openrlhf_bonesoup on the path here.
    hide = (
        "import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path "
        "if not getattr(f, '__module__', '').startswith('__editable___openrlhf_bonesoup')]; "
        "runpy.run_module('openrlhf.cli.train_ppo_ray', run_name='__main__', alter_sys=True)"
    )
    # Without the plugin, nothing provides flash-attn's CUDA extension, which cannot exist here: an empty
    # module file stands in for it (the one stand-in the tests allow), after the patched package.
    (tmp_path / "cuda_ext").mkdir()
    (tmp_path / "cuda_ext" / "flash_attn_2_cuda.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(patched), str(tmp_path / "cuda_ext")])}
    run = subprocess.run(
        [sys.executable, "-c", hide, *argv(tmp_path, *OURS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    error = [line for line in run.stderr.splitlines() if "error" in line]
    assert error == ["train_ppo_ray.py: error: --reward.combiner needs the openrlhf_bonesoup plugin (not installed)"]
    assert "Traceback" not in run.stderr


def test_the_patched_help_lists_the_plugin_flags(run_patched, capsys):
    with pytest.raises(SystemExit) as e:
        run_patched(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--reward.combiner", "--reward.beta", "--reward.backbone_index", "--soup.dir", "--merge.grid"):
        assert flag in out
    assert "--vllm.num_engines" in out  # and OpenRLHF's own


def test_without_plugin_flags_the_patched_parser_gives_upstreams_args(run_patched, tmp_path):
    args = argv(tmp_path, "--ds.zero_stage", "3", "--reward.clip_range", "-5", "5")
    upstream, _ = parsed(lambda: launcher._run_openrlhf(args))  # the installed, unpatched module
    ours, handed_over = parsed(lambda: run_patched(args))
    assert not handed_over and ours == upstream  # nothing of the plugin in OpenRLHF's args unless asked for
    assert not hasattr(ours, "reward_combiner") and ours.ds.zero_stage == 3


def test_an_abbreviated_plugin_flag_ends_in_openrlhfs_parser_error(run_patched, tmp_path, capsys):
    # OpenRLHF's parser takes `--reward_comb` for --reward_combiner, the plugin's does not. The patched
    # main hands over; the plugin runs the patched main again, which adds no plugin flags this time.
    with pytest.raises(SystemExit) as e:
        run_patched(argv(tmp_path, "--reward_comb", "bonesoup", "--dry_run"))
    assert e.value.code == 2
    err = capsys.readouterr().err  # one line, with the flag it was meant to be
    assert err.count("\n") == 1 and "unrecognized arguments: --reward_comb (did you mean --reward_combiner" in err
