"""Evaluation: preference grid -> merged models -> generations -> objective scores -> front, hypervolume, plot.

For each preference mu the soup's backbones are merged (one sweep of the merge engine writes all K
models), every merged model answers the same prompts with the same seeded sampling (generation.py: vLLM
when it is really installed, else transformers' `generate`), and every response is scored by the soup's
objectives with scoring.py's core, the code the PPO reward used. Per preference we keep the mean and
standard error of each objective; across preferences the Pareto front, the hypervolume (reference point
stated in results.json) and controllability (indicators.py), and a plot that can overlay other soups
(plot.py). `--alpha auto` is the reference code's extrapolation search (see search_alpha). An evaluation
records its settings in run.json and resumes from what it finished.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openrlhf_bonesoup import files, soup
from openrlhf_bonesoup.coefficients import (
    REFERENCE_ALPHAS,
    BoneSoupError,
    check_matrix,
    check_preference,
    clean,
    extrapolation_weights,
)
from openrlhf_bonesoup.generation import Generator
from openrlhf_bonesoup.indicators import REFERENCE_RULE, add_fronts, load_front, summarise
from openrlhf_bonesoup.plot import plot_fronts

FORMAT = "openrlhf-bonesoup/eval/v1"
RUN_FORMAT = "openrlhf-bonesoup/eval-run/v1"  # <output>/run.json: an evaluation's settings, for resuming it
RUN_STATE, ALPHA_SEARCH = "run.json", "alpha_search.json"
DATA = {"input_key": "input", "input_template": None, "apply_chat_template": False, "max_samples": None}

# ---------------------------------------------------------------------------------------------------
# Prompts and scores.


def read_prompts(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, **data) -> list[str]:
    """Prompt texts from a JSON-lines file, formatted as OpenRLHF's PPO formats its prompts.

    This mirrors openrlhf.datasets.prompts_dataset.preprocess_data (0.11.2) for text prompts:
    apply_chat_template -> the tokenizer's chat template with a generation prompt; else the
    input_template's "{}" filled with the input. Mirrored, not imported, because only integration/
    imports OpenRLHF; tests/test_evaluate.py checks both give the same text.
    """
    data = {**DATA, **data}
    path = Path(path)
    if not path.is_file():
        raise BoneSoupError(f"prompts file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BoneSoupError(f"{path}:{number} is not a JSON line: {e}") from None
        if not isinstance(row, dict) or data["input_key"] not in row:
            raise BoneSoupError(f"{path}:{number} has no key {data['input_key']!r} (set --data.input_key)")
        rows.append(row[data["input_key"]])
    rows = rows[: data["max_samples"]] if data["max_samples"] else rows
    if not rows:
        raise BoneSoupError(f"{path} holds no prompts")
    if data["apply_chat_template"]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        chats = [[{"role": "user", "content": r}] if isinstance(r, str) else r for r in rows]
        return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    template = data["input_template"]
    return [template.format(r) if template else r for r in rows]


def score_responses(
    objectives: Sequence, prompts: Sequence[str], responses: Sequence[str], batch_size: int
) -> np.ndarray:
    """(N, n) raw objective values of prompt + response, in batches, through scoring.raw_scores.

    Raw, i.e. before each objective's training-time normalisation: a "running" normalisation would
    make a score depend on what was scored before it, and evaluation compares models in the reward
    models' own units, as the paper reports them.
    """
    from tqdm import tqdm

    from openrlhf_bonesoup.scoring import raw_scores

    parts = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="scoring", unit="batch", leave=False):
        p, r = prompts[start : start + batch_size], responses[start : start + batch_size]
        parts.append(raw_scores(objectives, texts=[a + b for a, b in zip(p, r, strict=True)], prompts=list(p)))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------------
# The pipeline.


def search_alpha(
    backbones: Sequence[str],
    matrix: np.ndarray,
    sft: str | None,
    objectives: Sequence,
    prompts: Sequence[str],
    workdir: str | os.PathLike,
    sampling: dict | None = None,
    generator: Generator | None = None,
    **engine_kw,
) -> dict:
    """The reference code's SFT extrapolation search (`--alpha auto`), on a small validation split.

    For each objective i, merge its corner e_i for every alpha in coefficients.REFERENCE_ALPHAS
    (the reference's k = 1/(1-a), a in 0.1..0.5: weights k lambda(e_i), SFT weight 1 - k), generate
    for the validation prompts, score, and keep the alpha with the best mean score on objective i.
    Each candidate is one merge sweep of the n corners into workdir, removed afterwards. Returns
    {"best": one alpha per objective, "means": means[i][a] = mean scores of corner i with candidate a, ...}.
    """
    from openrlhf_bonesoup.merge import merge_soup

    opened = generator is None  # its own engine, closed below (the candidates are removed); a caller's stays
    generator = generator or Generator(sampling)
    n = matrix.shape[0]
    corners = np.eye(n).tolist()
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)  # a killed search's candidates: scratch, never reused
    try:
        # models[i * k + c]: objective i's corner merged with candidate c, as `table` reads them below
        by_alpha = [
            merge_soup(
                backbones,
                matrix,
                corners,
                [workdir / f"objective{i}_alpha{a:.4f}" for i in range(n)],
                sft=sft,
                alpha=a,
                **engine_kw,
            )
            for a in REFERENCE_ALPHAS
        ]
        models = [by_alpha[c][i] for i in range(n) for c in range(len(REFERENCE_ALPHAS))]
        size = generator.sampling["batch_size"]
        means = [
            score_responses(objectives, prompts, generator.generate(m, prompts), size).mean(axis=0) for m in models
        ]
    finally:
        if opened:
            generator.close()
        shutil.rmtree(workdir, ignore_errors=True)
    k = len(REFERENCE_ALPHAS)
    table = [[means[i * k + c].tolist() for c in range(k)] for i in range(n)]
    best = [REFERENCE_ALPHAS[int(np.argmax([row[i] for row in table[i]]))] for i in range(n)]
    return {"candidates": list(REFERENCE_ALPHAS), "validation_prompts": len(prompts), "means": table, "best": best}


def evaluate(
    soup_dir: str | os.PathLike,
    preferences: Sequence[Sequence[float]],
    prompts: str | os.PathLike,
    output: str | os.PathLike,
    *,
    objectives: str | None = None,
    alpha: float | str = 0.0,
    alpha_prompts: str | os.PathLike | None = None,
    data: dict | None = None,
    sampling: dict | None = None,
    compare: dict[str, str] | None = None,
    reference: Sequence[float] | None = None,
    label: str | None = None,
    generator: Generator | None = None,
    **engine_kw,
) -> dict:
    """Evaluate a trained soup at every preference; write results.json, results.csv and pareto.png.

    objectives: a spec for objectives.load_objectives; default the soup's own (those it trained on).
    alpha: one SFT extrapolation strength, or "auto" (search_alpha on alpha_prompts).
    compare: label -> another evaluation's results.json (or any JSON with "mean": [[r_1..r_n], ...]),
    overlaid on the plot and given a hypervolume against the same reference point.
    generator: an open generation.Generator to generate with instead of one made from `sampling`, whose
    settings are then the evaluation's; the caller closes it (the demo's one vLLM engine for three evaluations).
    engine_kw go to merge_engine.merge_checkpoints (overwrite, workers, device, max_shard_size).
    """
    import torch
    from tqdm import tqdm

    from openrlhf_bonesoup.merge import merge_soup, sweep_outputs
    from openrlhf_bonesoup.objectives import load_objectives

    manifest, backbones = soup.require_trained(soup_dir)
    matrix, n, sft = check_matrix(manifest["matrix"]), manifest["n"], manifest.get("sft")
    preferences = [check_preference(mu, n).tolist() for mu in preferences]
    models = sweep_outputs(Path(output) / "models", preferences)
    earlier = [p for p in (Path(output) / "results.json", *models) if p.exists()]
    # A finished evaluation (results.json), or models with no run.json, is refused before any model loads,
    # naming the folder as given; an interrupted one (run.json, no results.json) is _resumable's to judge.
    interrupted = (Path(output) / RUN_STATE).is_file() and not (Path(output) / "results.json").exists()
    if earlier and not interrupted and not engine_kw.get("overwrite"):
        shown = ", ".join(str(p.relative_to(output)) for p in earlier[:2]) + (", ..." if len(earlier) > 2 else "")
        raise BoneSoupError(f"--output {output} holds an earlier evaluation ({shown}): choose another, or --overwrite")
    if alpha == "auto" and alpha_prompts is None:
        raise BoneSoupError("--alpha auto searches on a validation split: give --alpha_prompts FILE")
    if alpha != "auto":
        extrapolation_weights([1.0], alpha)  # a bad alpha fails here, before any model is loaded
    others = {name: load_front(path) for name, path in (compare or {}).items()}
    if generator is not None and sampling is not None:
        raise BoneSoupError("evaluate takes sampling settings or a generator made from them, not both")
    opened = generator is None  # ours to close; a caller's stays open
    generator = generator or Generator(sampling)  # a missing vLLM or a bad engine flag: one line before any model
    sampling = generator.sampling
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    texts = read_prompts(prompts, backbones[0], **(data or {}))
    val = read_prompts(alpha_prompts, backbones[0], **(data or {})) if alpha == "auto" else None
    spec = objectives or manifest["objectives"]
    resume = _resumable(output, manifest, backbones, preferences, texts, spec, alpha, val, sampling, engine_kw)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    objs = load_objectives(spec, device=device)
    if len(objs) != n:
        raise BoneSoupError(f"{len(objs)} objectives given but the soup has n = {n}")
    names = [o.name for o in objs]

    search = None
    if alpha == "auto" and resume and (output / ALPHA_SEARCH).is_file():
        search = json.loads((output / ALPHA_SEARCH).read_text())
    elif alpha == "auto":
        # evaluate's engine, not a second one beside it (a GPU holds one)
        workdir = output / "alpha_search"
        search = search_alpha(backbones, matrix, sft, objs, val, workdir, generator=generator, **engine_kw)
        files.write_durably(output / ALPHA_SEARCH, json.dumps(search) + "\n")
    alphas = search["best"] if search else [float(alpha)] * n
    # LoRA soups: merged adapters become full weights of their base model, which vLLM and
    # transformers both load as they are.
    engine_kw.setdefault("densify", all((Path(b) / "adapter_config.json").is_file() for b in backbones))
    todo = [k for k, model in enumerate(models) if not (resume and model.is_dir())]  # published: complete
    if todo:
        merge_soup(
            backbones,
            matrix,
            [preferences[k] for k in todo],
            [models[k] for k in todo],
            sft=sft,
            alpha=alphas,
            **engine_kw,
        )
    samples = []
    (output / "generations").mkdir(exist_ok=True)
    try:
        for model in tqdm(models, desc="preferences", unit="model"):
            done = output / "generations" / f"{model.name}.jsonl"
            if resume and done.is_file():  # written whole or not at all: a finished preference
                records = [json.loads(line) for line in done.read_text().splitlines()]
                samples.append(np.array([[r[name] for name in names] for r in records], dtype=np.float64))
                continue
            responses = generator.generate(model, texts)
            scores = score_responses(objs, texts, responses, sampling["batch_size"])
            samples.append(scores)
            lines = [
                json.dumps({"prompt": p, "response": r, **dict(zip(names, clean(s), strict=True))}) + "\n"
                for p, r, s in zip(texts, responses, scores, strict=True)
            ]
            files.write_durably(done, "".join(lines))
    finally:
        if opened:
            generator.close()
    label = label or ("rewarded_soup" if np.allclose(matrix, np.eye(n)) else "bone_soup")
    results = {
        "format": FORMAT,
        "label": label,
        "soup_dir": str(Path(soup_dir).resolve()),
        "beta": float(manifest["beta"]),
        "matrix": matrix.tolist(),
        "alpha": alphas,
        "alpha_search": search,
        "prompts": str(Path(prompts).resolve()),
        "backend": generator.backend,
        "sampling": sampling,
        "scores": "raw objective values (before training-time normalisation)",
        **summarise(preferences, samples, names),
    }
    add_fronts(results, others, reference)
    results = clean(results)  # as a person reads them; the file and the return value alike
    write_results(results, output, others)
    return results


def _resumable(output: Path, manifest, backbones, preferences, texts, spec, alpha, val, sampling, engine_kw) -> bool:
    """Whether `output` holds an interrupted evaluation with exactly these settings (its run.json): then what
    it finished is reused. Another evaluation there is refused unless overwrite, which starts afresh."""
    from openrlhf_bonesoup.objectives import parse_objectives

    run = {
        "format": RUN_FORMAT,
        "backbones": [
            [b, (e or {}).get("sha256_headers_and_samples")]
            for b, e in zip(backbones, manifest["backbones"], strict=True)
        ],
        "matrix": manifest["matrix"],
        "sft": manifest.get("sft"),
        "preferences": preferences,
        "prompts": texts,
        "objectives": parse_objectives(spec),
        "alpha": alpha if alpha == "auto" else float(alpha),
        "alpha_prompts": val,
        "sampling": sampling,
        "lora": {k: engine_kw.get(k) for k in ("densify", "base")},
    }
    run = json.loads(json.dumps(run))  # as it reads back
    state, overwrite = output / RUN_STATE, engine_kw.get("overwrite", False)
    previous = json.loads(state.read_text()) if state.is_file() else None
    if previous == run and not overwrite:
        return True
    if not overwrite and (previous is not None or (output / "models").exists()):
        raise BoneSoupError(
            f"{output} exists and holds an evaluation with other settings: choose a new --output, or pass "
            "--overwrite to start it again (the same command resumes an interrupted evaluation)"
        )
    shutil.rmtree(output / "generations", ignore_errors=True)
    (output / ALPHA_SEARCH).unlink(missing_ok=True)
    files.write_durably(state, json.dumps(run, indent=2) + "\n")
    return False


def write_results(results: dict, output: Path, others: dict[str, dict]) -> None:
    """results.json, results.csv (one row per preference) and pareto.png into output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["objectives"]
    tmp = files.temporary(output / "results.csv")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"mu_{x}" for x in names] + [f"{x}_{s}" for x in names for s in ("mean", "sem")] + ["pareto"])
        for mu, mean, err, front in zip(
            results["preferences"], results["mean"], results["sem"], results["pareto"], strict=True
        ):
            writer.writerow([*mu, *[v for pair in zip(mean, err, strict=True) for v in pair], front])
    files.replace_durably(tmp, output / "results.csv")
    fig, ax = plt.subplots(figsize=(6, 5))
    rule = "given" if results["reference_rule"] != REFERENCE_RULE else "common nadir"
    plot_fronts(ax, {results["label"]: results} | others, names, results["reference_point"], f"reference ({rule})")
    hv = ", ".join(f"{k} {v:.4g}" for k, v in results["hypervolume"].items())
    extra = f" (objectives 1-2 of {len(names)})" if len(names) > 2 else ""
    ax.set_title(f"Pareto fronts{extra}, points labelled with mu\nhypervolume: {hv}", fontsize=9)
    fig.tight_layout()
    tmp = files.temporary(output / "pareto.png")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    files.replace_durably(tmp, output / "pareto.png")
    results["files"] = {"csv": "results.csv", "plot": "pareto.png", "models": "models/", "generations": "generations/"}
    files.write_durably(output / "results.json", json.dumps(results, indent=2) + "\n")
