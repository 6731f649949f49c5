"""evaluate end to end on CPU: tiny backbones, two tiny reward models, transformers' generate."""

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch
from rollouts import reference_rm
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from openrlhf_bonesoup import evaluate, generation, objectives, soup
from openrlhf_bonesoup.cli import main
from openrlhf_bonesoup.coefficients import (
    REFERENCE_ALPHAS,
    BoneSoupError,
    backbone_matrix,
)

PROMPTS = ["Human: How do I bake bread? Assistant:", "Human: Tell me a joke. Assistant:", "The weather today is"]


def _perturbed(src, dst, seed):
    """A 'trained backbone': the SFT policy with seeded noise on every weight."""
    shutil.copytree(src, dst)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in tensors.items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def soup_dir(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    specs = objectives.parse_objectives(f"{tiny['rm_llama']},{tiny['rm_gpt2']}")
    folder = root / "soup"
    soup.init_soup(folder, objectives=specs, beta=0.7, matrix=backbone_matrix(0.7, 2), sft=str(tiny["policy"]))
    for j in range(2):
        checkpoint = _perturbed(tiny["policy"], root / f"backbone{j}", seed=10 + j)
        soup.register_backbone(folder, j, status="trained", checkpoint=checkpoint)
    (root / "eval.jsonl").write_text("".join(json.dumps({"input": p}) + "\n" for p in PROMPTS))
    (root / "val.jsonl").write_text("".join(json.dumps({"input": p}) + "\n" for p in PROMPTS[:2]))
    return folder


def test_evaluate_end_to_end(soup_dir, tiny, tmp_path, capsys):
    root = soup_dir.parent
    morlhf = tmp_path / "morlhf.json"
    morlhf.write_text(json.dumps({"mean": [[-10.0, -10.0], [-9.0, -11.0]]}))
    out = tmp_path / "results"
    common = ["--soup_dir", str(soup_dir), "--prompts", str(root / "eval.jsonl"), "--output", str(out)]
    common += ["--eval.max_new_tokens", "6", "--eval.batch_size", "2", "--eval.backend", "transformers"]
    assert main(["evaluate", *common, "--grid", "3", "--compare", f"morlhf={morlhf}"]) == 0
    assert "hypervolume" in capsys.readouterr().out

    r = json.loads((out / "results.json").read_text())
    assert r["backend"] == "transformers"  # as asked (the vLLM branch: tests/test_launch.py)
    assert r["objectives"] == ["rm_llama", "rm_gpt2"] and r["beta"] == 0.7 and r["label"] == "bone_soup"
    assert r["preferences"] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    means, sems = np.array(r["mean"]), np.array(r["sem"], dtype=float)
    assert means.shape == (3, 2) and np.isfinite(sems).all() and r["samples"] == [3, 3, 3]
    fronts = np.concatenate([means, [[-10.0, -10.0], [-9.0, -11.0]]])
    assert r["reference_point"] == fronts.min(axis=0).tolist()
    assert set(r["hypervolume"]) == {"bone_soup", "morlhf"}
    assert set(r["controllability"]) == {"rm_llama", "rm_gpt2"}

    # every merged model is lambda = B^-1 mu of the backbones: for B(0.7), lambda_i = (mu_i - 0.3) / 0.4
    backbones = [load_file(p + "/model.safetensors") for p in soup.trained_backbones(soup.read_soup(soup_dir))]
    name = "model.embed_tokens.weight"
    lambdas = {"mu_0.00_1.00": (-0.75, 1.75), "mu_0.50_0.50": (0.5, 0.5), "mu_1.00_0.00": (1.75, -0.75)}
    for folder, lam in lambdas.items():
        merged = load_file(str(out / "models" / folder / "model.safetensors"))[name]
        torch.testing.assert_close(merged, lam[0] * backbones[0][name] + lam[1] * backbones[1][name])

    # the recorded scores are each RM's score of prompt + recorded response (one at a time, fp32, as
    # OpenRLHF's RewardDataset formats it), and the means in results.json/results.csv are their averages
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 and rows[1]["mu_rm_llama"] == "0.5"
    for k, folder in enumerate(["mu_0.00_1.00", "mu_0.50_0.50", "mu_1.00_0.00"]):
        lines = [json.loads(x) for x in (out / "generations" / f"{folder}.jsonl").read_text().splitlines()]
        assert [x["prompt"] for x in lines] == PROMPTS
        texts = [p + x["response"] for p, x in zip(PROMPTS, lines, strict=True)]
        again = [[reference_rm(tiny[n], t) for n in ("rm_llama", "rm_gpt2")] for t in texts]
        recorded = np.array([[x["rm_llama"], x["rm_gpt2"]] for x in lines])
        np.testing.assert_allclose(recorded, again, atol=2e-2)  # the objectives load in bf16, batched
        np.testing.assert_allclose(means[k], recorded.mean(axis=0), rtol=1e-9)
        assert float(rows[k]["rm_gpt2_mean"]) == pytest.approx(means[k, 1])
    # seeded sampling: the same merged model gives the same responses again
    hf = {"max_new_tokens": 6, "batch_size": 2, "backend": "transformers"}
    with generation.Generator(hf) as generator:
        assert generator.generate(out / "models" / "mu_0.50_0.50", PROMPTS) == [
            json.loads(x)["response"] for x in (out / "generations" / "mu_0.50_0.50.jsonl").read_text().splitlines()
        ]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run into the same folder refuses to overwrite merged models unless asked
    assert main(["evaluate", *common, "--preferences", "0.5,0.5"]) == 2
    assert "holds an earlier evaluation (results.json, models/mu_0.50_0.50)" in capsys.readouterr().err


def test_alpha_auto_is_the_reference_search(soup_dir, tmp_path):
    root = soup_dir.parent
    r = evaluate.evaluate(
        soup_dir,
        [[0.3, 0.7]],
        root / "eval.jsonl",
        tmp_path,
        alpha="auto",
        alpha_prompts=root / "val.jsonl",
        sampling={"max_new_tokens": 4, "batch_size": 2, "backend": "transformers"},
    )
    search = r["alpha_search"]
    assert search["validation_prompts"] == 2 and search["candidates"] == list(REFERENCE_ALPHAS)
    table = np.array(search["means"])  # objective i's corner x alpha candidate x objective
    assert table.shape == (2, len(REFERENCE_ALPHAS), 2)
    assert all(a in REFERENCE_ALPHAS for a in r["alpha"])  # which one: the test below, on known optima
    assert not (tmp_path / "alpha_search").exists()  # candidate models are removed

    # the merged model is the reference code's: x_j = sum_i mu_i k_i sol_i[j], SFT weight sum_i mu_i (1 - k_i),
    # sol_i = solve([[w11, w21], [w12, w22]], e_i), k_i = 1 + alpha_i
    (w11, w12), (w21, w22) = backbone_matrix(0.7, 2)
    sols = [np.linalg.solve([[w11, w21], [w12, w22]], e) for e in ([1, 0], [0, 1])]
    ks = [1 + a for a in r["alpha"]]
    mu = [0.3, 0.7]
    expected = [sum(mu[i] * ks[i] * sols[i][j] for i in range(2)) for j in range(2)]
    expected.append(sum(mu[i] * (1 - ks[i]) for i in range(2)))
    provenance = json.loads((tmp_path / "models" / "mu_0.30_0.70" / "bonesoup_merge.json").read_text())
    assert provenance["weights"] == pytest.approx(expected)
    assert provenance["inputs"][2]["path"] == soup.read_soup(soup_dir)["sft"]


QUADRATIC = """
def reward_func(queries, prompts, labels):
    # -(x_{i} - {target})^2 of the weights x the model answered with (after the prompt's ':')
    return [-(float(q.split(":")[-1].split(",")[{i}]) - {target}) ** 2 for q in queries]
"""


def test_the_alpha_search_picks_each_objectives_best_candidate(tmp_path, monkeypatch):
    """Models that answer with their weights, and objectives with a known optimum. Backbone j is row j of
    B(0.7) and the SFT model 0, so objective i's corner e_i merged with alpha is (1 + alpha) e_i; objective
    i peaks at x_i = 1 + a_i / (1 - a_i), the reference's candidate for a_i (0.2 and 0.4 here)."""
    backbones = []
    for j, row in enumerate([[0.7, 0.3], [0.3, 0.7], [0.0, 0.0]]):  # the last one: the SFT model
        backbones.append(tmp_path / f"model{j}")
        backbones[-1].mkdir()
        save_file({"theta": torch.tensor(row)}, str(backbones[-1] / "model.safetensors"))
    targets = [1 + 0.2 / 0.8, 1 + 0.4 / 0.6]
    for i, target in enumerate(targets):
        (tmp_path / f"objective{i}.py").write_text(QUADRATIC.format(i=i, target=target))
    objs = objectives.load_objectives(f"{tmp_path / 'objective0.py'},{tmp_path / 'objective1.py'}")

    def answer_with_weights(generator, model, prompts):
        theta = load_file(str(model / "model.safetensors"))["theta"].tolist()
        return [",".join(map(repr, theta))] * len(prompts)

    monkeypatch.setattr(generation.Generator, "generate", answer_with_weights)
    search = evaluate.search_alpha(
        backbones[:2], backbone_matrix(0.7, 2), str(backbones[2]), objs, ["weights:"], tmp_path / "work", {}
    )
    assert search["best"] == pytest.approx([0.2 / 0.8, 0.4 / 0.6])
    means = np.array(search["means"])  # objective i's corner x candidate x objective
    np.testing.assert_allclose(means[0, :, 0], [-(((1 + a) - targets[0]) ** 2) for a in REFERENCE_ALPHAS], atol=1e-6)


def test_prompts_are_formatted_as_openrlhf_formats_them(tiny, tmp_path):
    from openrlhf.datasets.prompts_dataset import preprocess_data
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny["policy"]))
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    rows = [{"q": "How do I bake bread?"}, {"q": [{"role": "user", "content": "Hi"}]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = evaluate.read_prompts(tmp_path / "p.jsonl", tmp_path / "tok", input_key="q", apply_chat_template=True)
    want = [preprocess_data(r, None, "q", apply_chat_template=tokenizer.apply_chat_template)[0] for r in rows]
    assert got == want and got[0] == "<user>How do I bake bread?</s><assistant>"

    template = "User: {}\nAssistant: "
    got = evaluate.read_prompts(tmp_path / "p.jsonl", tmp_path / "tok", input_key="q", input_template=template)
    assert got[0] == preprocess_data(rows[0], template, "q")[0] == "User: How do I bake bread?\nAssistant: "

    with pytest.raises(BoneSoupError, match="no key 'input'"):
        evaluate.read_prompts(tmp_path / "p.jsonl", tmp_path / "tok")
    assert evaluate.read_prompts(tmp_path / "p.jsonl", tmp_path / "tok", input_key="q", max_samples=1) == [
        "How do I bake bread?"
    ]


def test_evaluate_refuses_bad_input(soup_dir, tmp_path, capsys):
    root = soup_dir.parent
    base = ["evaluate", "--soup_dir", str(soup_dir), "--prompts", str(root / "eval.jsonl"), "--output", str(tmp_path)]
    assert main([*base, "--grid", "3", "--alpha", "auto"]) == 2  # no validation split
    assert main([*base, "--preferences", "0.5,0.6"]) == 2  # not on the simplex
    assert main([*base, "--grid", "3", "--alpha", "lots"]) == 2
    assert main([*base, "--grid", "3", "--alpha", "-0.5"]) == 2
    assert main([*base, "--grid", "3", "--compare", "nolabel"]) == 2
    assert main([*base, "--grid", "3", "--compare", f"x={tmp_path / 'missing.json'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("openrlhf-bonesoup: error:") == 6 and "Traceback" not in err
    assert not (tmp_path / "models").exists()


def test_merge_alpha_auto(soup_dir, tmp_path, capsys):
    root = soup_dir.parent
    out = tmp_path / "merged"
    argv = ["merge", "--soup_dir", str(soup_dir), "--preference", "0.5,0.5", "--output", str(out)]
    assert main([*argv, "--alpha", "auto"]) == 2  # no validation split
    assert "--alpha_prompts" in capsys.readouterr().err
    argv += ["--alpha", "auto", "--alpha_prompts", str(root / "val.jsonl"), "--eval.max_new_tokens", "4"]
    argv += ["--eval.backend", "transformers"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "per-objective alphas" in printed and str(out) in printed
    assert re.search(r"\d\.\d{13,}", printed) is None, printed  # means as coefficients.clean rounds them
    record = json.loads((out / "bonesoup_merge.json").read_text())
    assert all(a in REFERENCE_ALPHAS for a in record["alpha"]) and len(record["inputs"]) == 3
    assert record["weights"][2] == pytest.approx(-0.5 * sum(record["alpha"]))  # SFT weight -mu . alpha
    assert not (tmp_path / ".alpha_search").exists()


def test_evaluate_a_lora_soup(tiny, tmp_path):
    # LoRA backbones (as OpenRLHF saves with --ds.lora.rank) are merged into full weights of their
    # base model, so that transformers and vLLM generate from them as they are.
    import tiny_models

    for j in range(2):
        tiny_models.make_lora_adapter(tmp_path / f"adapter{j}", tiny["policy"], r=2, lora_alpha=4, seed=j)
    specs = objectives.parse_objectives([{"name": "a", "path": str(tiny["rm_llama"])}])
    specs += objectives.parse_objectives([{"name": "b", "path": str(tiny["rm_llama"])}])
    folder = tmp_path / "soup"
    soup.init_soup(folder, objectives=specs, beta=0.7, matrix=backbone_matrix(0.7, 2), sft=str(tiny["policy"]))
    for j in range(2):
        soup.register_backbone(folder, j, status="trained", checkpoint=tmp_path / f"adapter{j}")
    (tmp_path / "p.jsonl").write_text(json.dumps({"input": PROMPTS[0]}) + "\n")
    r = evaluate.evaluate(
        folder,
        [[0.3, 0.7]],
        tmp_path / "p.jsonl",
        tmp_path / "out",
        alpha=0.2,
        sampling={"max_new_tokens": 4, "backend": "transformers"},
    )
    merged = tmp_path / "out" / "models" / "mu_0.30_0.70"
    record = json.loads((merged / "bonesoup_merge.json").read_text())
    assert record["lora"] == "densified" and (merged / "model.safetensors").is_file()
    # weights over the adapters only: (1 + alpha) lambda, extrapolating from their base model;
    # lambda = ((0.3 - 0.3) / 0.4, (0.7 - 0.3) / 0.4) = (0, 1) for B(0.7)
    assert record["weights"] == pytest.approx([0.0, 1.2], abs=1e-12)
    assert np.isfinite(r["mean"]).all() and r["samples"] == [1]


def test_evaluate_scores_a_deberta_classifier_with_the_attention_it_supports(soup_dir, tiny, tmp_path):
    """DeBERTa-v2 (the usual reward and safety classifier) supports neither flash attention nor sdpa:
    evaluate loads it with eager attention and scores as its plain transformers forward does."""
    root = soup_dir.parent
    specs = [{"name": "helpful", "path": str(tiny["rm_llama"])}, {"name": "safe", "path": str(tiny["deberta"])}]
    specs[1]["label"] = 1
    (tmp_path / "objectives.json").write_text(json.dumps(specs))
    r = evaluate.evaluate(
        soup_dir,
        [[0.5, 0.5]],
        root / "val.jsonl",
        tmp_path / "out",
        objectives=str(tmp_path / "objectives.json"),
        sampling={"max_new_tokens": 4, "batch_size": 2, "backend": "transformers"},
    )
    assert r["objectives"] == ["helpful", "safe"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "generations" / "mu_0.50_0.50.jsonl").read_text().splitlines()]
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["deberta"]), dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny["deberta"]))
    with torch.no_grad():
        want = [
            model(**tok(x["prompt"] + x["response"], return_tensors="pt")).logits[0, 1].float().item() for x in lines
        ]
    np.testing.assert_allclose([x["safe"] for x in lines], want, atol=5e-3)
