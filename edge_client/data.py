"""Instruction data: JSONL records (`instruction`, `input`, `output`, optional `category`),
the Alpaca prompt, and tokenisation with the loss on response tokens only."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["load_jsonl", "validate_record", "format_prompt", "tokenize_record", "IGNORE_INDEX"]

IGNORE_INDEX = -100
_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
               "context. Write a response that appropriately completes the request.\n\n"
               "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
             "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def validate_record(record, index: int = 0) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"record {index} must be a JSON object, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"record {index} needs a non-empty string {key!r}, got {record.get(key)!r:.60}")
    for key in ("input", "category"):
        if key in record and record[key] is not None and not isinstance(record[key], str):
            raise ValueError(f"record {index} field {key!r} must be a string, got {record[key]!r:.60}")
    return {"instruction": record["instruction"], "input": record.get("input") or "",
            "output": record["output"], "category": record.get("category") or ""}


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for every non-blank line of a JSONL file; a line that is
    not JSON raises ValueError naming the file and line. The one JSONL reader of the project
    (client data here, the simulation suite and the experiment converters in ``server``)."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from None


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    records = [validate_record(obj, lineno) for lineno, obj in iter_jsonl(path)]
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def format_prompt(record: dict) -> str:
    template = _WITH_INPUT if record.get("input") else _NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def tokenize_record(tokenizer, record: dict, max_len: int) -> tuple[list[int], list[int]]:
    """input_ids and labels (prompt tokens masked with IGNORE_INDEX); response kept when truncating."""
    prompt_ids = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    keep_prompt = max(1, max_len - len(response_ids))
    prompt_ids = prompt_ids[-keep_prompt:] if len(prompt_ids) > keep_prompt else prompt_ids
    ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_len]
    return ids, labels


def as_records(data: Iterable[dict] | str | os.PathLike) -> list[dict]:
    if isinstance(data, (str, os.PathLike)):
        return load_jsonl(data)
    records = [validate_record(r, i) for i, r in enumerate(data)]
    if not records:
        raise ValueError("records must not be empty")
    return records


def prompts_of(records: Sequence[dict]) -> list[str]:
    return [format_prompt(r) for r in records]
