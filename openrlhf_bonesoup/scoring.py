"""Scoring: raw per-objective values (N, n) of rollouts or texts, before normalisation.

One core, `raw_scores`, serves the reward actors (rollouts as policy token ids), the rollout-side
`reward_func` file (OpenRLHF's query text), `score` and `evaluate` (prompt + response text), so
evaluation scores text exactly as training did. Normalisation and the weighted sum are combiners.py's.

Tokenizer bridging: an OpenRLHF RM with the policy's vocabulary and eos gets the rollout ids directly
(what upstream's RewardModelActor does, no decode); any other model gets the text decoded without the
policy's special tokens and re-encoded with its own tokenizer (OpenRLHF RMs in the exact format of
OpenRLHF's RewardDataset: `text + " " + eos`, eos forced last). HTTP and function objectives get
OpenRLHF's own query text (the decode with special tokens kept), the prompt and the dataset label.

HTTP requests use urllib from the stdlib: one POST per `raw_scores` call and endpoint, holding every
sample of the call, endpoints concurrently in threads, each bounded by its `deadline` (retries and
backoff included). A reward actor calls it once per micro-batch, `score` and `evaluate` once per batch
of texts; on the reward_func route upstream calls `reward_func` one sample at a time
(integration/reward_func.py), so there it is one POST per sample and endpoint.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from openrlhf_bonesoup import files
from openrlhf_bonesoup.coefficients import clean
from openrlhf_bonesoup.errors import BoneSoupError
from openrlhf_bonesoup.objectives import DEFAULT_MAX_LEN, Objective

DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 60.0  # seconds for one request
DEFAULT_DEADLINE = 180.0  # seconds for one call, retries included: a dead endpoint stops a step this fast


def policy_texts(policy_tokenizer: Any, input_ids: Any, attention_mask: Any, keep_special: bool = False) -> list[str]:
    """Rollout ids -> text without padding. keep_special=False drops the policy's special tokens (bos,
    eos, chat markers): the text a model with another tokenizer reads. keep_special=True is OpenRLHF's
    query, what upstream sends to remote RMs and reward_func files."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
    return policy_tokenizer.batch_decode(rows, skip_special_tokens=not keep_special)


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
        futures = {i: pool.submit(_call_http, o, list(queries), prompts, labels) for i, o in http}
        for i, o in enumerate(objectives):
            if o.kind == "model":
                columns[i] = _score_model(o, texts, policy_ids, forward_kwargs)
            elif o.kind == "function":
                columns[i] = _call_function(o, list(queries), prompts, labels)
        columns.update({i: f.result() for i, f in futures.items()})
    columns = {i: np.asarray(c, dtype=np.float64).reshape(-1) for i, c in columns.items()}
    for i, o in enumerate(objectives):
        if columns[i].size != size:
            raise RuntimeError(f"objective {o.name} returned {columns[i].size} values for {size} samples")
    return np.stack([columns[i] for i in range(len(objectives))], axis=1)


def score_texts(
    objectives: Sequence[Objective],
    prompts: Sequence[str],
    responses: Sequence[str],
    labels: Sequence[Any] | None = None,
) -> np.ndarray:
    """Raw per-objective values (N, n) of prompt/response pairs."""
    if len(prompts) != len(responses):
        raise BoneSoupError(f"{len(prompts)} prompts but {len(responses)} responses")
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    return raw_scores(objectives, texts=texts, prompts=prompts, labels=labels)


def _score_model(o: Objective, texts: Sequence[str] | None, policy_ids: tuple | None, forward_kwargs: dict):
    import torch

    with o.lock, torch.no_grad():
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


def _call_function(o: Objective, queries: list[str], prompts: list, labels: list) -> np.ndarray:
    result = o.func(queries, prompts, labels)
    if isinstance(result, dict) and "rewards" not in result:
        raise RuntimeError(f"objective {o.name}: reward_func returned a dict without 'rewards'")
    result = result["rewards"] if isinstance(result, dict) else result
    return np.asarray(result.float().cpu() if hasattr(result, "float") else result, dtype=np.float64)


def _call_http(o: Objective, queries: list[str], prompts: list, labels: list) -> np.ndarray:
    """POST these samples at once; retry with backoff, all within the objective's deadline; raise, never a
    silent zero."""
    retries = o.spec.get("retries", DEFAULT_RETRIES)
    deadline = time.monotonic() + o.spec.get("deadline", DEFAULT_DEADLINE)
    data = json.dumps({"query": queries, "prompts": prompts, "labels": labels}).encode()
    error: Exception | None = None
    for attempt in range(retries + 1):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            request = urllib.request.Request(o.spec["url"], data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=min(o.spec.get("timeout", DEFAULT_TIMEOUT), left)) as response:
                rewards = np.asarray(json.loads(response.read())["rewards"], dtype=np.float64).reshape(-1)
            if rewards.size != len(queries):
                raise ValueError(f"got {rewards.size} rewards for {len(queries)} queries")
            return rewards
        except (OSError, ValueError, KeyError, TypeError) as e:  # URLError/HTTPError/timeouts are OSErrors
            error = e
            if attempt < retries:
                time.sleep(max(0.0, min(0.5 * 2**attempt, 8.0, deadline - time.monotonic())))
    raise RuntimeError(
        f"objective {o.name}: {o.spec['url']} gave no reward within {o.spec.get('deadline', DEFAULT_DEADLINE):g} s "
        f"({attempt + 1} attempts); last error: {error!r}"
    )


def read_jsonl(path: str | os.PathLike, fields: Sequence[str]) -> list[dict]:
    """Records of a JSONL file, each a dict with string `fields`; one-line errors naming the line."""
    path = Path(path)
    if not path.is_file():
        raise BoneSoupError(f"input file {path} does not exist")
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BoneSoupError(f"{path}:{line_no} is not JSON: {e}") from None
            if not (isinstance(record, dict) and all(isinstance(record.get(k), str) for k in fields)):
                raise BoneSoupError(f"{path}:{line_no} needs string fields {' and '.join(fields)}")
            records.append(record)
    if not records:
        raise BoneSoupError(f"{path} holds no records")
    return records


def score_records(
    objectives: Sequence[Objective],
    combination: Any,
    records: Sequence[dict],
    output_path: str | os.PathLike,
    batch_size: int = 16,
) -> np.ndarray:
    """Score {"prompt", "response"[, "label"]} records (read_jsonl); write each with "rewards" (per
    objective, as the combiner sees them) and "reward" (combined by `combination`, a
    combiners.Combination). Returns the raw values (N, n). Written to a temporary file and renamed:
    no half file is left.
    """
    from tqdm import tqdm

    output_path = Path(output_path)
    raw = []
    tmp = files.temporary(output_path)
    try:
        with open(tmp, "w") as out:
            for start in tqdm(range(0, len(records), batch_size), desc="scoring", disable=None):
                batch = records[start : start + batch_size]
                prompts, responses = [r["prompt"] for r in batch], [r["response"] for r in batch]
                batch_raw = score_texts(objectives, prompts, responses, [r.get("label") for r in batch])
                rewards, values = combination(batch_raw)
                for record, row, reward in zip(batch, values, rewards, strict=True):
                    out.write(json.dumps({**record, "rewards": clean(row), "reward": clean(float(reward))}) + "\n")
                raw.append(batch_raw)
        files.replace_durably(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.concatenate(raw)
