"""Objectives: the n reward sources r_1..r_n, as the user specifies them and as they are loaded.

An objective is one of
- `model`: a reward model checkpoint. OpenRLHF-trained RMs load with OpenRLHF's own
  `get_llm_for_sequence_regression`, as upstream loads them; a checkpoint whose config names a
  `*ForSequenceClassification` architecture loads as an HF classifier (one logit, or one softmax
  class probability) with its own tokenizer;
- `http`: an endpoint speaking OpenRLHF's remote RM protocol (`openrlhf.cli.serve_rm`);
- `function`: a Python file defining OpenRLHF's `reward_func(queries, prompts, labels)`. It is
  executed when loaded; `gpu: true` says that it loads a model, so it runs where the models run.

Scoring is in scoring.py, normalisation and the weighted sum in combiners.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import yaml

from openrlhf_bonesoup.errors import BoneSoupError

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
    "deadline",
    "trust_remote_code",
    "gpu",
    "attn_implementation",
}
# What a model objective's `attn_implementation` may say (transformers' names).
ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention", "sdpa", "eager")
DEFAULT_MAX_LEN = 2048
MAX_RETRIES = 10


# ---------------------------------------------------------------------------------------------------
# Specs: what the user wrote, checked and made explicit. This list goes into the soup manifest.


def parse_objectives(spec: str | os.PathLike | Sequence[dict]) -> list[dict]:
    """Objective specs from `rmA,rmB,http://host:5000/get_reward,rules.py`, a YAML/JSON file, or dicts.

    A file holds a list of objectives, or {"objectives": [...]}. Each has a `path` (checkpoint or
    .py file) or a `url`, and optionally name, tokenizer, label, output (logit|prob), normalize
    (none | running | {mean, std}), max_len, trust_remote_code, gpu (functions), retries, timeout and
    deadline (endpoints). Existing local paths become absolute (Ray workers on other nodes do not
    share our working directory); hub ids stay as they are.
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


def needs_reward_actors(specs: Sequence[dict]) -> bool:
    """Whether some objective holds a model (a checkpoint, or a `gpu: true` function): then every
    objective is scored in the reward actor group, on the reward GPUs, and never in a rollout process."""
    return any(s["kind"] == "model" or s.get("gpu") for s in specs)


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
    if spec.get("retries", 0) > MAX_RETRIES:
        raise BoneSoupError(f"{where}: retries must be at most {MAX_RETRIES}, got {spec['retries']}")
    for key in ("timeout", "deadline"):
        value = spec.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise BoneSoupError(f"{where}: {key} must be a number of seconds > 0, got {value!r}")
    for key in ("trust_remote_code", "gpu"):
        if not isinstance(spec.get(key, False), bool):
            raise BoneSoupError(f"{where}: {key} must be true or false, got {spec[key]!r}")
    if spec.get("gpu") and kind != "function":
        raise BoneSoupError(f"{where}: `gpu: true` applies to reward_func files (checkpoints always run on GPUs)")
    if "attn_implementation" in spec and (kind != "model" or spec["attn_implementation"] not in ATTENTION):
        raise BoneSoupError(
            f"{where}: attn_implementation applies to checkpoints and must be one of {', '.join(ATTENTION)}, "
            f"got {spec['attn_implementation']!r}"
        )
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


def _check_local(name: str, path: str) -> None:
    """A missing path that looks local (starts with '.', '/' or '~', or names an existing folder) is a
    typo, refused here: transformers would take it for a hub id and wait for the network."""
    candidate = Path(path).expanduser()
    if not candidate.exists() and (
        path.startswith((".", "/", "~")) or str(candidate.parent) != "." and candidate.parent.is_dir()
    ):
        raise BoneSoupError(f"objective {name}: {path} does not exist")


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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one forward at a time


def load_objectives(
    spec: str | os.PathLike | Sequence[dict],
    *,
    policy_tokenizer: Any = None,
    device: Any = "cpu",
    model_kwargs: dict | None = None,
    gpu: bool | None = None,
    ring_attention: bool = False,
) -> list[Objective]:
    """Load every objective of `spec` (see parse_objectives).

    policy_tokenizer: the policy's tokenizer, when scoring rollouts given as its token ids; OpenRLHF
    RMs with the same vocabulary and eos then take those ids directly. model_kwargs go to OpenRLHF's
    `get_llm_for_sequence_regression` (param_dtype, ds_config, packing_samples, ...); classifiers use its
    param_dtype. Each model's attention is its own (`attention`), never a launch-wide flag. gpu: whether
    the models will run on a CUDA GPU (default: `device` is one; the reward actor loads on the CPU for
    DeepSpeed to place). ring_attention: OpenRLHF's ring attention is set up in this process.
    """
    from tqdm import tqdm

    model_kwargs = {"param_dtype": "bf16", **(model_kwargs or {})}
    if "attn_implementation" in model_kwargs:
        raise BoneSoupError("attention is chosen per objective: give `attn_implementation` in its spec instead")
    if gpu is None:
        import torch

        gpu = torch.device(device).type == "cuda"
    objectives = []
    for spec_i in tqdm(parse_objectives(spec), desc="loading objectives", disable=None):
        objective = Objective(name=spec_i["name"], kind=spec_i["kind"], spec=spec_i, device=device)
        if objective.kind == "model":
            _load_model(objective, policy_tokenizer, model_kwargs, gpu, ring_attention)
        elif objective.kind == "function":
            module_spec = importlib.util.spec_from_file_location(f"reward_func_{objective.name}", spec_i["path"])
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            if not callable(getattr(module, "reward_func", None)):
                raise BoneSoupError(f"{spec_i['path']} defines no reward_func(queries, prompts, labels)")
            objective.func = module.reward_func
        objectives.append(objective)
    return objectives


def _load_model(objective: Objective, policy_tokenizer: Any, model_kwargs: dict, gpu: bool, ring: bool) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, trust = objective.spec["path"], objective.spec.get("trust_remote_code", False)
    prefix = model_kwargs.get("value_head_prefix")
    config, objective.head = check_model(objective.spec, ring_attention=ring, value_head_prefix=prefix)
    attn = attention(objective.spec, config, gpu=gpu, ring_attention=ring)
    if objective.head == "classifier":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(model_kwargs["param_dtype"], torch.float32)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, attn_implementation=attn, trust_remote_code=trust
        )
    else:
        from openrlhf_bonesoup.integration.models import LoaderUnavailable, load_openrlhf_reward_model

        kwargs = {**model_kwargs, "attn_implementation": attn}
        # Packed rows (no attention mask) are right only with flash attention's variable-length kernels;
        # padded rows are right with any attention.
        kwargs["packing_samples"] = kwargs.get("packing_samples", False) and attn.startswith("flash")
        try:
            model = load_openrlhf_reward_model(path, **kwargs)
        except LoaderUnavailable as e:
            raise BoneSoupError(
                f"objective {objective.name}: OpenRLHF's reward model loader cannot import here ({e}); "
                "install openrlhf with its flash-attn, or use an HF *ForSequenceClassification checkpoint"
            ) from None
    tokenizer = AutoTokenizer.from_pretrained(objective.spec.get("tokenizer", path), trust_remote_code=trust)
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
# Pre-flight: what can be known of a model objective from its config.json and safetensors headers,
# checked before Ray, DeepSpeed or vLLM start (launcher, soup init) and again where it loads.


def check_models(specs: Sequence[dict], *, ring_attention: bool = False) -> None:
    """Every model objective of `specs`: exists, its kind (HF classifier or OpenRLHF RM with a value
    head), its label, remote code only when trusted; no weights loaded. BoneSoupError, one line."""
    for spec in specs:
        if spec["kind"] == "model":
            check_model(spec, ring_attention=ring_attention, cached_only=True)


def check_model(
    spec: dict, *, ring_attention: bool = False, value_head_prefix: str | None = None, cached_only: bool = False
) -> tuple[dict, str]:
    """Pre-flight of one model objective; returns (its config.json as a dict, "classifier" | "openrlhf").
    value_head_prefix: the loader's, when config.json names none. cached_only: a hub id is checked only
    when its config is in the local Hugging Face cache (no network; else where it loads)."""
    from transformers import PretrainedConfig

    name, path = spec["name"], spec["path"]
    for where in {path, spec.get("tokenizer", path)}:
        _check_local(name, where)
    local = Path(path).is_dir()
    if local and not (Path(path) / "config.json").is_file():
        raise BoneSoupError(f"objective {name}: {path} has no config.json: it is not a checkpoint folder")
    # The config as a dict: deciding the kind of checkpoint must not run its remote code.
    try:
        config, _ = PretrainedConfig.get_config_dict(path, local_files_only=cached_only)
    except OSError:
        if cached_only and not local:  # a hub id not in the cache: checked where it loads
            return {}, "openrlhf"
        raise
    if config.get("auto_map") and not spec.get("trust_remote_code", False):
        raise BoneSoupError(
            f"objective {name}: {path} loads with its own Python code (auto_map); if you trust it, "
            "add `trust_remote_code: true` to this objective in an objectives file"
        )
    if _is_classifier(config):
        labels = len(config.get("id2label") or {}) or config.get("num_labels") or 2
        label = spec.get("label", 0 if labels == 1 else None)
        if label is None or label >= labels:
            raise BoneSoupError(
                f"objective {name}: {path} has {labels} labels: choose one with `label: k` (and `output: "
                "logit|prob`) in an objectives file"
            )
        if ring_attention and spec.get("attn_implementation", "").startswith("flash"):
            raise BoneSoupError(
                f"objective {name}: attn_implementation {spec['attn_implementation']} with --ds.ring_attn_size > 1: "
                "OpenRLHF's ring attention replaces transformers' flash attention in the reward actors with a "
                "kernel for packed causal batches; give this classifier sdpa or eager (the default there)"
            )
        return config, "classifier"
    _check_value_head(name, path, config.get("value_head_prefix", value_head_prefix))
    return config, "openrlhf"


def attention(spec: dict, config: dict, *, gpu: bool, ring_attention: bool = False) -> str:
    """The attention a model objective loads with: its spec's `attn_implementation`, else the best its
    model class supports: flash attention 2 (on a CUDA GPU with flash-attn installed), then sdpa, then
    eager. Never the policy's flag: DeBERTa-v2/v3 classifiers, common reward and safety models, support
    neither flash attention nor sdpa. Under ring attention a classifier gets no flash attention: OpenRLHF
    swaps transformers' flash-attention function, process-wide, for a kernel of packed causal batches.
    `serve` loads its objectives with this too. `config`: the checkpoint's config.json as a dict."""
    if "attn_implementation" in spec:
        return spec["attn_implementation"]
    cls = _model_class(spec, config)
    flash_ok = gpu and not (ring_attention and _is_classifier(config))
    if flash_ok and getattr(cls, "_supports_flash_attn", False):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def _model_class(spec: dict, config: dict) -> Any:
    """The class transformers instantiates for this checkpoint: the classifier's, or the base model's that
    OpenRLHF's loader wraps (`AutoModel._model_mapping`, as get_llm_for_sequence_regression looks it up)."""
    from transformers import CONFIG_MAPPING, AutoModel, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if _is_classifier(config) else AutoModel
    remote = (config.get("auto_map") or {}).get(auto.__name__)
    if remote and spec.get("trust_remote_code", False):
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(remote, spec["path"])
    try:
        return auto._model_mapping[CONFIG_MAPPING[config["model_type"]]]
    except KeyError:
        return None  # a model transformers does not know: the loader names the problem


def _is_classifier(config: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _check_value_head(name: str, path: str, prefix: str | None) -> None:
    """A local checkpoint without the value head's weights is a causal LM, not a reward model:
    OpenRLHF's loader would score it with a freshly initialised head (only transformers' MISSING note)."""
    prefix = prefix or "score"
    folder = Path(path)
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        names = set(json.loads(index[0].read_text())["weight_map"])
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            return  # a hub id, or pickled weights we do not open: OpenRLHF's loader decides
        from safetensors import safe_open

        names = set()
        for f in files:
            with safe_open(f, framework="pt") as handle:
                names.update(handle.keys())
    if f"{prefix}.weight" not in names:
        raise BoneSoupError(
            f"objective {name}: {folder} has no value head `{prefix}.weight`: it is not a reward model "
            "(a causal LM would be scored by a random head); give an OpenRLHF RM or an HF *ForSequenceClassification"
        )
