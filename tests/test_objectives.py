"""Objectives against the installed openrlhf: specs, combiners, OpenRLHF-loaded RMs with different
tokenizers, tokenizer bridging (ids passed through when the tokenizer matches), classifiers,
function objectives, normalisation, and the `score` sub-command.

Expected values are computed here independently: each RM scores one sample at a time, unpadded,
formatted as OpenRLHF's RewardDataset formats training pairs (text + " " + eos, eos last).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from openrlhf_bonesoup import objectives
from openrlhf_bonesoup.cli import main as cli_main
from openrlhf_bonesoup.coefficients import BoneSoupError

PROMPTS = ["Human: How do I bake bread? Assistant:", "Human: Tell me a joke. Assistant:", "Summarize: a fox. TL;DR:"]
RESPONSES = [" Mix flour, water and salt, then bake.", " Why did the chicken cross the road?", " a fox jumps"]
TEXTS = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)]

RULES = """
import torch

def reward_func(queries, prompts, labels):
    # length of the query, plus 100 when the label says "bonus"
    return {"rewards": torch.tensor([len(q) + (100.0 if l == "bonus" else 0.0) for q, l in zip(queries, labels)])}
"""


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def loaded(tiny):
    """rm_llama (policy tokenizer) and rm_gpt2 (own tokenizer), loaded by OpenRLHF's loader, in fp32."""
    policy = AutoTokenizer.from_pretrained(str(tiny["policy"]))
    objs = objectives.load_objectives(
        f"{tiny['rm_llama']},{tiny['rm_gpt2']}", policy_tokenizer=policy, model_kwargs={"attn_implementation": "eager"}
    )
    for o in objs:
        o.model.float()
    return policy, objs


def reference_rm(path, text: str) -> float:
    """One RM, one sample, no padding: OpenRLHF's loader and RewardDataset's formatting, written out."""
    from openrlhf.models import get_llm_for_sequence_regression

    model = get_llm_for_sequence_regression(str(path), "reward", attn_implementation="eager").float().eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok(text.rstrip("\n") + " " + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids[-1] = tok.eos_token_id
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()


def policy_batch(policy, texts):
    """Rollout-like ids: text + eos in the policy tokenizer, right-padded with pad (OpenRLHF's concat)."""
    rows = [policy(t, add_special_tokens=False)["input_ids"] + [policy.eos_token_id] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), policy.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


# --- specs ---------------------------------------------------------------------------------------


def test_comma_list_gives_kinds_names_and_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rules.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    specs = objectives.parse_objectives("rm,org/hub-rm,http://10.0.0.2:5000/get_reward,rules.py")
    assert [(s["name"], s["kind"]) for s in specs] == [
        ("rm", "model"),
        ("hub-rm", "model"),
        ("10.0.0.2_5000", "http"),
        ("rules", "function"),
    ]
    assert specs[0]["path"] == str(tmp_path / "rm")  # local: absolute, for workers on other nodes
    assert specs[1]["path"] == "org/hub-rm"  # a hub id stays as written
    assert specs[3]["path"] == str(tmp_path / "rules.py")
    assert all(s["normalize"] == "none" for s in specs)


def test_yaml_file_relative_to_itself(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "rules.py").write_text(RULES)
    (tmp_path / "cfg" / "objectives.yaml").write_text(
        "objectives:\n"
        "  - {name: helpful, path: /ckpt/helpful, normalize: {mean: 1.5, std: 2}}\n"
        "  - {name: harmless, url: 'http://h:1/get_reward', retries: 1, normalize: running}\n"
        "  - {name: format, path: rules.py}\n"
    )
    monkeypatch.chdir("/")
    specs = objectives.parse_objectives(str(tmp_path / "cfg" / "objectives.yaml"))
    assert [s["name"] for s in specs] == ["helpful", "harmless", "format"]
    assert specs[0]["normalize"] == {"mean": 1.5, "std": 2.0}
    assert specs[1]["normalize"] == "running" and specs[1]["retries"] == 1
    assert specs[2]["path"] == str(tmp_path / "cfg" / "rules.py")


def test_default_names_that_collide_are_numbered(tmp_path):
    for d in ("a/final", "b/final"):
        (tmp_path / d).mkdir(parents=True)
    specs = objectives.parse_objectives(f"{tmp_path}/a/final,{tmp_path}/b/final")
    assert [s["name"] for s in specs] == ["final_0", "final_1"]


@pytest.mark.parametrize(
    "entries, match",
    [
        ([{"path": "a", "colour": 1}], "unknown keys"),
        ([{"path": "a", "url": "http://h/x"}], "exactly one of"),
        ([{"path": "a", "normalize": {"mean": 0, "std": 0}}], "normalize"),
        ([{"path": "a", "normalize": "zscore"}], "normalize"),
        ([{"path": "a", "output": "softmax"}], "output"),
        ([{"path": "a", "name": "x"}, {"path": "b", "name": "x"}], "unique"),
        ([{"path": "a", "name": "has space"}], "name"),
        ([{"path": "/nowhere/rules.py"}], "does not exist"),
        ([{"url": "not a url"}], "not an http"),
        ([{"path": "a", "kind": "http"}], "kind"),
    ],
)
def test_bad_specs_are_one_line_errors(entries, match):
    with pytest.raises(BoneSoupError, match=match) as e:
        objectives.parse_objectives(entries)
    one_line(e)


def test_missing_file_and_empty_spec(tmp_path):
    with pytest.raises(BoneSoupError, match="does not exist") as e:
        objectives.parse_objectives(str(tmp_path / "nope.yaml"))
    one_line(e)
    with pytest.raises(BoneSoupError, match="no objectives"):
        objectives.parse_objectives("")
    with pytest.raises(BoneSoupError, match="objective 1 needs exactly one of"):
        objectives.parse_objectives("rmA,,rmB")  # a stray comma


# --- combiners -----------------------------------------------------------------------------------


def test_combiner_weights():
    np.testing.assert_allclose(objectives.combiner_weights("bonesoup", 2, beta=0.7, backbone_index=0), [0.7, 0.3])
    np.testing.assert_allclose(objectives.combiner_weights("bonesoup", 2, beta=0.7, backbone_index=1), [0.3, 0.7])
    np.testing.assert_allclose(
        objectives.combiner_weights("bonesoup", 3, beta=0.6, backbone_index=1), [0.2, 0.6, 0.2], atol=1e-12
    )
    np.testing.assert_allclose(
        objectives.combiner_weights("linear", 3, reward_weights=[0.5, 0.25, 0.25]), [0.5, 0.25, 0.25]
    )
    np.testing.assert_allclose(objectives.combiner_weights("single", 3, objective=2), [0, 0, 1])


@pytest.mark.parametrize(
    "combiner, kwargs, match",
    [
        ("bonesoup", {"beta": 0.7}, "needs --backbone_index"),
        ("bonesoup", {"backbone_index": 0}, "needs --beta"),
        ("bonesoup", {"beta": 0.7, "backbone_index": 2}, "0..1"),
        ("bonesoup", {"beta": 0.4, "backbone_index": 0}, "beta must lie"),
        ("bonesoup", {"beta": 0.7, "backbone_index": 0, "objective": 1}, "does not apply"),
        ("linear", {"reward_weights": [0.5, 0.6]}, "sum to 1"),
        ("linear", {"reward_weights": [1.0]}, "2 objectives"),
        ("single", {"objective": 5}, "0..1"),
        ("mean", {}, "unknown reward combiner"),
    ],
)
def test_combiner_errors(combiner, kwargs, match):
    with pytest.raises(BoneSoupError, match=match) as e:
        objectives.combiner_weights(combiner, 2, **kwargs)
    one_line(e)


# --- models, bridging ----------------------------------------------------------------------------


def test_openrlhf_rms_with_different_tokenizers_score_text(tiny, loaded):
    _, objs = loaded
    assert [o.head for o in objs] == ["openrlhf", "openrlhf"]
    got = objectives.score_texts(objs, PROMPTS, RESPONSES)
    want = [[reference_rm(tiny["rm_llama"], t), reference_rm(tiny["rm_gpt2"], t)] for t in TEXTS]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ids_pass_through_without_decode_when_the_tokenizer_matches(tiny, loaded):
    policy, objs = loaded
    assert [o.shares_policy_tokenizer for o in objs] == [True, False]
    ids, mask = policy_batch(policy, TEXTS)
    decodes = []
    upstream_decode = policy.batch_decode
    policy.batch_decode = lambda *a, **k: decodes.append(a) or upstream_decode(*a, **k)
    try:
        shared = objectives.raw_scores(objs[:1], policy_ids=(ids, mask), policy_tokenizer=policy, pad_sequence=True)
        assert decodes == []  # rm_llama shares the policy tokenizer: its ids, no decode
        both = objectives.raw_scores(objs, policy_ids=(ids, mask), policy_tokenizer=policy, pad_sequence=True)
        assert len(decodes) == 1  # rm_gpt2 needs text: decoded once for the batch
    finally:
        del policy.batch_decode
    with torch.no_grad():  # upstream RewardModelActor.forward on the same ids
        upstream = objs[0].model(ids, mask, pad_sequence=True).numpy()
    np.testing.assert_allclose(shared[:, 0], upstream, atol=1e-6)
    np.testing.assert_allclose(both[:, 0], upstream, atol=1e-6)
    # Bridged: padding and the policy's eos dropped, the text re-encoded in GPT-2's format.
    np.testing.assert_allclose(both[:, 1], [reference_rm(tiny["rm_gpt2"], t) for t in TEXTS], atol=1e-5)


def test_policy_texts_drop_padding_and_special_tokens(loaded):
    policy, _ = loaded
    ids, mask = policy_batch(policy, TEXTS)
    ids = torch.cat([torch.full((len(TEXTS), 1), policy.bos_token_id), ids], dim=1)  # a leading bos
    mask = torch.cat([torch.ones(len(TEXTS), 1, dtype=torch.long), mask], dim=1)
    assert objectives.policy_texts(policy, ids, mask) == TEXTS


def test_hf_classifier_logit_and_probability(tiny):
    specs = [
        {"name": "logit1", "path": str(tiny["classifier"]), "label": 1},
        {"name": "prob0", "path": str(tiny["classifier"]), "label": 0, "output": "prob"},
    ]
    objs = objectives.load_objectives(specs)
    for o in objs:
        o.model.float()
    assert [o.head for o in objs] == ["classifier", "classifier"]
    # loaded in bf16 like the objective (its default param_dtype), then compared in fp32
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["classifier"]), dtype=torch.bfloat16)
    model = model.float().eval()
    tok = AutoTokenizer.from_pretrained(str(tiny["classifier"]))
    with torch.no_grad():
        logits = [model(**tok(t, return_tensors="pt")).logits[0] for t in TEXTS]
    got = objectives.score_texts(objs, PROMPTS, RESPONSES)
    np.testing.assert_allclose(got[:, 0], [lg[1].item() for lg in logits], atol=1e-5)
    np.testing.assert_allclose(got[:, 1], [lg.softmax(-1)[0].item() for lg in logits], atol=1e-6)


def test_classifier_with_several_labels_needs_a_choice(tiny):
    with pytest.raises(BoneSoupError, match="has 2 labels") as e:
        objectives.load_objectives(str(tiny["classifier"]))
    one_line(e)


# --- functions, normalisation --------------------------------------------------------------------


def test_function_objective_gets_queries_prompts_labels(tmp_path):
    (tmp_path / "rules.py").write_text(RULES)
    objs = objectives.load_objectives(str(tmp_path / "rules.py"))
    got = objectives.score_texts(objs, PROMPTS, RESPONSES, labels=["bonus", None, "x"])
    np.testing.assert_allclose(got[:, 0], [len(TEXTS[0]) + 100, len(TEXTS[1]), len(TEXTS[2])])


def test_function_objectives_run_in_the_callers_thread(tmp_path):
    # A reward_func that loads a model lazily must not race another: transformers' from_pretrained
    # patches torch's init functions process-wide while loading (two racing loads once left them
    # patched for the rest of the process). Only HTTP endpoints run in threads.
    code = "import threading\ndef reward_func(q, p, l):\n    return [float(threading.get_ident())] * len(q)\n"
    (tmp_path / "a.py").write_text(code)
    (tmp_path / "b.py").write_text(code)
    objs = objectives.load_objectives(f"{tmp_path / 'a.py'},{tmp_path / 'b.py'}")
    got = objectives.score_texts(objs, PROMPTS, RESPONSES)
    assert (got == float(threading.get_ident())).all()


def test_fixed_and_running_normalisation(tmp_path):
    (tmp_path / "rules.py").write_text(RULES)
    path = str(tmp_path / "rules.py")
    objs = objectives.load_objectives(
        [
            {"name": "raw", "path": path},
            {"name": "fixed", "path": path, "normalize": {"mean": 10, "std": 4}},
            {"name": "running", "path": path, "normalize": "running"},
        ]
    )
    first = ["aa", "bbbb", "c"]
    second = ["dddddd", "eee"]
    objectives.score_texts(objs, first, [""] * 3)
    got = objectives.score_texts(objs, second, [""] * 2)
    lengths = np.array([6.0, 3.0])
    np.testing.assert_allclose(got[:, 0], lengths)
    np.testing.assert_allclose(got[:, 1], (lengths - 10) / 4)
    seen = np.array([2.0, 4.0, 1.0, 6.0, 3.0])  # running statistics over everything scored so far
    np.testing.assert_allclose(got[:, 2], (lengths - seen.mean()) / seen.std())


# --- the score sub-command -----------------------------------------------------------------------


def test_score_command_writes_rewards_and_the_combined_reward(tiny, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"prompt": p, "response": r, "id": i}) + "\n"
            for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True))
        )
    )
    out = tmp_path / "out.jsonl"
    argv = ["score", "--reward.model_name_or_path", f"{tiny['rm_llama']},{tiny['rm_gpt2']}"]
    argv += ["--reward_combiner", "bonesoup", "--beta", "0.7", "--backbone_index", "0"]
    argv += ["--input", str(samples), "--output", str(out), "--batch_size", "2"]
    assert cli_main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2] and records[0]["prompt"] == PROMPTS[0]
    for r in records:
        assert r["reward"] == pytest.approx(0.7 * r["rewards"][0] + 0.3 * r["rewards"][1])
    printed = capsys.readouterr().out
    assert "rm_llama: mean" in printed and "rm_gpt2: mean" in printed
    column = np.array([r["rewards"][1] for r in records])
    assert f"rm_gpt2: mean {column.mean():.6g}, std {column.std():.6g}" in printed

    argv[argv.index("bonesoup") : argv.index("0") + 1] = ["single", "--objective", "1"]
    assert cli_main(argv) == 0
    single = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in single] == [r["rewards"][1] for r in records]


@pytest.mark.parametrize(
    "line, extra, match",
    [
        ('{"prompt": "p"}', [], "needs string fields"),
        ("not json", [], "is not JSON"),
        ('{"prompt": "p", "response": "r"}', ["--reward_combiner", "linear", "--reward_weights", "1,x"], "numbers"),
        ('{"prompt": "p", "response": "r"}', ["--reward_combiner", "single"], "needs --objective"),
    ],
)
def test_score_command_errors_are_one_line(tmp_path, capsys, line, extra, match):
    (tmp_path / "rules.py").write_text(RULES)
    (tmp_path / "in.jsonl").write_text(line + "\n")
    argv = ["score", "--reward.model_name_or_path", f"{tmp_path}/rules.py,{tmp_path}/rules.py"]
    argv += extra or ["--reward_combiner", "single", "--objective", "0"]
    argv += ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and err.startswith("openrlhf-bonesoup: error:")
    assert not (tmp_path / "out.jsonl").exists()
