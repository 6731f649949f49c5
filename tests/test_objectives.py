"""Objectives against the installed openrlhf: specs, combiners, OpenRLHF-loaded RMs with different
tokenizers, tokenizer bridging (ids passed through when the tokenizer matches), classifiers,
function objectives, normalisation, and the `score` sub-command.

Expected values are computed here independently: each RM scores one sample at a time, unpadded,
formatted as OpenRLHF's RewardDataset formats training pairs (text + " " + eos, eos last).
"""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest
import torch
from rollouts import reference_rm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from openrlhf_bonesoup import objectives, scoring
from openrlhf_bonesoup.cli import main as cli_main
from openrlhf_bonesoup.errors import BoneSoupError

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
    objs = objectives.load_objectives(f"{tiny['rm_llama']},{tiny['rm_gpt2']}", policy_tokenizer=policy)
    for o in objs:
        o.model.float()
    return policy, objs


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


# --- models, bridging ----------------------------------------------------------------------------


def test_openrlhf_rms_with_different_tokenizers_score_text(tiny, loaded):
    _, objs = loaded
    assert [o.head for o in objs] == ["openrlhf", "openrlhf"]
    got = scoring.score_texts(objs, PROMPTS, RESPONSES)
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
        shared = scoring.raw_scores(objs[:1], policy_ids=(ids, mask), policy_tokenizer=policy, pad_sequence=True)
        assert decodes == []  # rm_llama shares the policy tokenizer: its ids, no decode
        both = scoring.raw_scores(objs, policy_ids=(ids, mask), policy_tokenizer=policy, pad_sequence=True)
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
    assert scoring.policy_texts(policy, ids, mask) == TEXTS


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
    got = scoring.score_texts(objs, PROMPTS, RESPONSES)
    np.testing.assert_allclose(got[:, 0], [lg[1].item() for lg in logits], atol=1e-5)
    np.testing.assert_allclose(got[:, 1], [lg.softmax(-1)[0].item() for lg in logits], atol=1e-6)


# --- attention: each objective's own ------------------------------------------------------------


def test_each_objective_loads_with_the_attention_its_model_supports(tiny):
    specs = [
        {"name": "deberta", "path": str(tiny["deberta"]), "label": 1},
        {"name": "gpt2", "path": str(tiny["classifier"]), "label": 1},
        {"name": "rm", "path": str(tiny["rm_llama"])},
        {"name": "chosen", "path": str(tiny["classifier"]), "label": 1, "attn_implementation": "eager"},
    ]
    objs = objectives.load_objectives(specs)
    # DeBERTa-v2 supports neither flash attention nor sdpa; GPT-2 and LLaMA support sdpa (no GPU here)
    assert [o.model.config._attn_implementation for o in objs] == ["eager", "sdpa", "sdpa", "eager"]
    objs[0].model.float()
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["deberta"]), dtype=torch.bfloat16)
    model = model.float().eval()
    tok = AutoTokenizer.from_pretrained(str(tiny["deberta"]))
    with torch.no_grad():
        want = [model(**tok(t, return_tensors="pt")).logits[0, 1].item() for t in TEXTS]
    np.testing.assert_allclose(scoring.score_texts(objs[:1], PROMPTS, RESPONSES)[:, 0], want, atol=1e-5)


def test_an_openrlhf_rm_where_openrlhf_models_cannot_import_is_one_line(tiny, monkeypatch):
    """OpenRLHF's loader (integration/models.py) not importable: one line that names the objective and
    the way out, not a traceback from inside OpenRLHF."""
    monkeypatch.setitem(sys.modules, "openrlhf.models", None)  # `import` raises ImportError for a None entry
    with pytest.raises(BoneSoupError, match="objective rm: OpenRLHF's reward model loader cannot import here") as e:
        objectives.load_objectives([{"name": "rm", "path": str(tiny["rm_llama"])}])
    assert "HF *ForSequenceClassification" in one_line(e)


def test_a_launch_wide_attention_is_refused_and_the_spec_key_checked(tiny):
    with pytest.raises(BoneSoupError, match="attention is chosen per objective") as e:
        objectives.load_objectives(str(tiny["rm_llama"]), model_kwargs={"attn_implementation": "flash_attention_2"})
    one_line(e)
    with pytest.raises(BoneSoupError, match="must be one of") as e:
        objectives.parse_objectives([{"path": "a", "attn_implementation": "fast"}])
    one_line(e)
    with pytest.raises(BoneSoupError, match="applies to checkpoints"):
        objectives.parse_objectives([{"url": "http://h:1/get_reward", "attn_implementation": "eager"}])


def test_flash_attention_where_usable_never_for_a_classifier_under_ring_attention(tiny, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)  # a GPU with flash-attn

    def choose(name, extra=None, **where):
        config = json.loads((tiny[name] / "config.json").read_text())
        return objectives.attention({"path": str(tiny[name]), **(extra or {})}, config, **where)

    assert choose("classifier", gpu=True) == choose("rm_llama", gpu=True) == "flash_attention_2"
    assert choose("deberta", gpu=True) == "eager"
    assert choose("classifier", gpu=False) == "sdpa"  # flash attention needs the GPU
    # OpenRLHF's ring set-up swaps transformers' flash attention for its packed causal kernel: an OpenRLHF RM
    # runs it as upstream's does, a classifier must not
    assert choose("rm_llama", gpu=True, ring_attention=True) == "flash_attention_2"
    assert choose("classifier", gpu=True, ring_attention=True) == "sdpa"
    assert choose("classifier", {"attn_implementation": "eager"}, gpu=True) == "eager"
    spec = objectives.parse_objectives(
        [{"path": str(tiny["classifier"]), "label": 1, "attn_implementation": "flash_attention_2"}]
    )
    with pytest.raises(BoneSoupError, match="ring_attn_size") as e:
        objectives.check_models(spec, ring_attention=True)
    one_line(e)
    objectives.check_models(spec)  # without ring attention: the user's choice


def test_an_openrlhf_rm_packs_samples_only_with_flash_attention(tiny, loaded):
    """`--ds.packing_samples` packs rows without an attention mask, right only with flash attention's
    variable-length kernels; with sdpa (here, no GPU) the RM scores padded rows."""
    policy, (reference, _) = loaded
    (packed,) = objectives.load_objectives(
        str(tiny["rm_llama"]), policy_tokenizer=policy, model_kwargs={"packing_samples": True}
    )
    packed.model.float()
    assert packed.model.packing_samples is False
    ids, mask = policy_batch(policy, TEXTS)
    got = scoring.raw_scores([packed], policy_ids=(ids, mask), policy_tokenizer=policy, pad_sequence=True)
    with torch.no_grad():
        want = [reference.model(ids[i : i + 1], mask[i : i + 1]).item() for i in range(len(TEXTS))]  # one at a time
    np.testing.assert_allclose(got[:, 0], want, atol=1e-5)


def test_classifier_with_several_labels_needs_a_choice(tiny):
    with pytest.raises(BoneSoupError, match="has 2 labels") as e:
        objectives.load_objectives(str(tiny["classifier"]))
    one_line(e)


MARKED_CONFIG = """
import os
from transformers import GPT2Config

open(os.environ["BONESOUP_TEST_MARKER"], "a").write("ran\\n")  # the checkpoint's own code was executed


class MarkedConfig(GPT2Config):
    model_type = "gpt2"
"""
MARKED_MODEL = """
from transformers import GPT2ForSequenceClassification

from .configuration_marked import MarkedConfig


class MarkedForSequenceClassification(GPT2ForSequenceClassification):
    config_class = MarkedConfig
"""


def test_remote_code_runs_only_when_the_objective_opts_in(tiny, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "custom_classifier"
    shutil.copytree(tiny["classifier"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_marked.MarkedConfig",
        "AutoModelForSequenceClassification": "modeling_marked.MarkedForSequenceClassification",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_marked.py").write_text(MARKED_CONFIG)
    (folder / "modeling_marked.py").write_text(MARKED_MODEL)
    marker = tmp_path / "marker"
    monkeypatch.setenv("BONESOUP_TEST_MARKER", str(marker))
    with pytest.raises(BoneSoupError, match="trust_remote_code: true") as e:
        objectives.load_objectives([{"path": str(folder), "label": 1}])
    one_line(e)
    assert not marker.exists()  # refused before anything of the checkpoint's code ran
    objs = objectives.load_objectives([{"path": str(folder), "label": 1, "trust_remote_code": True}])
    assert marker.read_text().startswith("ran") and objs[0].head == "classifier"


def test_a_causal_lm_is_not_taken_for_a_reward_model(tiny):
    with pytest.raises(BoneSoupError, match="no value head `score.weight`") as e:
        objectives.load_objectives(str(tiny["policy"]))
    one_line(e)


@pytest.mark.parametrize("path", ["./no_such_rm", "/no/such/rm", "~/no_such_rm"])
def test_a_local_looking_typo_is_never_looked_up_on_a_hub(path):
    with pytest.raises(BoneSoupError, match="does not exist") as e:
        objectives.load_objectives(path)
    one_line(e)


def test_a_typo_under_an_existing_folder_is_a_local_typo(tmp_path, monkeypatch):
    (tmp_path / "ckpts").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BoneSoupError, match="ckpts/rm_typo does not exist"):
        objectives.load_objectives("ckpts/rm_typo")


# --- endpoints: a bounded failure -------------------------------------------------------------------


def silent_server():
    """A socket that accepts connections (the kernel's backlog) but never answers."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server, f"http://127.0.0.1:{server.getsockname()[1]}/get_reward"


def closed_port_url():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/get_reward"  # nothing listens there once the socket is closed


@pytest.mark.parametrize("where", ["closed port", "never answers"])
def test_a_dead_endpoint_fails_within_its_deadline(where):
    import time

    server, url = silent_server() if where == "never answers" else (None, closed_port_url())
    try:
        objs = objectives.load_objectives([{"name": "dead", "url": url, "retries": 10, "deadline": 2}])
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="dead: .* gave no reward within 2 s") as e:
            scoring.score_texts(objs, PROMPTS[:1], RESPONSES[:1])
        elapsed = time.monotonic() - start
    finally:
        if server is not None:
            server.close()
    assert "\n" not in str(e.value)
    # Without the deadline: 11 attempts of up to 60 s each, plus backoff, for the silent server. (Not tighter
    # than 8 s: the other test process, a PPO launch maybe, can hold both cores for seconds.)
    assert elapsed < 8, elapsed
    if where == "never answers":
        assert elapsed > 1.5  # it really waited for the endpoint, up to the deadline


def test_default_deadline_is_three_minutes_and_retries_are_capped():
    assert scoring.DEFAULT_DEADLINE <= 180
    spec = objectives.parse_objectives([{"url": "http://h:1/get_reward"}])[0]
    assert "deadline" not in spec  # the default applies
    with pytest.raises(BoneSoupError, match="retries must be at most 10"):
        objectives.parse_objectives([{"url": "http://h:1/get_reward", "retries": 11}])
    with pytest.raises(BoneSoupError, match="deadline must be a number of seconds > 0"):
        objectives.parse_objectives([{"url": "http://h:1/get_reward", "deadline": 0}])


# --- functions, normalisation --------------------------------------------------------------------


def test_function_objective_gets_queries_prompts_labels(tmp_path):
    (tmp_path / "rules.py").write_text(RULES)
    objs = objectives.load_objectives(str(tmp_path / "rules.py"))
    got = scoring.score_texts(objs, PROMPTS, RESPONSES, labels=["bonus", None, "x"])
    np.testing.assert_allclose(got[:, 0], [len(TEXTS[0]) + 100, len(TEXTS[1]), len(TEXTS[2])])


def test_function_objectives_run_in_the_callers_thread(tmp_path):
    # A reward_func that loads a model lazily must not race another: transformers' from_pretrained
    # patches torch's init functions process-wide while loading (two racing loads once left them
    # patched for the rest of the process). Only HTTP endpoints run in threads.
    code = "import threading\ndef reward_func(q, p, l):\n    return [float(threading.get_ident())] * len(q)\n"
    (tmp_path / "a.py").write_text(code)
    (tmp_path / "b.py").write_text(code)
    objs = objectives.load_objectives(f"{tmp_path / 'a.py'},{tmp_path / 'b.py'}")
    got = scoring.score_texts(objs, PROMPTS, RESPONSES)
    assert (got == float(threading.get_ident())).all()


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
