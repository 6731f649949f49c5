"""`openrlhf-bonesoup serve` on vLLM (its CPU build here, its CUDA build on a GPU machine): the real command on
a free 127.0.0.1 port, talked to with the official `openai` client, for a tiny full-weight soup (a soup folder,
SFT extrapolation alpha 0.2) and a tiny LoRA soup (two adapters with different r, lora_alpha and rslora).

A served preference must equal vLLM's own generation from what `openrlhf-bonesoup merge` writes for it,
computed here by an offline vllm.LLM: the merged checkpoints (the first loaded when that engine starts, the
others through vLLM's reload from disk) and the merged adapters (LoRARequests on the base model). float32
everywhere, so that a greedy token does not depend on how vLLM batched the request. One server per soup for
the whole module, started while the expected answers are computed: a vLLM engine start costs 10-80 s here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import tiny_models
import torch
from conftest import launch_serve, stop_serve, wait_serve
from openai import OpenAI
from safetensors.torch import load_file

from openrlhf_bonesoup import cli, middleware, serve, soup
from openrlhf_bonesoup.coefficients import backbone_matrix
from openrlhf_bonesoup.demo.tiny import CORPUS
from openrlhf_bonesoup.merge import sweep_outputs

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
PREFERENCES = [[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]]
# the third prompt fills 3 blocks of vLLM's prefix cache (128 tokens on CPU, 16 on a GPU): kept across a weight
# switch, they would hold the previous preference's keys and values
PROMPTS = ["Human: How do I bake bread? Assistant:", "Summarize: The quick brown fox", " ".join(CORPUS)]
CHAT = [{"role": "user", "content": "Tell me a joke."}]
MAX_TOKENS = 12
CONTEXT = 2048  # room for a request that runs for many seconds (the disconnect test)
B = backbone_matrix(0.7, 2)  # what --beta 0.7 builds; the soup folder records the same matrix
# vLLM's own flags, the same on CPU and GPU: no compile warm-up, a small KV cache
VLLM_FLAGS = ["--dtype", "float32", "--", "--enforce-eager", "--kv-cache-memory-bytes", "256M"]
ENGINE = {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 256 << 20}
SAMPLED = PREFERENCES[-1]  # stop / logprobs / seed / n: the preference the expected engine ends on


def make_soups(root: Path) -> dict:
    """A soup folder (2 LLaMA backbones + SFT), 2 LoRA adapters on a base model, and what `merge` writes."""
    tok = tiny_models.make_tokenizer(root / "tok", "llama")
    tok.chat_template = CHAT_TEMPLATE  # saved with every model below
    for name, seed in (("sft", 10), ("b0", 11), ("b1", 12), ("base", 20)):
        tiny_models.make_llama_lm(root / name, tok, seed=seed, hidden_size=256)  # head size 64, as vLLM takes
        config = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
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
    return {"root": root, "adapters": adapters}


def vllm_answers(root: Path, kind: str) -> dict:
    """vLLM's own answers from merge's outputs: (preference, prompt or "chat") -> greedy text, and the
    sampling-option cases at SAMPLED."""
    import vllm
    from vllm.lora.request import LoRARequest

    merged = sweep_outputs(root / ("merged" if kind == "full" else "merged_lora"), PREFERENCES)
    if kind == "full":
        llm = vllm.LLM(model=str(merged[0]), **ENGINE)
    else:
        llm = vllm.LLM(model=str(root / "base"), enable_lora=True, max_lora_rank=8, **ENGINE)
    greedy = vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    out = {}
    try:
        for k, (mu, path) in enumerate(zip(PREFERENCES, merged, strict=True)):
            lora = LoRARequest(f"merged{k}", k + 1, str(path)) if kind == "lora" else None
            if kind == "full" and k:
                llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
                llm.reset_prefix_cache()
            for prompt in PROMPTS:
                out[tuple(mu), prompt] = llm.generate(prompt, greedy, lora_request=lora, use_tqdm=False)[0].outputs[0]
            out[tuple(mu), "chat"] = llm.chat(CHAT, greedy, lora_request=lora, use_tqdm=False)[0].outputs[0]
        # stop / logprobs / seed / n: lora and weights are SAMPLED's (the last of PREFERENCES)
        text = out[tuple(SAMPLED), PROMPTS[0]].text
        stop = text[len(text) // 2]  # a character the greedy answer contains
        cases = {
            "stop": vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop]),
            "logprobs": vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2),
            "seed": vllm.SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=1234),
            "n": vllm.SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=99, n=2),
        }
        for case, params in cases.items():
            out[case] = llm.generate(PROMPTS[0], params, lora_request=lora, use_tqdm=False)[0].outputs
        out["stop_string"] = stop
    finally:
        llm.llm_engine.engine_core.shutdown()  # its process would otherwise wait for the garbage collector
        del llm
        gc.collect()
    return out


@pytest.fixture(scope="module")
def soups(tmp_path_factory) -> dict:
    return make_soups(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module", params=["full", "lora"])
def server(request, soups):
    """One server, started as a user starts it (the full-weight one without --host), and vLLM's answers,
    computed while it starts. pytest runs every test of one soup before starting the other's server."""
    kind, root = request.param, soups["root"]
    args = {
        "full": ["--soup_dir", str(root / "soup"), "--alpha", "0.2", *VLLM_FLAGS],
        "lora": ["--backbones", soups["adapters"], "--beta", "0.7", "--alpha", "0.2", "--host", "127.0.0.1"]
        + VLLM_FLAGS,
    }[kind]
    proc, url = launch_serve(args)
    try:
        expected = vllm_answers(root, kind)
        wait_serve(proc, url)
        yield {"kind": kind, "proc": proc, "url": url, "expected": expected}
    finally:
        stop_serve(proc)


def client(server: dict, **kw) -> OpenAI:
    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, **{"timeout": 120, **kw})


def name(mu: list[float]) -> str:
    return "bonesoup:" + ",".join(map(repr, mu))


def check_info(info: dict, mu: list[float], kind: str) -> None:
    lam = np.linalg.solve([[0.7, 0.3], [0.3, 0.7]], mu)  # float64, by hand: B^T lambda = mu
    assert info["preference"] == mu and info["alpha"] == 0.2
    np.testing.assert_allclose(info["lambda"], lam, atol=1e-12)
    np.testing.assert_allclose(info["weights"], 1.2 * lam, atol=1e-12)
    assert info["sft_weight"] == (-0.2 if kind == "full" else None)


def test_greedy_completions_equal_vllm_on_what_merge_writes(server):
    kind = server["kind"]
    c, expected = client(server), server["expected"]
    texts = set()
    for k, mu in enumerate(PREFERENCES):
        for prompt in PROMPTS:
            # the preference in the body (extra_body) or in the model name
            how = {"extra_body": {"preference": mu}} if k % 2 else {"model": name(mu)}
            how["extra_body"] = {**how.get("extra_body", {}), "return_token_ids": True}  # vLLM's own field
            r = c.completions.create(
                **{"model": "bonesoup", **how}, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            assert r.choices[0].token_ids == list(expected[tuple(mu), prompt].token_ids)  # token for token
            assert r.choices[0].text == expected[tuple(mu), prompt].text
            assert r.model == name(mu)
            check_info(r.bonesoup, mu, kind)
            texts.add(r.choices[0].text)
    assert len(texts) > len(PROMPTS)  # the preference changes the answer
    r = c.completions.create(model="bonesoup", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.bonesoup["preference"] == [0.5, 0.5]  # no preference: the default (uniform)
    models = c.models.list().data
    assert models[0].id == "bonesoup" and models[0].bonesoup["lora"] == (kind == "lora")
    assert models[0].bonesoup["n"] == 2 and models[0].bonesoup["default_preference"] == [0.5, 0.5]
    if kind == "full":
        assert models[0].bonesoup["objectives"] == ["helpful", "harmless"]


def test_chat_and_streaming_give_vllms_answer(server):
    kind = server["kind"]
    c, expected, mu = client(server), server["expected"], PREFERENCES[1]
    r = c.chat.completions.create(
        model="bonesoup", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"preference": mu}
    )
    assert r.choices[0].message.content == expected[tuple(mu), "chat"].text
    check_info(r.bonesoup, mu, kind)
    chunks = list(
        c.chat.completions.create(model=name(mu), messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert all(ch.bonesoup["preference"] == mu and ch.model == name(mu) for ch in chunks)
    chunks = c.completions.create(model=name(mu), prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in chunks) == expected[tuple(mu), PROMPTS[1]].text


def test_streaming_is_incremental(server):
    c, mu = client(server), PREFERENCES[0]
    request = {"model": name(mu), "prompt": PROMPTS[0], "max_tokens": 96, "temperature": 0}
    whole = c.completions.create(**request, extra_body={"ignore_eos": True}).choices[0].text
    start, arrivals, text = time.monotonic(), [], ""
    for chunk in c.completions.create(**request, stream=True, extra_body={"ignore_eos": True}):
        arrivals.append(time.monotonic() - start)
        text += chunk.choices[0].text
    assert text == whole
    assert len(arrivals) > 10 and arrivals[0] < 0.5 * arrivals[-1], arrivals  # not one burst at the end


def test_concurrent_clients_each_get_their_own_preference(server):
    a, b, expected = client(server), client(server), server["expected"]

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
    assert answers == [expected[tuple(mu), prompt].text for _, mu, prompt in jobs]


def test_stop_logprobs_seed_and_n_work_as_in_vllm(server):
    c, expected = client(server), server["expected"]
    ask = {"model": name(SAMPLED), "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS}
    r = c.completions.create(**ask, temperature=0, stop=[expected["stop_string"]])
    assert r.choices[0].text == expected["stop"][0].text and r.choices[0].finish_reason == "stop"
    assert len(r.choices[0].text) < len(expected[tuple(SAMPLED), PROMPTS[0]].text)
    r = c.completions.create(**ask, temperature=0, logprobs=2)
    want = expected["logprobs"][0]
    assert r.choices[0].text == want.text and len(r.choices[0].logprobs.top_logprobs[0]) == 2
    chosen = [step[token].logprob for step, token in zip(want.logprobs, want.token_ids, strict=True)]
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs, chosen, atol=1e-4)
    r = c.completions.create(**ask, temperature=1.0, seed=1234)
    assert r.choices[0].text == expected["seed"][0].text
    r = c.completions.create(**ask, temperature=1.0, seed=99, n=2)
    assert sorted(ch.text for ch in r.choices) == sorted(o.text for o in expected["n"])
    assert r.choices[0].text != r.choices[1].text


def running(url: str) -> float:
    """vLLM's gauge of the requests its engine is generating for."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)", text, re.M))


def test_a_client_that_leaves_frees_the_engine(server):
    c = client(server)
    short = {"model": name(PREFERENCES[2]), "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    c.completions.create(**short)  # this preference's weights or adapter in place
    start = time.monotonic()
    c.completions.create(**short)
    own = time.monotonic() - start
    with pytest.raises(openai.APITimeoutError):  # ~2000 tokens at another preference; the client leaves after 2 s
        client(server, timeout=2.0).completions.create(
            model=name(PREFERENCES[0]), prompt=PROMPTS[1], max_tokens=CONTEXT - 64, extra_body={"ignore_eos": True}
        )
    start = time.monotonic()
    r = c.completions.create(**short)
    assert time.monotonic() - start < own + 5.0  # the abandoned request would hold it for tens of seconds
    assert r.model == name(PREFERENCES[2])
    # aborted, not merely overtaken (LoRA: one batch holds both): nothing left generating, where ~2000 tokens
    # would still take tens of seconds
    deadline = time.monotonic() + 5
    while running(server["url"]):
        assert time.monotonic() < deadline, "the abandoned request is still generating"
        time.sleep(0.2)


def test_bad_input_gets_400_and_the_server_keeps_serving(server):
    url, c = server["url"], client(server)
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
        {"prompt": "bread " * 2100},  # longer than the context (vLLM's own check)
        {"temperature": -1},  # vLLM's own checks of the sampling parameters
        {"top_p": 1.5},
        {"max_tokens": 0},
    ]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**{"model": "bonesoup", "prompt": PROMPTS[0], "max_tokens": 4, **kw})
        assert e.value.status_code == 400, kw
        assert e.value.body["message"] and "\n" not in e.value.body["message"], kw
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="bonesoup:0.5,0.6", messages=CHAT, max_tokens=4)
    assert "must sum to 1" in e.value.body["message"]
    request = urllib.request.Request(
        url + "/v1/completions", data=b'{"prompt": "hi", ', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:  # not JSON: vLLM's own 400
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400
    for path in ("/v1/load_lora_adapter", "/collective_rpc", "/v1/responses"):  # routes that bypass the preference
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url + path, data=b"{}", method="POST"), timeout=30)
        assert e.value.code == 404
    with urllib.request.urlopen(url + "/health", timeout=30) as health:
        assert health.status == 200
    assert c.completions.create(model="bonesoup", prompt=PROMPTS[0], max_tokens=2).choices[0].finish_reason


def test_binds_127_0_0_1(server):  # the full-weight server is started without --host
    port = int(server["url"].rsplit(":", 1)[1])
    with open("/proc/net/tcp") as f:
        listening = [line.split()[1] for line in f.read().splitlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening  # LISTEN on 127.0.0.1 only
    assert f"00000000:{port:04X}" not in listening


# --- in process: the switch's arithmetic, the grouping; the command's one-line refusals ---------------------


def test_merged_tensors_equal_the_merged_checkpoint_bit_for_bit(tmp_path):
    """bf16 inputs: what the full-weight switch loads into vLLM is the checkpoint `merge` writes, bit for bit."""
    tok = tiny_models.make_tokenizer(tmp_path / "tok", "llama")
    paths = [tmp_path / name for name in ("b0", "b1", "sft")]
    for seed, path in enumerate(paths):
        tiny_models.make_llama_lm(path, tok, seed=30 + seed, dtype=torch.bfloat16)
    prefs = [[0.3, 0.7], [1.0, 0.0], [0.55, 0.45]]
    text = ";".join(",".join(map(str, mu)) for mu in prefs)
    merge = ["merge", "--backbones", f"{paths[0]},{paths[1]}", "--sft", str(paths[2]), "--alpha", "0.3"]
    assert cli.main([*merge, "--preferences", text, "--output", str(tmp_path / "merged")]) == 0
    soup_ = serve.Soup(paths[:2], B, sft=paths[2], alpha=0.3)
    inputs = [load_file(str(p / "model.safetensors")) for p in paths]
    for mu, out in zip(prefs, sweep_outputs(tmp_path / "merged", prefs), strict=True):
        served = dict(serve.merged_tensors(soup_.inputs, soup_.weights(soup_.preference(mu))))
        merged = load_file(str(out / "model.safetensors"))
        assert served.keys() == merged.keys() == inputs[0].keys()
        for key, want in merged.items():
            assert served[key].dtype == want.dtype == torch.bfloat16 and torch.equal(served[key], want), key
        assert all(not torch.equal(served["lm_head.weight"], x["lm_head.weight"]) for x in inputs)


def test_turns_run_one_preference_at_a_time_in_groups():
    """Requests at 3 preferences arriving interleaved: one switch per group, groups in order of arrival, never
    two preferences at once, and a request whose client left while waiting costs nothing."""
    log = []

    async def main():
        async def switch(mu):
            log.append(("switch", mu))
            await asyncio.sleep(0.01)

        turns = middleware.Turns(switch)
        active = set()

        async def request(mu, seconds):
            async def call():
                active.add(mu)
                assert active == {mu}  # the weights are mu's for as long as the request runs
                log.append(("run", mu))
                await asyncio.sleep(seconds)
                active.discard(mu)

            await turns.run(mu, call)

        a, b, c = (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)
        tasks = [asyncio.create_task(request(mu, 0.05)) for mu in (a, b, a, c, b, a)]
        await asyncio.sleep(0)
        left = asyncio.create_task(request((0.2, 0.8), 0.05))  # its client leaves while it waits
        await asyncio.sleep(0.001)
        left.cancel()
        await asyncio.gather(*tasks)
        assert left.cancelled() and turns.running == 0 and not turns.waiting
        await asyncio.wait_for(request(c, 0), 1)  # the preference in place: runs at once

    asyncio.run(main())
    switches = [mu for event, mu in log if event == "switch"]
    assert switches == [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]  # one per group, in order of arrival
    assert [mu for event, mu in log if event == "run"][:6] == [(1.0, 0.0)] * 3 + [(0.0, 1.0)] * 2 + [(0.5, 0.5)]


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "openrlhf-bonesoup"), "serve", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("openrlhf-bonesoup")]
    assert len(lines) == 1 and "Traceback" not in r.stderr and words in lines[0], r.stderr[-3000:]


def test_the_commands_mistakes_are_one_line(tmp_path):
    tok = tiny_models.make_tokenizer(tmp_path / "tok", "llama")
    for j in range(2):
        tiny_models.make_llama_lm(tmp_path / f"b{j}", tok, seed=j, hidden_size=256)
    backbones = f"{tmp_path / 'b0'},{tmp_path / 'b1'}"
    one_line(run_cli("--backbones", backbones, "--", "--no-such-flag"), "vLLM flags: unrecognized arguments")
    one_line(run_cli("--backbones", backbones, "--", "--model", "x"), "vLLM flag --model: serve sets it")
    one_line(run_cli("--backbones", backbones, "--default_preference", "0.5,0.6"), "must sum to 1")
    one_line(run_cli("--backbones", f"{backbones[:-1]}x"), "does not exist")
    tiny_models.make_hf_classifier(tmp_path / "rm", tok, hidden_size=256)  # a reward model is not a backbone
    one_line(run_cli("--backbones", f"{tmp_path / 'rm'},{tmp_path / 'rm'}"), "is a GPT2ForSequenceClassification")
    with __import__("socket").create_server(("127.0.0.1", 0)) as busy:
        one_line(run_cli("--backbones", backbones, "--port", busy.getsockname()[1]), "cannot listen on 127.0.0.1")
