"""Prompt files for the paper's two settings, in the formats their reward models were trained on.

    python examples/scripts/prepare_prompts.py hh data/        # data/hh_{train,val,test}.jsonl
    python examples/scripts/prepare_prompts.py summary data/   # data/summary_{train,val,test}.jsonl

One JSON line per prompt, `{"input": ...}` (OpenRLHF's default --data.input_key), no template:
- hh: Anthropic/hh-rlhf; the dialogue of the chosen reply up to its last "\\n\\nAssistant:", cut as the
  reference code cuts it. train: the train split; test: the test split.
- summary: openai/summarize_from_feedback ("comparisons"), posts of 100 to 1200 characters, one prompt per
  post, in the reference's format "### Instruction: ... ### Input: {post} ### Response: ", which
  examples/objectives/summary_*.py read back. train: the train split; test: the first 2000 posts of the
  validation split.
val (the --alpha auto split) is the last 200 prompts of train, left out of the training file.
Needs the Hugging Face datasets (downloaded here, or already in the HF cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASSISTANT = "\n\nAssistant:"
SUMMARY_INSTRUCTION = "Generate a one-sentence summary of this post."
VAL_SIZE = 200


def hh_prompt(chosen: str) -> str:
    """The HH-RLHF dialogue before the final assistant reply, ending with "\\n\\nAssistant:"."""
    return ASSISTANT.join(chosen.split(ASSISTANT)[:-1]) + " " + ASSISTANT


def summary_prompt(post: str) -> str:
    return f"### Instruction: {SUMMARY_INSTRUCTION} ### Input: {post.replace(chr(10), ' ')} ### Response: "


def prompts(setting: str, split: str) -> list[str]:
    from datasets import load_dataset

    if setting == "hh":
        return [hh_prompt(row["chosen"]) for row in load_dataset("Anthropic/hh-rlhf", split=split)]
    rows = load_dataset("openai/summarize_from_feedback", "comparisons", split=split)
    seen, out = set(), []
    for row in rows:
        post, post_id = row["info"]["post"], row["info"]["id"]
        if post is not None and 100 < len(post) < 1200 and post_id not in seen:  # comparisons repeat posts
            seen.add(post_id)
            out.append(summary_prompt(post))
    return out


def write(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"input": t}) + "\n" for t in texts))
    print(f"{path}: {len(texts)} prompts")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as every script here answers a wrong argument
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting", choices=["hh", "summary"])
    parser.add_argument("output", type=Path, help="folder for <setting>_{train,val,test}.jsonl")
    parser.add_argument("--dry_run", action="store_true", help="print what would be downloaded and written")
    args = parser.parse_args()
    name = {"hh": "Anthropic/hh-rlhf", "summary": "openai/summarize_from_feedback comparisons"}[args.setting]
    files = [args.output / f"{args.setting}_{split}.jsonl" for split in ("train", "val", "test")]
    if args.dry_run:
        print(f"load {name} (train and {'test' if args.setting == 'hh' else 'validation'} splits)")
        print(f"write {', '.join(map(str, files))}")
        return
    args.output.mkdir(parents=True, exist_ok=True)
    train = prompts(args.setting, "train")
    test = prompts(args.setting, "test") if args.setting == "hh" else prompts(args.setting, "validation")[:2000]
    for path, texts in zip(files, (train[:-VAL_SIZE], train[-VAL_SIZE:], test), strict=True):
        write(path, texts)


if __name__ == "__main__":
    main()
