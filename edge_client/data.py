"""Instruction data: JSONL records (`instruction`, `input`, `output`, optional `category`),
the prompt template, and tokenisation with the loss on response tokens only."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping

__all__ = ["load_jsonl", "iter_jsonl", "validate_record", "format_prompt", "prompt_ids", "tokenize_record", "as_records",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100


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


def format_prompt(record: Mapping[str, str]) -> str:
    """The one prompt template of the project (device, simulation, evaluation): a compact
    Alpaca-style prompt; the response follows it directly."""
    if record.get("input"):
        return f"### Instruction:\n{record['instruction']}\n### Input:\n{record['input']}\n### Response:\n"
    return f"### Instruction:\n{record['instruction']}\n### Response:\n"


def prompt_ids(tokenizer, record: Mapping[str, str] | str) -> list[int]:
    """Token ids of the prompt (``bos`` first when the tokenizer has one); a string is taken as an
    already formatted prompt."""
    text = record if isinstance(record, str) else format_prompt(record)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def tokenize_record(tokenizer, record: Mapping[str, str], max_len: int) -> tuple[list[int], list[int]]:
    """input_ids and labels (prompt tokens masked with IGNORE_INDEX); the response is kept when
    truncating (the prompt loses tokens from its start), then cut at ``max_len``."""
    prompt = prompt_ids(tokenizer, record)
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    keep_prompt = max(1, max_len - len(response))
    prompt = prompt[-keep_prompt:] if len(prompt) > keep_prompt else prompt
    ids = (prompt + response)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_len]
    return ids, labels


def as_records(data: Iterable[dict] | str | os.PathLike) -> list[dict]:
    if isinstance(data, (str, os.PathLike)):
        return load_jsonl(data)
    records = [validate_record(r, i) for i, r in enumerate(data)]
    if not records:
        raise ValueError("records must not be empty")
    return records


