"""The real-content instruction suite (server.workloads.real_suite / real_tasks), issue 20."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pycountry")
pytest.importorskip("periodictable")
pytest.importorskip("tzdata")

from edge_client.data import load_jsonl  # noqa: E402
from server.workloads.real_suite import (  # noqa: E402
    RealSuiteConfig,
    build_real_suite,
    export_jsonl,
    real_suite,
    split_evaluators,
)
from server.workloads.real_tasks import KINDS, TASKS, number_words, roman  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# one plain fact per task, checked by hand against the source (or the rule)
FACTS = {
    "unicode_name": ("é", "LATIN SMALL LETTER E WITH ACUTE"),
    "unicode_char": ("GREEK SMALL LETTER ALPHA", "α"),
    "html_entity": ("&eacute;", "é"),
    "http_reason": ("404", "Not Found"),
    "country_name": ("FR", "France"),
    "country_alpha3": ("Germany", "DEU"),
    "country_numeric": ("France", "250"),
    "country_official": ("France", "French Republic"),
    "currency_name": ("EUR", "Euro"),
    "currency_numeric": ("Euro", "978"),
    "language_name": ("de", "German"),
    "language_alpha3": ("German", "deu"),
    "element_symbol": ("iron", "Fe"),
    "element_name": ("26", "iron"),
    "element_mass": ("Fe", "55.85"),
    "tz_offset": ("Europe/Paris", "UTC+01:00"),
    "mime_type": (".pdf", "application/pdf"),
    "date_words": None, "weekday": None, "roman_numeral": None, "number_words": None, "sort_symbols": None,
    "days_in_month": ("February 2000", "29"),
    "utf8_bytes": ("é", "C3 A9"),
    "code_point": ("é", "U+00E9"),
    "digit_value": ("٣", "3"),
    "unicode_category": ("é", "lowercase letter"),
    "unicode_script": ("ж", "Cyrillic"),
    "http_class": ("503", "server error"),
    "leap_year": ("1900", "no"),
    "python_keyword": ("lambda", "yes"),
    "tz_dst": ("Asia/Tokyo", "no"),
    "element_period": ("iron", "4"),
}


def test_task_table_size_kinds_and_wording():
    assert len(TASKS) >= 24
    assert {t.kind for t in TASKS.values()} == set(KINDS)
    assert len({t.instruction for t in TASKS.values()}) == len(TASKS)        # each its own wording
    assert all(t.source for t in TASKS.values())
    assert set(FACTS) == set(TASKS)
    for name, task in TASKS.items():
        items = task.items()
        assert len(items) >= 60, name
        assert len({i for i, _ in items}) == len(items) and items == sorted(items), name
        assert all(i.strip() and o.strip() for i, o in items), name


@pytest.mark.parametrize("task", sorted(k for k, v in FACTS.items() if v is not None))
def test_task_facts_match_the_source(task):
    inp, out = FACTS[task]
    assert dict(TASKS[task].items())[inp] == out


def test_rule_tasks_against_plain_references():
    assert [number_words(n) for n in (0, 13, 40, 342, 1000, 1001, 20_019, 999_999)] == [
        "zero", "thirteen", "forty", "three hundred forty-two", "one thousand", "one thousand one",
        "twenty thousand nineteen", "nine hundred ninety-nine thousand nine hundred ninety-nine"]
    assert [roman(n) for n in (1, 4, 9, 14, 40, 90, 400, 1994, 2024, 3999)] == [
        "I", "IV", "IX", "XIV", "XL", "XC", "CD", "MCMXCIV", "MMXXIV", "MMMCMXCIX"]
    for task, fn in (("roman_numeral", roman), ("number_words", number_words)):
        assert all(fn(int(i)) == o for i, o in TASKS[task].items())
    weekday = dict(TASKS["weekday"].items())
    assert all(o in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
               for o in weekday.values())
    import datetime as dt
    for inp, out in list(weekday.items())[:50]:
        assert dt.date.fromisoformat(inp).strftime("%w") == str(("Sunday", "Monday", "Tuesday", "Wednesday",
                                                                 "Thursday", "Friday", "Saturday").index(out))
    assert all(o == " ".join(sorted(i.split())) for i, o in TASKS["sort_symbols"].items())
    assert all(o.split()[1] in ("January", "February", "March", "April", "May", "June", "July", "August",
                                "September", "October", "November", "December") for o in dict(
        TASKS["date_words"].items()).values())


def _all_inputs(clients, task):
    return {r["input"] for c in clients for r in c.examples if r["category"] == task}


def test_clients_splits_and_heldout():
    s = real_suite(RealSuiteConfig(seed=1))
    unseen, seen = s.unseen_tasks(), s.seen_tasks()
    assert len(unseen) == 6 and len({TASKS[t].kind for t in unseen}) == 3
    assert not set(unseen) & set(seen) and not s.unused_tasks
    assert len(seen) == len(TASKS) - 6
    assert len(s.train) == 20
    for c in s.train:
        assert 1 <= len(c.families) <= 2
        assert {r["category"] for r in c.examples} == set(c.families)
        assert all(r["instruction"] == TASKS[r["category"]].instruction for r in c.examples)
    assert len({len(c.examples) for c in s.train}) >= 4                      # unequal sizes
    two = [c for c in s.train if len(c.families) == 2]
    assert two and all(len({sum(r["category"] == f for r in c.examples) for f in c.families}) == 2 for c in two)
    assert [c.families[0] for c in s.heldout_seen] == sorted(seen)
    for c in s.heldout_seen:      # held-out examples of seen tasks: inputs no client trains on
        task = c.families[0]
        assert len(c.examples) == 8 and not {r["input"] for r in c.examples} & _all_inputs(s.train, task)
    for c in s.heldout_unseen:
        assert len(c.examples) == 16 and not _all_inputs(s.train, c.families[0])
    assert real_suite(RealSuiteConfig(seed=2)).unseen_tasks() != unseen or \
        real_suite(RealSuiteConfig(seed=2)).train[0].examples != s.train[0].examples


def test_few_clients_leave_tasks_unused_and_say_so():
    s = real_suite(RealSuiteConfig(num_clients=3, num_unseen_tasks=2, seed=0))
    assert len(s.seen_tasks()) == 4 and len(s.unused_tasks) == len(TASKS) - 2 - 4
    assert sorted(c.families[0] for c in s.heldout_seen) == s.seen_tasks()
    assert {m["task"]: m["split"] for m in s.manifest()["tasks"]}[s.unused_tasks[0]] == "unused"


def test_build_real_suite_is_a_runtime_suite():
    suite = build_real_suite(num_clients=8, num_heldout=3, heldout_examples=5, seed=0)
    assert len(suite.train) == 8 and len(suite.heldout) == 3
    assert all(len(c.examples) == 5 for c in suite.heldout)
    both = build_real_suite(num_clients=8, num_heldout=3, heldout_examples=5, seed=0, heldout="both")
    assert len(both.heldout) == 3 + len({t for c in suite.train for t in c.families})
    with pytest.raises(ValueError, match="heldout must be one of"):
        build_real_suite(num_clients=8, num_heldout=3, heldout_examples=5, seed=0, heldout="all")


def test_chosen_unseen_tasks_are_held_out_whole():
    chosen = ("sort_symbols", "date_words", "http_class")
    s = real_suite(RealSuiteConfig(num_unseen_tasks=3, unseen=chosen, seed=5))
    assert s.unseen_tasks() == sorted(chosen)
    assert not set(chosen) & set(s.seen_tasks()) and len(s.seen_tasks()) == len(TASKS) - 3
    for c in s.heldout_unseen:
        assert len(c.examples) == 16 and not _all_inputs(s.train, c.families[0])
    # the same choice is the same suite; the runtimes' builder and RunConfig pass it through
    assert real_suite(RealSuiteConfig(num_unseen_tasks=3, unseen=chosen, seed=5)).train == s.train
    built = build_real_suite(num_clients=20, num_heldout=3, heldout_examples=16, seed=5, unseen=chosen)
    assert [c.examples for c in built.heldout] == [c.examples for c in s.heldout_unseen]
    from server.runtimes.build import suite_for
    from server.runtimes.config import RunConfig
    cfg = RunConfig(suite="real", num_heldout=3, heldout_examples=16, seed=5, unseen_tasks=list(chosen))
    assert [c.examples for c in suite_for(cfg).heldout] == [c.examples for c in s.heldout_unseen]
    assert cfg.identity()["unseen_tasks"] == list(chosen) and "unseen_tasks" not in RunConfig().identity()
    for kw, match in [({"unseen_tasks": ("date_words",)}, "names 1 tasks but num_heldout is 4"),
                      ({"unseen_tasks": ("nope",), "num_heldout": 1}, "unknown tasks"),
                      ({"unseen_tasks": "date_words", "num_heldout": 1}, "list of task names"),
                      ({"unseen_tasks": ("weekday", "weekday"), "num_heldout": 2}, "duplicates")]:
        with pytest.raises(ValueError, match=match):
            RunConfig(suite="real", **kw)
    with pytest.raises(ValueError, match="needs suite 'real'"):
        RunConfig(suite="facts", num_heldout=1, unseen_tasks=("date_words",))


@pytest.mark.parametrize("kw, match", [({"num_clients": 0}, "num_clients"), ({"tasks": ("nope",)}, "unknown tasks"),
                                       ({"num_unseen_tasks": 40}, "leaves no task"),
                                       ({"unseen": ("weekday", "nope"), "num_unseen_tasks": 2}, "not in the suite"),
                                       ({"unseen": ("weekday", "weekday"), "num_unseen_tasks": 2}, "duplicates"),
                                       ({"unseen": ("weekday",)}, "names 1 tasks but num_unseen_tasks is 6"),
                                       ({"unseen": "weekday", "num_unseen_tasks": 1}, "the string"),
                                       ({"client_sizes": (8, 1)}, r"client_sizes\[1\]"),
                                       ({"tasks": ("weekday", "weekday")}, "duplicates")])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        RealSuiteConfig(**kw)


def test_export_jsonl_round_trips(tmp_path):
    s = real_suite(RealSuiteConfig(num_clients=6, seed=0))
    paths = export_jsonl(s, tmp_path)
    train = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines()]
    assert len(train) == sum(len(c.examples) for c in s.train)
    assert [{k: v for k, v in r.items() if k != "client"} for r in train] == [r for c in s.train for r in c.examples]
    assert [r["client"] for r in train] == [c.client_id for c in s.train for _ in c.examples]
    unseen = load_jsonl(paths["heldout_unseen"])        # the edge client's reader takes it as it is
    assert unseen == [r for c in s.heldout_unseen for r in c.examples]
    assert len(load_jsonl(paths["heldout_seen"])) == sum(len(c.examples) for c in s.heldout_seen)
    manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    assert {t["task"] for t in manifest["tasks"]} == set(TASKS)
    assert all(t["source"] and t["kind"] in KINDS for t in manifest["tasks"])
    assert {"python", "unicode", "pycountry", "periodictable", "tzdata"} <= set(manifest["sources"])


def test_same_bytes_in_another_process(tmp_path):
    """Deterministic across processes and hash seeds (no set or dict order leaks into the data)."""
    code = ("import sys; from server.workloads.real_suite import RealSuiteConfig, export_jsonl, real_suite; "
            "export_jsonl(real_suite(RealSuiteConfig(seed=5)), sys.argv[1])")
    outs = []
    for hashseed in ("1", "2"):
        out = tmp_path / hashseed
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": f"{ROOT}{os.pathsep}" +
               os.environ.get("PYTHONPATH", "")}
        # under -S (a worktree runner) site-packages come from PYTHONPATH, inherited here
        subprocess.run([sys.executable, *(["-S"] if sys.flags.no_site else []), "-c", code, str(out)], env=env,
                       check=True, cwd=ROOT)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1]
    export_jsonl(real_suite(RealSuiteConfig(seed=5)), tmp_path / "here")
    assert outs[0] == {p.name: p.read_bytes() for p in sorted((tmp_path / "here").iterdir())}


def test_split_evaluators_report_rouge_exact_and_loss():
    import copy

    from server.workloads.model import load_base

    model, tok = load_base(None)
    s = real_suite(RealSuiteConfig(num_clients=2, num_unseen_tasks=1, seen_heldout_examples=2, unseen_examples=2,
                                   seed=0))
    evaluators = split_evaluators(model, tok, copy.deepcopy(model.state_dict()), s, max_new_tokens=4)
    assert sorted(evaluators) == ["seen", "unseen"]
    for name, ev in evaluators.items():
        out = ev({})
        assert {"rougeL", "exact_match", "heldout_loss", "families"} <= set(out)
        expect = s.unseen_tasks() if name == "unseen" else s.seen_tasks()
        assert sorted(out["families"]) == sorted(expect)
        assert 0 <= out["rougeL"] <= 1 and out["heldout_loss"] > 0


def test_facts_suite_splits_are_disjoint_fixed_and_exclude_unseen_tasks():
    from server.workloads.real_suite import FACTS_TASKS, FactsSuiteConfig, facts_suite

    s = facts_suite(FactsSuiteConfig(facts_per_task=5, heldout_per_task=3, unseen_examples=2))
    assert len(s.train) == 5 * len(FACTS_TASKS) and len(s.heldout_seen) == 3 * len(FACTS_TASKS)
    for t in FACTS_TASKS:
        trained = {r["input"] for r in s.train if r["category"] == t}
        held = {r["input"] for r in s.heldout_seen if r["category"] == t}
        assert len(trained) == 5 and len(held) == 3 and not trained & held
        assert all(dict(TASKS[t].items())[r["input"]] == r["output"] for r in s.train if r["category"] == t)
    assert s.unseen_tasks() == real_suite(RealSuiteConfig()).unseen_tasks()
    assert not set(s.unseen_tasks()) & set(FACTS_TASKS)
    assert facts_suite(FactsSuiteConfig(facts_per_task=5, heldout_per_task=3, unseen_examples=2)) == s
    other = facts_suite(FactsSuiteConfig(facts_per_task=5, heldout_per_task=3, unseen_examples=2, seed=3))
    assert other.train != s.train


@pytest.mark.parametrize("kw, match", [
    ({"tasks": ("tz_offset",)}, "unseen tasks of the real suite"),       # unseen at seed 0
    ({"tasks": ("element_mass",), "facts_per_task": 90}, "fewer than"),    # 94 elements
    ({"tasks": ("nope",)}, "unknown tasks"),
    ({"facts_per_task": 0}, "facts_per_task"),
])
def test_facts_suite_config_errors(kw, match):
    from server.workloads.real_suite import FactsSuiteConfig, facts_suite

    with pytest.raises(ValueError, match=match):
        facts_suite(FactsSuiteConfig(**kw))


def test_rank_sensitivity_facts_suite_on_the_tiny_model(tmp_path):
    out = tmp_path / "facts.json"
    cmd = [sys.executable, *(["-S"] if sys.flags.no_site else []), str(ROOT / "scripts" / "rank_sensitivity.py"),
           "--suite", "facts", "--ranks", "1,4",
           "--epochs", "1", "--facts-per-task", "2", "--facts-heldout", "1", "--heldout-examples", "1",
           "--batch-size", "4", "--rslora", "--rank-lr", "4=2e-3", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT, timeout=600)
    doc = json.loads(out.read_text())
    assert [r["rank"] for r in doc["rows"]] == [1, 4] and [r["lr"] for r in doc["rows"]] == [1e-2, 2e-3]
    assert doc["args"]["rslora"] is True and all(r["steps"] == 3 for r in doc["rows"])   # 10 facts, batch 4
    for key in ("train_loss", "train_token_acc", "train_exact", "seen_loss", "heldout_loss", "heldout_exact"):
        assert key in doc["base_losses"] and all(key in r for r in doc["rows"])


# ------------------------------------------------------------------------ the facts federation (--suite facts)
def _facts_federation(**kw):
    from server.workloads.real_suite import build_facts_federation

    return build_facts_federation(**{"num_clients": 8, "num_heldout": 4, "heldout_examples": 3, "seed": 0, **kw})


def test_facts_federation_deals_every_fact_once_over_unequal_clients():
    from server.workloads.real_suite import FACTS_QV_TASKS, FactsSuiteConfig, facts_suite

    suite = _facts_federation()
    facts = facts_suite(FactsSuiteConfig(tasks=FACTS_QV_TASKS, facts_per_task=70, heldout_per_task=0,
                                         num_unseen_tasks=4, unseen_examples=3, seed=0))
    dealt = [r for c in suite.train for r in c.examples]
    key = lambda r: (r["category"], r["input"], r["output"], r["instruction"])   # noqa: E731
    assert len(dealt) == 280 and sorted(map(key, dealt)) == sorted(map(key, facts.train))
    assert [c.client_id for c in suite.train] == [f"client-{i:03d}" for i in range(8)]
    assert [len(c.families) for c in suite.train] == [1, 2] * 4
    for c in suite.train:
        assert c.examples and {r["category"] for r in c.examples} == set(c.families)
    # round-robin over the tasks, as real_suite() deals its tasks
    assert [t for c in suite.train for t in c.families] == list(FACTS_QV_TASKS) * 3
    per_task = {t: sorted(sum(r["category"] == t for r in c.examples) for c in suite.train if t in c.families)
                for t in FACTS_QV_TASKS}
    assert all(sum(n) == 70 and len(set(n)) > 1 for n in per_task.values())      # unequal shares
    assert len({len(c.examples) for c in suite.train}) > 4
    # held out: the real suite's unseen tasks, one client each (as build_real_suite)
    real = build_real_suite(num_clients=8, num_heldout=4, heldout_examples=3, seed=0)
    assert [(c.client_id, c.families, c.examples) for c in suite.heldout] == \
        [(c.client_id, c.families, c.examples) for c in real.heldout]
    assert [c.client_id for c in suite.heldout] == [f"unseen-{c.families[0]}" for c in suite.heldout]
    assert not {c.families[0] for c in suite.heldout} & set(FACTS_QV_TASKS)
    # recall: every fact the clients hold, once, one set per task in the tasks' order
    assert [c.client_id for c in suite.recall] == [f"facts-{t}" for t in FACTS_QV_TASKS]
    assert sorted(map(key, suite.recall_examples())) == sorted(map(key, dealt))
    assert all({r["category"] for r in c.examples} == set(c.families) for c in suite.recall)


def test_facts_federation_is_a_pure_function_of_its_seed():
    a, b = _facts_federation(), _facts_federation()
    assert a == b
    other = _facts_federation(seed=3)
    assert [c.examples for c in other.train] != [c.examples for c in a.train]
    assert [len(c.examples) for c in other.train] != [len(c.examples) for c in a.train]


def test_facts_federation_errors_are_clear():
    with pytest.raises(ValueError, match="unseen tasks of the real suite at seed 1"):
        _facts_federation(seed=1)
    with pytest.raises(ValueError, match=r"num_clients=200 .* more than its facts_per_task=70 facts"):
        _facts_federation(num_clients=200)
    with pytest.raises(ValueError, match=r"num_clients=2 clients hold 3 task slots, fewer than the 4 tasks"):
        _facts_federation(num_clients=2)
    with pytest.raises(ValueError, match="num_clients must be an int >= 1"):
        _facts_federation(num_clients=0)
    small = _facts_federation(num_clients=6, facts_per_task=3)     # every holder of a task gets one fact
    assert all(len(c.examples) >= 1 for c in small.train)


def test_suite_facts_reaches_the_runtimes():
    from server.runtimes.build import suite_for
    from server.runtimes.config import RunConfig

    suite = suite_for(RunConfig(suite="facts", num_clients=8, heldout_examples=3))
    assert suite == _facts_federation()
    with pytest.raises(ValueError, match="unseen tasks of the real suite at seed 2"):
        suite_for(RunConfig(suite="facts", num_clients=8, seed=2))


def test_recall_scores_the_federations_own_facts_teacher_forced():
    """The evaluator's recall_* scores are score_answers of the facts under base + delta: a delta
    that changes the model changes them, and the plain held-out scores are as without recall."""
    import copy

    from edge_client.data import score_answers
    from server.workloads.evaluate import Evaluator
    from server.workloads.model import load_base

    model, tok = load_base(None)
    state = copy.deepcopy(model.state_dict())
    suite = _facts_federation(facts_per_task=3, num_clients=4)
    facts = suite.recall_examples()
    assert len(facts) == 12
    plain = Evaluator(model, tok, state, suite.heldout_examples(), max_new_tokens=2)({})
    ev = Evaluator(model, tok, state, suite.heldout_examples(), max_new_tokens=2, recall_examples=facts)
    out = ev({})
    assert {k: out[k] for k in plain} == plain
    expect = score_answers(model, tok, facts, max_length=128)
    assert out["recall_loss"] == pytest.approx(expect["loss"], rel=1e-6) and out["recall_loss"] > 0
    assert out["recall_exact"] == expect["exact"] and 0 <= out["recall_token_accuracy"] <= 1
    import numpy as np

    name = next(k for k in state if k.endswith("q_proj.weight"))
    moved = ev({name[: -len(".weight")]: np.full(tuple(state[name].shape), 0.05, np.float32)})
    assert moved["recall_loss"] != pytest.approx(out["recall_loss"], rel=1e-6)
    # only when asked: the experiment cell scores the facts before and after the run, not every round
    quiet = Evaluator(model, tok, state, suite.heldout_examples(), max_new_tokens=2, recall_examples=facts,
                      recall_every_call=False)
    assert quiet({}) == plain
    assert quiet.recall({}) == {k: out[k] for k in ("recall_loss", "recall_token_accuracy", "recall_exact")}
    assert Evaluator(model, tok, state, suite.heldout_examples()).recall({}) == {}


def test_per_task_scores_and_answers_reach_the_simulate_summary(tmp_path, capsys):
    """With families the evaluator scores each held-out task and keeps its first answers; the
    simulate summary prints the per-task Rouge-L of the base and of the last round."""
    import copy

    from server.runtimes.simulate import results_summary
    from server.workloads.evaluate import Evaluator, generate, score
    from server.workloads.model import load_base

    model, tok = load_base(None)
    state = copy.deepcopy(model.state_dict())
    examples = _facts_federation(facts_per_task=3, num_clients=4).heldout_examples()
    out = Evaluator(model, tok, state, examples, max_new_tokens=3, families=True, samples=1)({})
    tasks = sorted({ex["category"] for ex in examples})
    assert len(tasks) > 1 and sorted(out["families"]) == tasks == sorted(out["samples"])
    preds = generate(model, tok, examples, max_new_tokens=3)
    for task in tasks:
        idx = [i for i, ex in enumerate(examples) if ex["category"] == task]
        assert out["families"][task] == score([preds[i] for i in idx], [examples[i]["output"] for i in idx])["rougeL"]
        assert out["samples"][task] == [[examples[idx[0]]["output"], preds[idx[0]]]]
    plain = Evaluator(model, tok, state, examples, max_new_tokens=3)({})
    assert "families" not in plain and "samples" not in plain

    doc = {"strategy": "flexlora", "rounds_completed": 1, "devices": [], "heldout_examples": 8,
           "heldout_families": [["a"], ["b"]], "peak_rss_bytes": 2**20, "wall_s": 1.0,
           "base": {"rougeL": 0.1, "exact_match": 0.0, "families": {"a": 0.2, "b": 0.0}},
           "rounds": [{"round": 1, "rougeL": 0.3, "exact_match": 0.0, "clients": 2, "rejected": [],
                       "aggregation_s": 0.1, "train_s": 1.0, "families": {"a": 0.5, "b": 0.1}}]}
    assert results_summary(doc).splitlines()[-1] == "Rouge-L per held-out task: a 0.200 -> 0.500, b 0.000 -> 0.100"

    # scripts/simulate_summary.py: the summary, then every round's per-task scores and answers
    import importlib.util

    spec = importlib.util.spec_from_file_location("simulate_summary", ROOT / "scripts" / "simulate_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc["base"]["samples"] = {"a": [["x", "y"]], "b": [["p", ""]]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    assert mod.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:len(results_summary(doc).splitlines())] == results_summary(doc).splitlines()
    assert lines[-4:] == ["  base: a 0.200, b 0.000", "      a: 'x' -> 'y'", "      b: 'p' -> ''", "  1: a 0.500, b 0.100"]
    assert mod.main([]) == 2
