"""Objectives: the n reward sources r_1..r_n, their normalisation, tokenizer bridging and the combiners.

An objective is one of
- `model`: a reward model checkpoint. OpenRLHF-trained RMs load with OpenRLHF's own
  `get_llm_for_sequence_regression`; a checkpoint whose config names a `*ForSequenceClassification`
  architecture loads as an HF classifier (one logit, or one softmax class probability);
- `http`: an endpoint speaking OpenRLHF's remote RM protocol (`openrlhf.cli.serve_rm`):
  POST {"query", "prompts", "labels"} -> {"rewards": [...]};
- `function`: a Python file defining OpenRLHF's `reward_func(queries, prompts, labels)`.

Tokenizer bridging: rollouts arrive as token ids of the policy tokenizer. An OpenRLHF RM with the
same vocabulary gets those ids directly (what upstream's RewardModelActor does, no decode); any other
model gets the text decoded without the policy's special tokens, re-encoded with its own tokenizer
(OpenRLHF RMs in the exact format of OpenRLHF's RewardDataset: `text + " " + eos`, eos forced last).
HTTP and function objectives get OpenRLHF's own query text, as upstream would send it.

One scoring core, `raw_scores`, serves the `score` command (`score_texts`), the in-cluster reward
actor and the `reward_func` file, so evaluation scores text exactly as training did. HTTP requests use
urllib from the stdlib, one POST per batch and endpoint in a thread pool: no client session to keep.
Function objectives run in the caller's thread (see raw_scores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import yaml

from openrlhf_bonesoup import coefficients
from openrlhf_bonesoup.coefficients import BoneSoupError

KINDS = ("model", "http", "function")
SPEC_KEYS = {
    "name",
    "kind",
    "path",
    "url",
    "tokenizer",
    "label",
    "output",
    "normalize",
    "max_len",
    "retries",
    "timeout",
}
DEFAULT_MAX_LEN = 2048
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 180.0  # seconds, upstream's aiohttp timeout for remote RMs
COMBINERS = ("bonesoup", "linear", "single")


# ---------------------------------------------------------------------------------------------------
# Specs: what the user wrote, checked and made explicit. This list goes into the soup manifest.


def parse_objectives(spec: str | os.PathLike | Sequence[dict]) -> list[dict]:
    """Objective specs from `rmA,rmB,http://host:5000/get_reward,rules.py`, a YAML/JSON file, or dicts.

    A file holds a list of objectives, or {"objectives": [...]}. Each has a `path` (checkpoint or
    .py file) or a `url`, and optionally name, tokenizer, label, output (logit|prob), normalize
    (none | running | {mean, std}), max_len, retries, timeout. Existing local paths become absolute
    (Ray workers on other nodes do not share our working directory); hub ids stay as they are.
    """
    base = Path.cwd()
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec).strip()
        if not text:
            raise BoneSoupError("no objectives given: pass --reward.model_name_or_path rmA,rmB or --objectives FILE")
        if text.endswith((".yaml", ".yml", ".json")) and "," not in text:
            entries, base = _read_spec_file(Path(text)), Path(text).resolve().parent
        else:
            entries = [{"url": x} if x.startswith(("http://", "https://")) else {"path": x} for x in text.split(",")]
    else:
        entries = list(spec)
    specs = [_check_entry(entry, i, base) for i, entry in enumerate(entries)]
    named = [s.pop("_named") for s in specs]
    names = [s["name"] for s in specs]
    for i, s in enumerate(specs):  # default names may collide (two ".../final" checkpoints): number them
        if not named[i] and names.count(s["name"]) > 1:
            s["name"] = f"{s['name']}_{i}"
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise BoneSoupError(f"objective names must be unique, got {names}")
    return specs


def _read_spec_file(path: Path) -> list:
    if not path.is_file():
        raise BoneSoupError(f"objectives file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise BoneSoupError(f"{path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict):
        data = data.get("objectives")
    if not isinstance(data, list) or not data:
        raise BoneSoupError(f"{path} must hold a non-empty list of objectives (or {{objectives: [...]}})")
    return data


def _check_entry(entry: Any, index: int, base: Path) -> dict:
    where = f"objective {index}"
    if not isinstance(entry, dict):
        raise BoneSoupError(f"{where} must be a mapping with a path or url, got {entry!r}")
    unknown = set(entry) - SPEC_KEYS
    if unknown:
        raise BoneSoupError(f"{where} has unknown keys {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    spec = {k: v for k, v in entry.items() if v is not None and v != ""}
    if ("path" in spec) == ("url" in spec):
        raise BoneSoupError(f"{where} needs exactly one of `path` (checkpoint or .py file) and `url`")
    kind = "http" if "url" in spec else "function" if str(spec["path"]).endswith(".py") else "model"
    if spec.setdefault("kind", kind) != kind:
        raise BoneSoupError(f"{where} says kind {spec['kind']!r} but its path/url makes it {kind!r}")
    if "path" in spec:
        spec["path"] = _resolved(str(spec["path"]).strip(), base)
        if kind == "function" and not Path(spec["path"]).is_file():
            raise BoneSoupError(f"{where}: reward_func file {spec['path']} does not exist")
    if "tokenizer" in spec:
        spec["tokenizer"] = _resolved(str(spec["tokenizer"]), base)
    if kind == "http" and not urlparse(spec["url"]).netloc:
        raise BoneSoupError(f"{where}: {spec['url']!r} is not an http(s) URL")
    if spec.get("output", "logit") not in ("logit", "prob"):
        raise BoneSoupError(f"{where}: output must be logit or prob, got {spec['output']!r}")
    for key in ("label", "max_len", "retries"):
        if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 0):
            raise BoneSoupError(f"{where}: {key} must be an integer >= 0, got {spec[key]!r}")
    spec["normalize"] = _check_normalize(spec.get("normalize", "none"), where)
    named = "name" in spec
    name = str(spec["name"]) if named else _default_name(spec)
    if not name or any(not (c.isalnum() or c in "_-.") for c in name):
        raise BoneSoupError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.' (it is a metric key)")
    return {"name": name, **{k: v for k, v in spec.items() if k != "name"}, "_named": named}


def _resolved(path: str, base: Path) -> str:
    candidate = Path(path).expanduser()
    candidate = candidate if candidate.is_absolute() else base / candidate
    return str(candidate.resolve()) if candidate.exists() else path


def _default_name(spec: dict) -> str:
    raw = urlparse(spec["url"]).netloc if "url" in spec else Path(spec["path"].rstrip("/")).stem
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in raw) or "objective"


def _check_normalize(value: Any, where: str) -> str | dict:
    if value in ("none", "running"):
        return value
    if isinstance(value, dict) and set(value) == {"mean", "std"}:
        mean, std = value["mean"], value["std"]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, std)):
            if np.isfinite(mean) and np.isfinite(std) and std > 0:
                return {"mean": float(mean), "std": float(std)}
    raise BoneSoupError(f"{where}: normalize must be none, running or {{mean: M, std: S}} with S > 0, got {value!r}")


# ---------------------------------------------------------------------------------------------------
# Loaded objectives.


@dataclass
class Objective:
    """One loaded reward source. `spec` is its checked spec; the rest is what scoring needs."""

    name: str
    kind: str
    spec: dict
    model: Any = None
    tokenizer: Any = None
    head: str | None = None  # "openrlhf" or "classifier" for kind "model"
    shares_policy_tokenizer: bool = False
    func: Callable | None = None
    device: Any = "cpu"
    # Running statistics (Chan et al.'s parallel update), used when spec["normalize"] == "running".
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def normalize(self, values: np.ndarray) -> np.ndarray:
        how = self.spec["normalize"]
        if how == "none":
            return values
        if isinstance(how, dict):
            return (values - how["mean"]) / how["std"]
        if values.size == 0:
            return values
        with self.lock:  # running: rollout workers score from several threads at once
            n, batch_mean = values.size, float(values.mean())
            delta, total = batch_mean - self.mean, self.count + n
            self.mean += delta * n / total
            self.m2 += float(((values - batch_mean) ** 2).sum()) + delta**2 * self.count * n / total
            self.count = total
            std = np.sqrt(self.m2 / self.count) if self.count > 1 else 1.0
            return (values - self.mean) / max(std, 1e-8)


def load_objectives(
    spec: str | os.PathLike | Sequence[dict],
    *,
    policy_tokenizer: Any = None,
    device: Any = "cpu",
    model_kwargs: dict | None = None,
) -> list[Objective]:
    """Load every objective of `spec` (see parse_objectives).

    policy_tokenizer: the policy's tokenizer, when scoring rollouts given as its token ids; OpenRLHF
    RMs with the same vocabulary and eos then take those ids directly. model_kwargs go to OpenRLHF's
    `get_llm_for_sequence_regression` (param_dtype, attn_implementation, ds_config, ...); classifiers
    use its param_dtype and attn_implementation.
    """
    from tqdm import tqdm

    model_kwargs = {"param_dtype": "bf16", "attn_implementation": "sdpa", **(model_kwargs or {})}
    objectives = []
    for spec_i in tqdm(parse_objectives(spec), desc="loading objectives", disable=None):
        objective = Objective(name=spec_i["name"], kind=spec_i["kind"], spec=spec_i, device=device)
        if objective.kind == "model":
            _load_model(objective, policy_tokenizer, model_kwargs)
        elif objective.kind == "function":
            module_spec = importlib.util.spec_from_file_location(f"reward_func_{objective.name}", spec_i["path"])
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            if not callable(getattr(module, "reward_func", None)):
                raise BoneSoupError(f"{spec_i['path']} defines no reward_func(queries, prompts, labels)")
            objective.func = module.reward_func
        objectives.append(objective)
    return objectives


def _load_model(objective: Objective, policy_tokenizer: Any, model_kwargs: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = objective.spec["path"]
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        objective.head = "classifier"
        label = objective.spec.get("label", 0 if config.num_labels == 1 else None)
        if label is None or label >= config.num_labels:
            raise BoneSoupError(
                f"objective {objective.name}: {path} has {config.num_labels} labels: choose one with "
                "`label: k` (and `output: logit|prob`) in an objectives file"
            )
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(model_kwargs["param_dtype"], torch.float32)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, attn_implementation=model_kwargs["attn_implementation"], trust_remote_code=True
        )
    else:
        objective.head = "openrlhf"
        try:
            from openrlhf.models import get_llm_for_sequence_regression
        except ImportError as e:
            raise BoneSoupError(
                f"objective {objective.name}: OpenRLHF's reward model loader cannot import here ({e}); "
                "install openrlhf with its flash-attn, or use an HF *ForSequenceClassification checkpoint"
            ) from None
        model = get_llm_for_sequence_regression(path, "reward", **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(objective.spec.get("tokenizer", path), trust_remote_code=True)
    if tokenizer.pad_token is None:  # as openrlhf.utils.get_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    if objective.head == "classifier" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # HF classifiers pool at the last non-pad token
    # Left where the loader put it otherwise: a ZeRO-3 model (ds_config) is DeepSpeed's to place.
    objective.model = (model if str(objective.device) == "cpu" else model.to(objective.device)).eval()
    objective.tokenizer = tokenizer
    objective.shares_policy_tokenizer = (
        objective.head == "openrlhf"
        and policy_tokenizer is not None
        and tokenizer.eos_token_id == policy_tokenizer.eos_token_id
        and tokenizer.get_vocab() == policy_tokenizer.get_vocab()
    )


# ---------------------------------------------------------------------------------------------------
# Scoring.


def policy_texts(policy_tokenizer: Any, input_ids: Any, attention_mask: Any) -> list[str]:
    """Rollout ids -> text without padding or the policy's special tokens (bos, eos, chat markers)."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
    return policy_tokenizer.batch_decode(rows, skip_special_tokens=True)


def raw_scores(
    objectives: Sequence[Objective],
    *,
    texts: Sequence[str] | None = None,
    policy_ids: tuple | None = None,
    policy_tokenizer: Any = None,
    queries: Sequence[str] | None = None,
    prompts: Sequence[Any] | None = None,
    labels: Sequence[Any] | None = None,
    **forward_kwargs: Any,
) -> np.ndarray:
    """Per-objective values (N, n) before normalisation.

    texts: prompt + response per sample, clean (no policy special tokens). When None, they are decoded
    from policy_ids = (input_ids, attention_mask) with policy_tokenizer, and only if some objective
    needs text. queries/prompts/labels go to HTTP and function objectives (queries default to texts).
    forward_kwargs go to OpenRLHF RMs that take policy_ids (ring_attn_group, pad_sequence, ...).
    HTTP endpoints are queried in threads while the models and function objectives run here.
    """
    if texts is None and any(o.kind == "model" and not (o.shares_policy_tokenizer and policy_ids) for o in objectives):
        texts = policy_texts(policy_tokenizer, *policy_ids)
    queries = queries if queries is not None else texts
    size = len(queries if queries is not None else policy_ids[0])
    prompts = list(prompts) if prompts is not None else [None] * size
    labels = list(labels) if labels is not None else [None] * size
    columns: dict[int, Any] = {}
    # Only endpoints wait on the network, so only they run concurrently. Function objectives stay in
    # this thread: a reward_func that loads a model lazily must not race another one, since
    # transformers' from_pretrained patches torch's init functions process-wide while it loads.
    http = [(i, o) for i, o in enumerate(objectives) if o.kind == "http"]
    with ThreadPoolExecutor(max_workers=max(1, len(http))) as pool:
        futures = {i: pool.submit(_call_remote, o, list(queries), prompts, labels) for i, o in http}
        for i, o in enumerate(objectives):
            if o.kind == "model":
                columns[i] = _score_model(o, texts, policy_ids, forward_kwargs)
            elif o.kind == "function":
                columns[i] = _call_remote(o, list(queries), prompts, labels)
        columns.update({i: f.result() for i, f in futures.items()})
    columns = {i: np.asarray(c, dtype=np.float64).reshape(-1) for i, c in columns.items()}
    for i, o in enumerate(objectives):
        if columns[i].size != size:
            raise RuntimeError(f"objective {o.name} returned {columns[i].size} values for {size} samples")
    return np.stack([columns[i] for i in range(len(objectives))], axis=1)


def normalize(objectives: Sequence[Objective], raw: np.ndarray) -> np.ndarray:
    """Each column through its objective's normalisation (running statistics are updated)."""
    return np.stack([o.normalize(raw[:, i]) for i, o in enumerate(objectives)], axis=1)


def score_texts(
    objectives: Sequence[Objective],
    prompts: Sequence[str],
    responses: Sequence[str],
    labels: Sequence[Any] | None = None,
) -> np.ndarray:
    """Per-objective values (N, n) of prompt/response pairs, after each objective's normalisation."""
    if len(prompts) != len(responses):
        raise BoneSoupError(f"{len(prompts)} prompts but {len(responses)} responses")
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    return normalize(objectives, raw_scores(objectives, texts=texts, prompts=prompts, labels=labels))


def _score_model(o: Objective, texts: Sequence[str] | None, policy_ids: tuple | None, forward_kwargs: dict):
    import torch

    with o.lock, torch.no_grad():  # one forward at a time per model (rollout workers use threads)
        if o.shares_policy_tokenizer and policy_ids is not None:
            input_ids, attention_mask = (t.to(o.device) for t in policy_ids)
            return o.model(input_ids, attention_mask, **forward_kwargs).float().cpu().numpy()
        max_len = o.spec.get("max_len", DEFAULT_MAX_LEN)
        if o.head == "openrlhf":
            # Exactly OpenRLHF's RewardDataset.__getitem__: rstrip("\n"), append " " + eos unless there,
            # tokenize without special tokens, then force eos as the last token (where the RM reads).
            eos = o.tokenizer.eos_token
            texts = [t.rstrip("\n") if t.rstrip("\n").endswith(eos) else t.rstrip("\n") + " " + eos for t in texts]
            rows = o.tokenizer(list(texts), max_length=max_len, truncation=True, add_special_tokens=False)["input_ids"]
            rows = [row[:-1] + [o.tokenizer.eos_token_id] for row in rows]
            batch = o.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(o.device)
            # A ring-attention group runs the forward collectively: every rank has this same batch.
            ring = {"ring_attn_group": forward_kwargs["ring_attn_group"]} if "ring_attn_group" in forward_kwargs else {}
            return o.model(batch["input_ids"], batch["attention_mask"], **ring).float().cpu().numpy()
        batch = o.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        logits = o.model(**batch.to(o.device)).logits.float()
        label = o.spec.get("label", 0)
        if o.spec.get("output", "logit") == "prob":
            return logits.softmax(-1)[:, label].cpu().numpy()
        return logits[:, label].cpu().numpy()


def _call_remote(o: Objective, queries: list[str], prompts: list, labels: list) -> np.ndarray:
    if o.kind == "function":
        result = o.func(queries, prompts, labels)
        if isinstance(result, dict) and "rewards" not in result:
            raise RuntimeError(f"objective {o.name}: reward_func returned a dict without 'rewards'")
        result = result["rewards"] if isinstance(result, dict) else result
        return np.asarray(result.float().cpu() if hasattr(result, "float") else result, dtype=np.float64)
    retries = o.spec.get("retries", DEFAULT_RETRIES)
    data = json.dumps({"query": queries, "prompts": prompts, "labels": labels}).encode()
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(o.spec["url"], data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=o.spec.get("timeout", DEFAULT_TIMEOUT)) as response:
                rewards = np.asarray(json.loads(response.read())["rewards"], dtype=np.float64).reshape(-1)
            if rewards.size != len(queries):
                raise ValueError(f"got {rewards.size} rewards for {len(queries)} queries")
            return rewards
        except (OSError, ValueError, KeyError, TypeError) as e:  # URLError/HTTPError are OSErrors
            error = e
            if attempt < retries:
                time.sleep(min(0.5 * 2**attempt, 8.0))
    # Never a silent zero or missing reward: the caller (and OpenRLHF's rollout) must see this.
    raise RuntimeError(f"objective {o.name}: {o.spec['url']} failed {retries + 1} times; last error: {error!r}")


# ---------------------------------------------------------------------------------------------------
# Combiners: a weight vector over the n objectives. The trained reward is values @ weights.


def combiner_weights(
    combiner: str,
    n: int,
    *,
    beta: float | None = None,
    backbone_index: int | None = None,
    reward_weights: Sequence[float] | None = None,
    objective: int | None = None,
) -> np.ndarray:
    """bonesoup: row backbone_index of B(beta); linear: reward_weights (a point of the simplex, as in
    MORLHF); single: e_objective (Rewarded Soup's per-objective baseline)."""
    given = {"--beta": beta, "--backbone_index": backbone_index, "--reward_weights": reward_weights}
    given["--objective"] = objective
    needs = {"bonesoup": ("--beta", "--backbone_index"), "linear": ("--reward_weights",), "single": ("--objective",)}
    if combiner not in needs:
        raise BoneSoupError(f"unknown reward combiner {combiner!r}; choose one of {', '.join(COMBINERS)}")
    for flag, value in given.items():
        if flag in needs[combiner] and value is None:
            raise BoneSoupError(f"--reward_combiner {combiner} needs {flag}")
        if flag not in needs[combiner] and value is not None:
            raise BoneSoupError(f"{flag} does not apply to --reward_combiner {combiner}")
    if combiner == "bonesoup":
        matrix = coefficients.backbone_matrix(beta, n)
        if not 0 <= backbone_index < n:
            raise BoneSoupError(f"--backbone_index must lie in 0..{n - 1} for {n} objectives, got {backbone_index}")
        return matrix[backbone_index]
    if combiner == "linear":
        return coefficients.check_preference(reward_weights, n)
    if not 0 <= objective < n:
        raise BoneSoupError(f"--objective must lie in 0..{n - 1} for {n} objectives, got {objective}")
    return np.eye(n)[objective]


def add_reward_arguments(parser: argparse.ArgumentParser) -> None:
    """The combiner flags, shared by the launcher and `openrlhf-bonesoup score` (dotted aliases in
    OpenRLHF 0.11's style)."""
    group = parser.add_argument_group("Bone Soup reward")
    group.add_argument("--reward_combiner", "--reward.combiner", dest="reward_combiner", choices=COMBINERS)
    group.add_argument("--beta", "--reward.beta", dest="beta", type=float, help="bonesoup: diagonal of B(beta)")
    group.add_argument(
        "--backbone_index", "--reward.backbone_index", dest="backbone_index", type=int, help="bonesoup: row j"
    )
    group.add_argument("--reward_weights", "--reward.weights", dest="reward_weights", help="linear: w1,...,wn (sum 1)")
    group.add_argument("--objective", "--reward.objective", dest="objective", type=int, help="single: objective index")
    group.add_argument("--objectives", "--reward.objectives", dest="objectives", help="YAML/JSON objectives file")


def weights_from_args(args: argparse.Namespace, n: int) -> np.ndarray:
    """combiner_weights from the flags of add_reward_arguments."""
    if args.reward_combiner is None:
        raise BoneSoupError("--reward_combiner is required: bonesoup, linear or single")
    reward_weights = None
    if args.reward_weights is not None:
        reward_weights = coefficients.parse_floats(args.reward_weights, "--reward_weights")
    return combiner_weights(
        args.reward_combiner,
        n,
        beta=args.beta,
        backbone_index=args.backbone_index,
        reward_weights=reward_weights,
        objective=args.objective,
    )


def score_jsonl(
    objectives: Sequence[Objective],
    weights: np.ndarray,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    batch_size: int = 16,
) -> np.ndarray:
    """Score {"prompt", "response"[, "label"]} records; write each with "rewards" (per objective, as the
    combiner sees them) and "reward" (combined). Returns the raw values (N, n) for statistics.

    The output is written to a temporary file and renamed: an interrupted run leaves no half file.
    """
    from tqdm import tqdm

    records = []
    with open(input_path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BoneSoupError(f"{input_path}:{line_no} is not JSON: {e}") from None
            if not (isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("prompt", "response"))):
                raise BoneSoupError(f"{input_path}:{line_no} needs string fields prompt and response")
            records.append(record)
    if not records:
        raise BoneSoupError(f"{input_path} holds no records")
    raw = []
    output_path = Path(output_path)
    tmp = output_path.with_name(f".{output_path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as out:
            for start in tqdm(range(0, len(records), batch_size), desc="scoring", disable=None):
                batch = records[start : start + batch_size]
                prompts, responses = [r["prompt"] for r in batch], [r["response"] for r in batch]
                texts = [p + r for p, r in zip(prompts, responses, strict=True)]
                labels = [r.get("label") for r in batch]
                batch_raw = raw_scores(objectives, texts=texts, prompts=prompts, labels=labels)
                values = normalize(objectives, batch_raw)
                for record, row in zip(batch, values, strict=True):
                    out.write(json.dumps({**record, "rewards": row.tolist(), "reward": float(row @ weights)}) + "\n")
                raw.append(batch_raw)
        os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.concatenate(raw)
