"""`openrlhf-bonesoup soup init | register | show`: a soup made and filled without the training launcher
(backbones trained elsewhere, or a post-training hook that failed), then merged from its manifest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

from openrlhf_bonesoup.cli import main


def test_a_soup_made_by_hand_merges_like_one_made_by_training(tiny, tmp_path, capsys):
    soup_dir = tmp_path / "soup"
    rms = f"{tiny['rm_llama']},{tiny['rm_gpt2']}"
    assert main(["soup", "init", "--soup_dir", str(soup_dir), "--objectives", rms, "--sft", str(tiny["policy"])]) == 0
    manifest = json.loads((soup_dir / "soup.json").read_text())
    assert manifest["beta"] == 0.7 and manifest["matrix"] == [[0.7, 0.3], [0.3, 0.7]]
    assert [o["name"] for o in manifest["objectives"]] == ["rm_llama", "rm_gpt2"]

    capsys.readouterr()
    assert main(["soup", "show", "--soup_dir", str(soup_dir)]) == 0
    shown = capsys.readouterr().out
    assert "backbone 0: missing" in shown and "ready to merge: no" in shown

    backbones = []
    for j in range(2):  # two "trained" backbones: copies of the policy, one with every weight doubled
        backbones.append(tmp_path / f"backbone{j}")
        shutil.copytree(tiny["policy"], backbones[-1])
    weights = load_file(str(backbones[1] / "model.safetensors"))
    from safetensors.torch import save_file

    save_file(
        {k: 2 * v for k, v in weights.items()}, str(backbones[1] / "model.safetensors"), metadata={"format": "pt"}
    )
    assert (
        main(
            [
                "soup",
                "register",
                "--soup_dir",
                str(soup_dir),
                "--backbone_index",
                "0",
                "--checkpoint",
                str(backbones[0]),
            ]
        )
        == 0
    )
    # the top-level alias, as the post-training hook's recovery hint names it
    assert (
        main(["register", "--soup_dir", str(soup_dir), "--backbone_index", "1", "--checkpoint", str(backbones[1])]) == 0
    )
    capsys.readouterr()
    assert main(["soup", "show", "--soup_dir", str(soup_dir)]) == 0
    shown = capsys.readouterr().out
    assert f"backbone 1: trained, {backbones[1]}" in shown and "ready to merge: yes" in shown

    out = tmp_path / "merged"
    assert main(["merge", "--soup_dir", str(soup_dir), "--preference", "0.5,0.5", "--output", str(out)]) == 0
    merged = load_file(str(out / "model.safetensors"))
    # lambda = (0.5, 0.5): 0.5 w + 0.5 (2 w) = 1.5 w
    name = "model.embed_tokens.weight"
    np.testing.assert_allclose(merged[name].numpy(), 1.5 * weights[name].numpy(), rtol=1e-6)


def test_soup_mistakes_are_one_line(tiny, tmp_path, capsys):
    soup_dir = str(tmp_path / "soup")
    assert main(["soup", "show", "--soup_dir", soup_dir]) == 2
    assert "make one with `openrlhf-bonesoup soup init`" in capsys.readouterr().err
    rms = f"{tiny['rm_llama']},{tiny['rm_gpt2']}"
    assert main(["soup", "init", "--soup_dir", soup_dir, "--objectives", rms, "--sft", str(tiny["policy"])]) == 0
    again = ["soup", "init", "--soup_dir", soup_dir, "--objectives", rms, "--sft", str(tiny["policy"]), "--beta", "0.8"]
    assert main(again) == 2  # another B for the same folder
    register = ["soup", "register", "--soup_dir", soup_dir, "--checkpoint", str(tiny["policy"])]
    assert main([*register, "--backbone_index", "2"]) == 2
    assert main([*register, "--backbone_index", "0", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("openrlhf-bonesoup: error:") for line in err), err
    assert "beta" in err[0] and "outside 0..1" in err[1] and "does not exist" in err[2]


@pytest.mark.parametrize("command", ["merge", "evaluate"])
def test_an_incomplete_soup_names_the_command_that_completes_it(tiny, tmp_path, capsys, command):
    soup_dir = str(tmp_path / "soup")
    rms = f"{tiny['rm_llama']},{tiny['rm_gpt2']}"
    assert main(["soup", "init", "--soup_dir", soup_dir, "--objectives", rms, "--sft", str(tiny["policy"])]) == 0
    argv = [command, "--soup_dir", soup_dir, "--preferences", "0.5,0.5", "--output", str(tmp_path / "o")]
    if command == "evaluate":
        (tmp_path / "p.jsonl").write_text('{"input": "hi"}\n')
        argv += ["--prompts", str(tmp_path / "p.jsonl")]
    assert main(argv) == 2
    assert "openrlhf-bonesoup soup register" in capsys.readouterr().err


# --- pre-flight: every path checked from its config.json, stored absolute ---------------------------


def test_soup_init_refuses_a_causal_lm_as_reward_model_and_a_missing_sft(tiny, tmp_path, capsys):
    soup_dir = str(tmp_path / "soup")
    init = ["soup", "init", "--soup_dir", soup_dir]
    assert main([*init, "--objectives", f"{tiny['rm_llama']},{tiny['policy']}", "--sft", str(tiny["policy"])]) == 2
    rms = f"{tiny['rm_llama']},{tiny['rm_gpt2']}"
    assert main([*init, "--objectives", rms, "--sft", "nosuchsft"]) == 2
    assert main([*init, "--objectives", rms, "--sft", str(tiny["rm_gpt2"])]) == 2
    assert main([*init, "--objectives", f"{tiny['rm_llama']},{tiny['classifier']}", "--sft", str(tiny["policy"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("openrlhf-bonesoup: error:") for line in err), err
    assert "no value head `score.weight`" in err[0]
    assert "--sft nosuchsft does not exist" in err[1]
    assert "an OpenRLHF reward model" in err[2] and "not a policy model" in err[2]
    assert "has 2 labels" in err[3]
    assert not (tmp_path / "soup" / "soup.json").exists()  # nothing written for a refused soup


def test_soup_init_stores_a_relative_sft_absolute(tiny, tmp_path, monkeypatch):
    shutil.copytree(tiny["policy"], tmp_path / "sft")
    monkeypatch.chdir(tmp_path)
    rms = f"{tiny['rm_llama']},{tiny['rm_gpt2']}"
    assert main(["soup", "init", "--soup_dir", "soup", "--objectives", rms, "--sft", "sft"]) == 0
    monkeypatch.chdir("/")  # read from elsewhere, as a merge on another node would
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["sft"] == str(tmp_path / "sft")


def test_soup_register_refuses_a_reward_model_as_backbone(tiny, tmp_path, capsys):
    soup_dir = str(tmp_path / "soup")
    rms = f"{tiny['rm_llama']},{tiny['rm_gpt2']}"
    assert main(["soup", "init", "--soup_dir", soup_dir, "--objectives", rms, "--sft", str(tiny["policy"])]) == 0
    register = ["soup", "register", "--soup_dir", soup_dir, "--backbone_index", "0"]
    assert main([*register, "--checkpoint", str(tiny["rm_llama"])]) == 2
    assert main([*register, "--checkpoint", str(tiny["classifier"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is an OpenRLHF reward model" in err[0] and "is GPT2ForSequenceClassification" in err[1]
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["backbones"] == [None, None]
