"""Converters from Natural Instructions / Dolly-15K to client JSONL, on files the tests write."""

from __future__ import annotations

import json

import pytest

from server.runtimes.experiments.cli import main
from server.workloads.convert import (
    convert_dolly,
    convert_natural_instructions,
    natural_instructions_records,
    suite_by_category,
)
from server.workloads.suite import read_jsonl


def _ni_task(path, definition, instances):
    path.write_text(json.dumps({"Contributors": ["x"], "Source": ["y"], "Categories": ["Question Answering"],
                                "Definition": definition, "Positive Examples": [], "Negative Examples": [],
                                "Instances": instances}), encoding="utf-8")
    return path


def _dolly(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_natural_instructions_one_client_per_task(tmp_path):
    a = _ni_task(tmp_path / "task001_add.json", ["Add the numbers."],
                 [{"id": "a1", "input": "1 2", "output": ["3", "three"]}, {"id": "a2", "input": "2 2", "output": ["4"]}])
    b = _ni_task(tmp_path / "task002_echo.json", "Repeat the input.",
                 [{"id": "b1", "input": "hi", "output": ["hi"]}])
    out = tmp_path / "clients.jsonl"
    stats = convert_natural_instructions([a, b], out)
    assert stats == {"records": 3, "clients": 2, "skipped": 0}
    recs = read_jsonl(out)
    assert recs[0] == {"instruction": "Add the numbers.", "input": "1 2", "output": "3", "category": "task001_add"}
    assert [r["category"] for r in recs] == ["task001_add", "task001_add", "task002_echo"]
    assert recs[2]["instruction"] == "Repeat the input."
    # a folder works the same, in file-name order
    assert convert_natural_instructions([tmp_path], tmp_path / "again.jsonl")["records"] == 3


def test_natural_instructions_max_per_task_is_seeded(tmp_path):
    task = _ni_task(tmp_path / "task003_many.json", ["Copy."],
                    [{"id": str(i), "input": f"x{i}", "output": [f"x{i}"]} for i in range(20)])
    one = natural_instructions_records(task, max_per_task=5, seed=1)
    assert len(one) == 5 and one == natural_instructions_records(task, max_per_task=5, seed=1)
    assert one != natural_instructions_records(task, max_per_task=5, seed=2)


@pytest.mark.parametrize("definition,instances,match", [
    ([], [{"input": "a", "output": ["b"]}], "Definition"),
    (["Do it."], [], "Instances"),
    (["Do it."], [{"input": "a", "output": []}], r"Instances\[0\]"),
    (["Do it."], [{"input": "a", "output": ["b"]}, {"output": ["b"]}], r"Instances\[1\]"),
])
def test_natural_instructions_bad_files_name_the_problem(tmp_path, definition, instances, match):
    task = _ni_task(tmp_path / "task009_bad.json", definition, instances)
    with pytest.raises(ValueError, match=match):
        natural_instructions_records(task)


def test_dolly_maps_fields_and_skips_empty_rows(tmp_path):
    src = _dolly(tmp_path / "dolly.jsonl", [
        {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare", "category": "open_qa"},
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
        {"instruction": "Empty answer", "context": "", "response": "  ", "category": "open_qa"},
    ])
    out = tmp_path / "clients.jsonl"
    stats = convert_dolly(src, out)
    assert stats == {"records": 2, "clients": 2, "skipped": 1}
    recs = read_jsonl(out)
    assert recs[1] == {"instruction": "Summarise.", "input": "A long text.", "output": "Short.",
                       "category": "summarization"}


def test_dolly_bad_line_names_line(tmp_path):
    src = tmp_path / "dolly.jsonl"
    src.write_text('{"instruction": "a", "response": "b", "category": "c"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"dolly.jsonl:2"):
        convert_dolly(src, tmp_path / "o.jsonl")


def test_suite_by_category_holds_out_whole_categories(tmp_path):
    rows = [{"instruction": "i", "context": "", "response": f"r{k}", "category": f"cat{k % 5}"} for k in range(40)]
    out = tmp_path / "clients.jsonl"
    convert_dolly(_dolly(tmp_path / "d.jsonl", rows), out)
    suite = suite_by_category(out, num_clients=10, num_heldout=2, seed=0, heldout_examples=3)
    held = {c.families[0] for c in suite.heldout}
    train = {c.families[0] for c in suite.train}
    assert len(held) == 2 and len(train) == 3 and not held & train
    assert all(len(c.examples) == 3 for c in suite.heldout)
    assert all(len(c.examples) == 8 and {e["category"] for e in c.examples} == set(c.families) for c in suite.train)
    with pytest.raises(ValueError, match="categories"):
        suite_by_category(out, num_clients=10, num_heldout=5, seed=0)


def test_cli_convert_and_one_line_errors(tmp_path, capsys):
    src = _dolly(tmp_path / "d.jsonl", [{"instruction": "a", "context": "", "response": "b", "category": "c"}])
    assert main(["convert", "dolly", str(src), "-o", str(tmp_path / "o.jsonl")]) == 0
    assert "wrote 1 records in 1 clients" in capsys.readouterr().out
    assert main(["convert", "ni", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
