"""Nothing lost on a crash: outputs and manifests are written durably, a merge killed at any step of
publishing leaves the old output or the new one (and the next merge cleans up), an interrupted evaluate
resumes from what it finished, an interrupted demo does not block its rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from openrlhf_bonesoup import checkpoints, evaluate, files, generation, soup
from openrlhf_bonesoup.cli import main
from openrlhf_bonesoup.coefficients import backbone_matrix
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.merge_engine import merge_checkpoints

# --- merge --overwrite killed at each step of publishing ----------------------------------------------

KILLED_MERGE = """
import os, shutil, signal, sys
from openrlhf_bonesoup import checkpoints, files
from openrlhf_bonesoup.merge_engine import merge_checkpoints

kill_at, can_swap = int(sys.argv[4]), sys.argv[5] == "swap"
if not can_swap:
    files.exchange = lambda a, b: False  # a filesystem that cannot swap two folders
publishing, done = False, 0


def step(fn):  # SIGKILL right after the kill_at-th file-system step of publishing
    def run(*args, **kwargs):
        global done
        result = fn(*args, **kwargs)
        if publishing:
            done += 1
            if done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    return run


files.exchange, files.fsync_dir = step(files.exchange), step(files.fsync_dir)
os.rename, shutil.rmtree = step(os.rename), step(shutil.rmtree)
publish = checkpoints.publish


def killed_publish(*args):
    global publishing
    publishing = True
    if kill_at == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    publish(*args)
    publishing = False


checkpoints.publish = killed_publish
merge_checkpoints(sys.argv[1:3], [[0.0, 1.0]], [sys.argv[3]], overwrite=True, progress=False)
"""


def theta(folder) -> list[float]:
    return load_file(str(folder / "model.safetensors"))["theta"].tolist()


@pytest.mark.parametrize("can_swap", [True, False], ids=["swap", "move-aside"])
def test_a_merge_killed_at_each_step_of_publishing_leaves_the_old_or_the_new_output(tmp_path, can_swap):
    inputs = [tmp_path / "in0", tmp_path / "in1"]
    for j, folder in enumerate(inputs):
        folder.mkdir()
        save_file({"theta": torch.tensor([1.0, 2.0]) * (j + 1)}, str(folder / "model.safetensors"))
    out = tmp_path / "out"
    old, new = [1.0, 2.0], [2.0, 4.0]  # weights (1, 0) then (0, 1)
    seen = []
    for kill_at in range(10):
        merge_checkpoints(inputs, [[1.0, 0.0]], [out], overwrite=True, progress=False)  # the old output
        script = [sys.executable, "-c", textwrap.dedent(KILLED_MERGE), *map(str, inputs), str(out), str(kill_at)]
        run = subprocess.run([*script, "swap" if can_swap else "move-aside"], capture_output=True, text=True)
        if run.returncode == 0:  # publishing has fewer steps than kill_at: the last kill was after the last step
            break
        assert run.returncode == -9, run.stderr[-2000:]
        if not can_swap:
            checkpoints.recover(out)  # what the next merge to it does first (a moved-aside output returns)
        seen.append(theta(out))  # the old output or the new one, whole
        assert seen[-1] in (old, new), (kill_at, seen[-1])
        merge_checkpoints(inputs, [[0.0, 1.0]], [out], overwrite=True, progress=False)  # the next run
        assert theta(out) == new
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in0", "in1", "out"]  # its leftovers cleaned
    assert run.returncode == 0 and old in seen and new in seen  # killed before and after the output changed
    assert len(seen) == (3 if can_swap else 5) + 1  # every step (and before the first)


def test_recover_restores_only_what_a_dead_merge_of_this_host_moved_aside(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / f".out.old-{checkpoints.socket.gethostname()}-999999999"  # no such process
    aside.mkdir()
    (aside / "weights").write_text("old")
    running = tmp_path / f".out.partial-{checkpoints.socket.gethostname()}-{os.getpid()}"  # this process: alive
    running.mkdir()
    checkpoints.recover(out)
    assert (out / "weights").read_text() == "old" and not aside.exists() and running.is_dir()


# --- small files: fsync, rename, fsync the folder -----------------------------------------------------


def test_the_soup_manifest_is_written_durably(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("rename", str(b))) or real_replace(a, b))
    specs = [{"name": "a", "kind": "http", "url": "http://h:1/r", "normalize": "none"}] * 2
    folder = tmp_path / "soup"
    soup.init_soup(folder, objectives=specs, beta=0.7, matrix=backbone_matrix(0.7, 2), sft=None)
    assert [c[0] for c in calls] == ["fsync", "rename", "fsync"]
    assert calls[0][1].startswith(str(folder / ".soup.json.tmp-"))  # the new contents first
    assert calls[1:] == [("rename", str(folder / "soup.json")), ("fsync", str(folder))]  # then its folder entry
    assert json.loads((folder / "soup.json").read_text())["n"] == 2
    assert sorted(p.name for p in folder.iterdir()) == [".soup.lock", "soup.json"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next(tmp_path):
    stale = tmp_path / f".x.json.tmp-{checkpoints.socket.gethostname()}-999999999"
    stale.write_text("half")
    files.write_durably(tmp_path / "x.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


# --- evaluate resumes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_soup(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    folder = root / "soup"
    specs = [{"name": "a", "path": str(tiny["rm_llama"])}, {"name": "b", "path": str(tiny["rm_gpt2"])}]
    soup.init_soup(folder, objectives=specs, beta=0.7, matrix=backbone_matrix(0.7, 2), sft=str(tiny["policy"]))
    for j in range(2):
        backbone = root / f"backbone{j}"
        backbone.mkdir()
        for f in tiny["policy"].iterdir():
            (backbone / f.name).write_bytes(f.read_bytes())
        weights = load_file(str(backbone / "model.safetensors"))
        noise = torch.Generator().manual_seed(j)
        weights = {k: v + 0.05 * torch.randn(v.shape, generator=noise) for k, v in weights.items()}
        save_file(weights, str(backbone / "model.safetensors"), metadata={"format": "pt"})
        soup.register_backbone(folder, j, status="trained", checkpoint=backbone)
    (root / "p.jsonl").write_text('{"input": "Human: hi Assistant:"}\n{"input": "The weather today is"}\n')
    return folder


def test_an_interrupted_evaluate_resumes_from_what_it_finished(small_soup, tmp_path, monkeypatch):
    prefs = [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    kw = dict(sampling={"max_new_tokens": 4, "batch_size": 2, "backend": "transformers"})
    prompts = small_soup.parent / "p.jsonl"
    whole = evaluate.evaluate(small_soup, prefs, prompts, tmp_path / "whole", **kw)

    generated = []
    real = generation.Generator.generate

    def interrupted(generator, model, texts):  # Ctrl-C while the second preference generates
        generated.append(model.name)
        if len(generated) == 2:
            raise KeyboardInterrupt
        return real(generator, model, texts)

    monkeypatch.setattr(generation.Generator, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(small_soup, prefs, prompts, tmp_path / "out", **kw)
    assert sorted(p.name for p in (tmp_path / "out" / "generations").iterdir()) == ["mu_0.00_1.00.jsonl"]

    with pytest.raises(BoneSoupError, match="other settings"):  # interrupted, but with other preferences
        evaluate.evaluate(small_soup, prefs[:1], prompts, tmp_path / "out", **kw)
    generated.clear()
    monkeypatch.setattr(generation.Generator, "generate", lambda *a: generated.append(a[1].name) or real(*a))
    again = evaluate.evaluate(small_soup, prefs, prompts, tmp_path / "out", **kw)
    assert generated == ["mu_0.50_0.50", "mu_1.00_0.00"]  # the finished preference is not redone
    assert again["mean"] == whole["mean"] and again["sem"] == whole["sem"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["mean"] == whole["mean"]
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # no temporary files left

    # Another evaluation into the same folder is refused, unless it starts afresh
    with pytest.raises(BoneSoupError, match="holds an earlier evaluation"):  # finished: refused before loading
        evaluate.evaluate(small_soup, prefs[:1], prompts, tmp_path / "out", **kw)
    generated.clear()
    fresh = evaluate.evaluate(small_soup, prefs[:1], prompts, tmp_path / "out", overwrite=True, **kw)
    assert generated == ["mu_0.00_1.00"] and fresh["mean"] == whole["mean"][:1]


# --- demo ---------------------------------------------------------------------------------------------


def test_a_demo_interrupted_by_ctrl_c_does_not_block_its_rerun(tmp_path, monkeypatch, capsys):
    from openrlhf_bonesoup.demo import analytic

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(analytic, "_merged_rewards", interrupted)
        assert main(["demo", "--analytic", "--output", str(tmp_path / "d")]) == 130
    assert (tmp_path / "d" / "bone_soup" / "soup.json").is_file() and not (tmp_path / "d" / "results.json").exists()
    assert main(["demo", "--analytic", "--output", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "results.json").read_text())["format"] == analytic.FORMAT
