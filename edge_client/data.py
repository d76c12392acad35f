"""Instruction data: JSONL records (`instruction`, `input`, `output`, optional `category`),
the prompt template, and tokenisation with the loss on response tokens only."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

__all__ = ["load_jsonl", "iter_jsonl", "validate_record", "format_prompt", "prompt_ids", "tokenize_record", "as_records",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _from_chat_or_completion(record: dict, index: int) -> dict:
    """Chat-style ``messages`` (the last must be the assistant's) or ``prompt``/``completion`` as an
    instruction record; ``messages`` is kept so a tokenizer's chat template can format it."""
    if "messages" in record:
        msgs = record["messages"]
        ok = isinstance(msgs, list) and len(msgs) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if not ok or msgs[-1]["role"] != "assistant":
            raise ValueError(f"record {index}: 'messages' must be a list of {{role, content}} objects ending with "
                             "the assistant's reply")
        prompt = "\n".join(m["content"] for m in msgs[:-1])
        return {"instruction": prompt, "output": msgs[-1]["content"], "category": record.get("category"),
                "messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    return {"instruction": record.get("prompt"), "output": record.get("completion"),
            "category": record.get("category")}


def validate_record(record, index: int = 0) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"record {index} must be a JSON object, got {type(record).__name__}")
    if "instruction" not in record and ("messages" in record or "prompt" in record):
        converted = _from_chat_or_completion(record, index)
        out = validate_record({k: v for k, v in converted.items() if k != "messages"}, index)
        if "messages" in converted:
            out["messages"] = converted["messages"]
        return out
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
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})"
                                 ) from None
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
    if not isinstance(record, str) and record.get("messages") and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
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


def collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """``(input_ids, attention_mask, labels)`` tensors of tokenised records, right-padded to the
    longest (``pad_id``; labels padded with ``IGNORE_INDEX``)."""
    import torch

    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (i, lab) in enumerate(items):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(i)] = 1
    return ids, mask, labels


def score_answers(model, tokenizer, records: Sequence[Mapping[str, str]], *, max_length: int,
                  batch_size: int = 32) -> dict[str, float]:
    """Teacher-forced scores of the response tokens of ``records`` under ``model`` (no gradient):
    ``loss`` (mean cross-entropy per response token), ``token_accuracy`` (the argmax is the
    response token) and ``exact`` (the share of records whose every response token, ``eos``
    included, is the argmax: greedy decoding would write exactly the answer)."""
    import torch

    encoded = [tokenize_record(tokenizer, r, max_length) for r in records]
    total, count, right, exact = 0.0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            ids, mask, labels = collate(encoded[start:start + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            scored = target != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[scored], target[scored], reduction="sum"))
            hit = (logits.argmax(-1) == target) & scored
            right += int(hit.sum())
            count += int(scored.sum())
            exact += int(((hit | ~scored).all(dim=1) & scored.any(dim=1)).sum())
    return {"loss": total / max(count, 1), "token_accuracy": right / max(count, 1),
            "exact": exact / max(len(encoded), 1)}


def as_records(data: Iterable[dict] | str | os.PathLike) -> list[dict]:
    if isinstance(data, (str, os.PathLike)):
        return load_jsonl(data)
    records = [validate_record(r, i) for i, r in enumerate(data)]
    if not records:
        raise ValueError("records must not be empty")
    return records


