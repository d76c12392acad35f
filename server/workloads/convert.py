"""Real instruction data -> the client JSONL format, and a suite with one client per category.

Client JSONL: one JSON object per line with string fields ``instruction``, ``input``,
``output`` and ``category``; the category names the client (FlexLoRA's setting: one Natural
Instructions task per client, Bai et al. 2024 Sec. 5.1).

* Natural Instructions (``allenai/natural-instructions`` ``tasks/taskNNN_*.json``): one task
  file is one client; ``instruction`` is the task's ``Definition``, every instance gives
  ``input`` and its first ``output``; ``category`` is the file's stem (the task name).
* Dolly-15K (``databricks-dolly-15k.jsonl``): ``instruction``, ``context`` -> ``input``,
  ``response`` -> ``output``, ``category`` as given (8 categories = 8 clients).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from edge_client.data import iter_jsonl
from server.workloads.catalog import read_json
from server.workloads.suite import ClientData, Suite, read_jsonl

__all__ = ["natural_instructions_records", "dolly_records", "convert_natural_instructions",
           "convert_dolly", "suite_by_category"]


def _task_files(inputs: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for i, item in enumerate(inputs):
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.glob("task*.json"))
            if not found:
                raise ValueError(f"inputs[{i}]: folder {p} has no task*.json files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"inputs[{i}]: {p} does not exist")
    return files


def natural_instructions_records(path: str | Path, *, max_per_task: int | None = None,
                                 seed: int = 0) -> list[dict[str, str]]:
    """Client records of one Natural Instructions task file (client = task)."""
    path = Path(path)
    task = read_json(path, "task file")
    if not isinstance(task, dict):
        raise ValueError(f"{path}: expected a task object, got {type(task).__name__}")
    definition = task.get("Definition")
    if isinstance(definition, list):
        definition = definition[0] if definition and isinstance(definition[0], str) else None
    if not isinstance(definition, str) or not definition.strip():
        raise ValueError(f"{path}: 'Definition' must be a non-empty string or list of strings")
    instances = task.get("Instances")
    if not isinstance(instances, list) or not instances:
        raise ValueError(f"{path}: 'Instances' must be a non-empty list")
    records = []
    for j, inst in enumerate(instances):
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str):
            raise ValueError(f"{path}: Instances[{j}] needs a string 'input'")
        outputs = inst.get("output")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], str):
            raise ValueError(f"{path}: Instances[{j}] needs 'output' as a non-empty list of strings")
        records.append({"instruction": definition.strip(), "input": inst["input"], "output": outputs[0],
                        "category": path.stem})
    if max_per_task is not None:
        if max_per_task < 1:
            raise ValueError(f"max_per_task must be >= 1, got {max_per_task}")
        if len(records) > max_per_task:
            keep = sorted(random.Random(f"{seed}-{path.stem}").sample(range(len(records)), max_per_task))
            records = [records[k] for k in keep]
    return records


def dolly_records(path: str | Path) -> tuple[list[dict[str, str]], int]:
    """Client records of Dolly-15K JSONL (client = category); returns (records, skipped lines)."""
    records, skipped = [], 0
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected an object")
        fields = {k: rec.get(k, "") for k in ("instruction", "context", "response", "category")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{path}:{lineno}: fields {bad} must be strings")
        if not fields["instruction"].strip() or not fields["response"].strip():
            skipped += 1           # nothing to learn from; Dolly has a handful of these
            continue
        records.append({"instruction": fields["instruction"], "input": fields["context"],
                        "output": fields["response"], "category": fields["category"] or "default"})
    if not records:
        raise ValueError(f"{path}: no usable records")
    return records, skipped


def _write(records: Sequence[dict[str, str]], output: str | Path) -> None:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(out)


def convert_natural_instructions(inputs: Iterable[str | Path], output: str | Path, *,
                                 max_per_task: int | None = None, seed: int = 0) -> dict:
    files = _task_files(inputs)
    if not files:
        raise ValueError("inputs: no Natural Instructions task files given")
    records = [r for f in files for r in natural_instructions_records(f, max_per_task=max_per_task, seed=seed)]
    _write(records, output)
    return {"records": len(records), "clients": len(files), "skipped": 0}


def convert_dolly(path: str | Path, output: str | Path) -> dict:
    records, skipped = dolly_records(path)
    _write(records, output)
    return {"records": len(records), "clients": len({r["category"] for r in records}), "skipped": skipped}


def suite_by_category(path: str | Path, *, num_clients: int, num_heldout: int, seed: int,
                      heldout_examples: int | None = None) -> Suite:
    """One client per category (the paper's client = task): ``num_heldout`` categories are
    held out whole (unseen clients), up to ``num_clients`` of the rest train, chosen by seed."""
    records = read_jsonl(path)
    cats: dict[str, list[dict[str, str]]] = {}
    for rec in records:
        cats.setdefault(rec["category"], []).append(rec)
    names = sorted(cats)
    if len(names) < num_heldout + 1:
        raise ValueError(f"{path}: {len(names)} categories; need at least num_heldout + 1 = {num_heldout + 1}")
    random.Random(f"split-{seed}").shuffle(names)
    held, train = names[:num_heldout], names[num_heldout:num_heldout + num_clients]
    heldout = []
    for j, c in enumerate(held):
        ex = cats[c]
        if heldout_examples is not None and len(ex) > heldout_examples:
            ex = random.Random(f"heldout-{seed}-{c}").sample(ex, heldout_examples)
        heldout.append(ClientData(client_id=f"heldout-{j:03d}", families=[c], examples=ex))
    clients = [ClientData(client_id=f"client-{i:03d}", families=[c], examples=cats[c])
               for i, c in enumerate(sorted(train))]
    return Suite(train=clients, heldout=heldout)
