"""Replay the committed fuzz corpus (fuzz/corpus/) through the same oracle the fuzzer runs.

Seeds named ``ok-*`` must be accepted and ``bad-*`` rejected with a reason; any other file
(a crash reproducer or a minimised input added later) must only never escape as something
other than a ValueError, and must finish quickly (a hang is a failure)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))
import fuzzlib  # noqa: E402

CORPUS = sorted((FUZZ / "corpus").iterdir())


def test_the_corpus_is_present_and_small():
    assert len(CORPUS) >= 20
    assert sum(p.stat().st_size for p in CORPUS) < 1 << 20
    assert {p.name.split("-")[0] for p in CORPUS} >= {"ok", "bad"}


@pytest.mark.parametrize("path", [p for p in CORPUS if p.read_bytes()[:1] in (b"", b"\x00") or
                                  p.read_bytes()[0] % 2 == 0], ids=lambda p: p.name)
def test_raw_seed_replays(path):
    data = path.read_bytes()[1:]
    t0 = time.perf_counter()
    outcome = fuzzlib.check_one(data)
    assert time.perf_counter() - t0 < 5.0
    if path.name.startswith("ok-"):
        assert outcome == "accepted"
    elif path.name.startswith("bad-"):
        assert outcome.startswith("rejected: ")


@pytest.mark.parametrize("path", [p for p in CORPUS if p.read_bytes()[:1] not in (b"", b"\x00") and
                                  p.read_bytes()[0] % 2 == 1], ids=lambda p: p.name)
def test_structured_seed_replays(path):
    atheris = pytest.importorskip("atheris")
    import fuzz_decode

    fuzzlib.check_one(fuzz_decode.structured(atheris.FuzzedDataProvider(path.read_bytes()[1:])))


def test_the_corpus_matches_its_generator():
    import make_corpus

    expected = make_corpus.seeds()
    for name, data in expected.items():
        assert (FUZZ / "corpus" / name).read_bytes() == b"\x00" + data, name
    for name, data in make_corpus.structured_seeds().items():
        assert (FUZZ / "corpus" / name).read_bytes() == data, name
