"""`openrlhf-bonesoup serve`: the real command on a free 127.0.0.1 port, talked to with the official
`openai` client, for a tiny full-weight soup (from a soup folder, SFT extrapolation) and a tiny LoRA soup.

Expected outputs come from the checkpoints the real `openrlhf-bonesoup merge` writes for the same
preferences, loaded by transformers (full weights) or PEFT (the rank-concatenated adapter) and
generated greedily one prompt at a time. The in-place weights of the full-weight backend are compared
with merged bf16 checkpoints tensor by tensor, bit for bit. lambda is checked against a float64 solve.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import tiny_models
import torch
from openai import OpenAI
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from openrlhf_bonesoup import cli, serve, soup
from openrlhf_bonesoup.coefficients import backbone_matrix
from openrlhf_bonesoup.merge import sweep_outputs

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
PREFERENCES = [[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]]
PROMPTS = ["Human: How do I bake bread? Assistant:", "Summarize: The quick brown fox"]
CHAT = [{"role": "user", "content": "Tell me a joke."}]
MAX_TOKENS = 10
B = backbone_matrix(0.7, 2)  # what --beta 0.7 builds; the soup folder records the same matrix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def soups(tmp_path_factory) -> dict:
    """A soup folder (2 LLaMA backbones + SFT), 2 LoRA adapters on a base model, and what `merge` writes."""
    root = tmp_path_factory.mktemp("serve")
    tok = tiny_models.make_tokenizer(root / "tok", "llama")
    tok.chat_template = CHAT_TEMPLATE  # saved with every model below
    for name, seed in (("sft", 10), ("b0", 11), ("b1", 12), ("base", 20)):
        tiny_models.make_llama_lm(root / name, tok, seed=seed)
    soup.init_soup(
        root / "soup", objectives=[{"name": "helpful"}, {"name": "harmless"}], beta=0.7, matrix=B, sft=str(root / "sft")
    )
    for j in range(2):
        soup.register_backbone(root / "soup", j, status="trained", checkpoint=root / f"b{j}")
    tiny_models.make_lora_adapter(root / "a0", root / "base", r=2, lora_alpha=4, seed=21)
    tiny_models.make_lora_adapter(root / "a1", root / "base", r=4, lora_alpha=16, use_rslora=True, seed=22)
    prefs = ";".join(",".join(map(str, mu)) for mu in PREFERENCES)
    merge = ["merge", "--preferences", prefs, "--alpha", "0.2"]
    assert cli.main([*merge, "--soup_dir", str(root / "soup"), "--output", str(root / "merged")]) == 0
    adapters = f"{root / 'a0'},{root / 'a1'}"
    assert cli.main([*merge, "--backbones", adapters, "--beta", "0.7", "--output", str(root / "merged_lora")]) == 0
    return {"root": root, "tok": tok, "adapters": adapters}


def greedy(model, tok, ids: list[int]) -> str:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=MAX_TOKENS,
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def expected(soups) -> dict:
    """(kind, preference, prompt or 'chat') -> greedy text of the checkpoint `merge` wrote."""
    root, tok = soups["root"], soups["tok"]
    chat_ids = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    out = {}
    for kind, folder in (("full", "merged"), ("lora", "merged_lora")):
        for mu, path in zip(PREFERENCES, sweep_outputs(root / folder, PREFERENCES), strict=True):
            if kind == "full":
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            else:
                model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "base")), str(path))
            with torch.no_grad():
                for prompt in PROMPTS:
                    out[kind, tuple(mu), prompt] = greedy(model.eval(), tok, tok(prompt).input_ids)
                out[kind, tuple(mu), "chat"] = greedy(model, tok, chat_ids.input_ids)
    return out


@pytest.fixture(scope="module")
def servers(soups):
    """Both servers started together as the user starts them; the full-weight one without --host."""
    root = soups["root"]
    ports = {"full": free_port(), "lora": free_port()}
    args = {
        "full": ["--soup_dir", str(root / "soup"), "--alpha", "0.2", "--max_batch_size", "4"],
        "lora": ["--backbones", soups["adapters"], "--beta", "0.7", "--alpha", "0.2", "--host", "127.0.0.1"],
    }
    # one torch thread each: two servers and pytest share 2 cores, where OpenMP threads wait on each other
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        kind: subprocess.Popen(
            [sys.executable, "-m", "openrlhf_bonesoup.cli", "serve", *args[kind], "--port", str(ports[kind])]
            + ["--device", "cpu"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for kind in ports
    }
    try:
        deadline = time.time() + 180
        for kind, proc in procs.items():
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"serve ({kind}) exited: {proc.stderr.read()[-2000:]}")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{ports[kind]}/health", timeout=5)
                    break
                except OSError:
                    if time.time() > deadline:
                        pytest.fail(f"serve ({kind}) did not answer /health in time")
                    time.sleep(0.2)
        yield {
            kind: {"port": port, "url": f"http://127.0.0.1:{port}", "proc": procs[kind]} for kind, port in ports.items()
        }
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)


def client(server: dict) -> OpenAI:
    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def check_info(info: dict, mu: list[float], kind: str) -> None:
    lam = np.linalg.solve([[0.7, 0.3], [0.3, 0.7]], mu)  # float64, by hand: B^T lambda = mu
    assert info["preference"] == mu and info["alpha"] == 0.2
    np.testing.assert_allclose(info["lambda"], lam, atol=1e-12)
    np.testing.assert_allclose(info["weights"], 1.2 * lam, atol=1e-12)
    assert info["sft_weight"] == (pytest.approx(-0.2) if kind == "full" else None)


def test_switch_equals_the_merged_checkpoint_bit_for_bit(tmp_path):
    """bf16 inputs served in fp32: every parameter equals the bf16 checkpoint `merge` writes, upcast."""
    tok = tiny_models.make_tokenizer(tmp_path / "tok", "llama")
    paths = [tmp_path / name for name in ("b0", "b1", "sft")]
    for seed, path in enumerate(paths):
        tiny_models.make_llama_lm(path, tok, seed=30 + seed, dtype=torch.bfloat16)
    prefs = [[0.3, 0.7], [1.0, 0.0], [0.55, 0.45]]
    text = ";".join(",".join(map(str, mu)) for mu in prefs)
    backbones = f"{paths[0]},{paths[1]}"
    merge = ["merge", "--backbones", backbones, "--sft", str(paths[2]), "--alpha", "0.3", "--preferences", text]
    assert cli.main([*merge, "--output", str(tmp_path / "merged")]) == 0
    backend = serve.TransformersBackend(serve.Soup(paths[:2], B, sft=paths[2], alpha=0.3), device="cpu")
    inputs = [load_file(str(p / "model.safetensors")) for p in paths]
    for mu, out in zip(prefs, sweep_outputs(tmp_path / "merged", prefs), strict=True):
        backend.switch(tuple(mu))
        merged = load_file(str(out / "model.safetensors"))
        params = backend.model.state_dict()
        assert merged.keys() == inputs[0].keys()
        for name, want in merged.items():
            assert want.dtype == torch.bfloat16 and params[name].dtype == torch.float32
            assert torch.equal(params[name], want.float()), name
        # the switch really moved the weights: far from each input
        assert all(not torch.equal(params["lm_head.weight"], x["lm_head.weight"].float()) for x in inputs)
    switches = backend.switches
    backend.switch(tuple(prefs[-1]))  # already in place: nothing recomputed
    assert backend.switches == switches


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_completions_equal_the_merged_checkpoints(servers, expected, kind):
    c = client(servers[kind])
    texts = {}
    for k, mu in enumerate(PREFERENCES):
        for prompt in PROMPTS:
            # the preference in the body (extra_body) or in the model name
            how = {"extra_body": {"preference": mu}} if k % 2 else {"model": "bonesoup:" + ",".join(map(str, mu))}
            r = c.completions.create(
                **{"model": "bonesoup", **how}, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            assert r.choices[0].text == expected[kind, tuple(mu), prompt]
            assert r.model == "bonesoup:" + ",".join(map(repr, mu))
            check_info(r.bonesoup, mu, kind)
            assert r.usage.completion_tokens <= MAX_TOKENS
            texts[tuple(mu), prompt] = r.choices[0].text
    assert len(set(texts.values())) > len(PROMPTS)  # the preference changes the output
    # no preference: the default (uniform)
    r = c.completions.create(model="bonesoup", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.bonesoup["preference"] == [0.5, 0.5]
    models = c.models.list().data
    assert [m.id for m in models] == ["bonesoup"]
    assert models[0].bonesoup["lora"] == (kind == "lora") and models[0].bonesoup["n"] == 2
    if kind == "full":
        assert models[0].bonesoup["objectives"] == ["helpful", "harmless"]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_chat_and_streaming(servers, expected, kind):
    c, mu = client(servers[kind]), [0.3, 0.7]
    r = c.chat.completions.create(
        model="bonesoup", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"preference": mu}
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected[kind, tuple(mu), "chat"]
    check_info(r.bonesoup, mu, kind)
    chunks = list(
        c.chat.completions.create(
            model="bonesoup:0.3,0.7", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert len(chunks) > 3 and all(ch.bonesoup["preference"] == mu for ch in chunks)
    chunks = list(
        c.completions.create(
            model="bonesoup",
            prompt=PROMPTS[1],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"preference": mu},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == expected[kind, tuple(mu), PROMPTS[1]]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and len(chunks) > 3


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_concurrent_clients_each_get_their_own_preference(servers, expected, kind):
    a, b = client(servers[kind]), client(servers[kind])

    def ask(c: OpenAI, mu: list[float], prompt: str) -> str:
        r = c.completions.create(
            model="bonesoup", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"preference": mu}
        )
        assert r.bonesoup["preference"] == mu
        return r.choices[0].text

    jobs = [(a, PREFERENCES[0], PROMPTS[k % 2]) for k in range(4)] + [
        (b, PREFERENCES[2], PROMPTS[k % 2]) for k in range(4)
    ]
    jobs = jobs[::2] + jobs[1::2]  # interleaved, 8 in flight
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(*job), jobs))
    assert answers == [expected[kind, tuple(mu), prompt] for _, mu, prompt in jobs]


def test_bad_input_gets_400_and_the_server_keeps_serving(servers):
    c, url = client(servers["full"]), servers["full"]["url"]
    bad = [
        {"extra_body": {"preference": [0.2, 0.3, 0.5]}},  # wrong length
        {"extra_body": {"preference": [0.5, 0.6]}},  # not on the simplex
        {"extra_body": {"preference": [-0.5, 1.5]}},
        {"extra_body": {"preference": ["0.3", "0.7"]}},  # not numbers
        {"extra_body": {"preference": "0.3,0.7"}},
        {"model": "gpt-4"},  # unknown model
        {"model": "bonesoup:0.3,x"},
        {"model": "bonesoup:0.5"},
        {"model": "bonesoup:0.3,0.7", "extra_body": {"preference": [0.3, 0.7]}},  # given twice
        {"prompt": "bread " * 300},  # longer than the 256-token context
        {"max_tokens": 250},
        {"temperature": -1},  # bad sampling parameters
        {"temperature": 2.5},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"n": 2},
        {"stop": ["\n"]},  # not implemented: refused, not ignored
        {"logprobs": 2},
    ]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**{"model": "bonesoup", "prompt": PROMPTS[0], "max_tokens": 4, **kw})
        assert e.value.status_code == 400, kw
        assert e.value.body["type"] == "invalid_request_error"
        assert e.value.body["message"] and "\n" not in e.value.body["message"], kw
    for kw in ({"messages": []}, {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": 3}]}):
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="bonesoup", max_tokens=4, **kw)
    request = urllib.request.Request(
        url + "/v1/completions", data=b'{"prompt": "hi", ', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    with urllib.request.urlopen(url + "/health", timeout=30) as health:
        assert json.loads(health.read()) == {"status": "ok"}
    assert c.completions.create(model="bonesoup", prompt=PROMPTS[0], max_tokens=2).choices[0].finish_reason


def test_binds_127_0_0_1_by_default(servers):
    port = servers["full"]["port"]
    with open("/proc/net/tcp") as f:
        listening = [line.split()[1] for line in f.read().splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening  # LISTEN on 127.0.0.1 only
    assert f"00000000:{port:04X}" not in listening


def test_jobs_are_grouped_by_preference():
    def job(mu, temperature=0.0):
        return serve.Job([1], mu, 4, temperature, 1.0, emit=lambda event: None)

    a, b, c = (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)
    jobs = [job(a), job(b), job(a), job(c), job(b), job(a, 0.7)]
    batches = serve.group_jobs(jobs, current=b, max_batch_size=8, by_preference=True)
    assert [[j.mu for j in batch] for batch in batches] == [[b, b], [c], [a, a], [a]]  # in place first: 3 switches
    assert [len(x) for x in serve.group_jobs(jobs, current=b, max_batch_size=1, by_preference=True)] == [1] * 6
    # LoRA: one batch mixes preferences (sampling settings still split batches)
    mixed = serve.group_jobs(jobs, current=None, max_batch_size=8, by_preference=False)
    assert [[j.mu for j in batch] for batch in mixed] == [[a, b, a, c, b], [a]]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backbones", "nowhere0,nowhere1"], "does not exist"),
        (["--soup_dir", "nowhere", "--beta", "0.7"], "takes B from its manifest"),
        (["--backbones", "{b0},{b1}", "--alpha", "0.2"], "give its checkpoint (--sft)"),
        (["--backbones", "{b0},{b1}", "--default_preference", "0.2,0.2"], "must sum to 1"),
        (["--backbones", "{b0},{b1}", "--dtype", "int8"], "argument --dtype: invalid choice"),
        (["--backbones", "{b0},{b1}", "--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
    ],
)
def test_cli_errors_are_one_line(soups, capsys, argv, message):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        names = {"b0": soups["root"] / "b0", "b1": soups["root"] / "b1", "busy": busy.getsockname()[1]}
        argv = [a.format(**names) for a in argv]
        assert cli.main(["serve", "--port", "0", *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message.format(**names) in err and err.count("\n") == 1
