"""Write the committed seed corpus in fuzz/corpus/ (deterministic; rerun after format changes).

    python fuzz/make_corpus.py

Each file is one libFuzzer input: a leading 0x00 byte selects the harness's raw mode, the
rest is the payload (``fz-structured-*`` start with 0x01: structured mode). ``ok-*`` seeds must be accepted, ``bad-*`` seeds rejected with a
``ValueError``; the replay test (tests/hardening/test_fuzz_corpus.py) checks both.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fuzzlib  # noqa: E402
import numpy as np  # noqa: E402

from edge_client.wire import LORA_A_SUFFIX, ClientUpdate, GlobalFactors, encode_global, encode_update  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "corpus"


def seeds() -> dict[str, bytes]:
    f = fuzzlib.valid_factors()
    upd = ClientUpdate(client_id="c0", factors=f, num_examples=10, rank=4, alpha=16.0, base_model="ab" * 16,
                       target_modules=["q_proj"], round=1, metrics={"train_loss": 1.0})
    good = encode_update(upd)
    out = {
        "ok-update-float32": good,
        "ok-update-float16": encode_update(upd, dtype="float16"),
        "ok-update-bfloat16": encode_update(upd, dtype="bfloat16"),
        "ok-update-handwritten": fuzzlib.update_bytes(),
        "ok-global-as-update-kind": None,  # filled below (a global payload is rejected as an update)
        "bad-empty": b"",
        "bad-truncated-half": good[: len(good) // 2],
        "bad-truncated-header": good[:12],
        "bad-header-len-huge": struct.pack("<Q", 2**63) + good[8:],
        "bad-header-deep-nesting": struct.pack("<Q", 40000) + b"[" * 40000,
        "bad-meta-deep-nesting": fuzzlib.update_bytes(meta_json="{" + '"a":{' * 5000),
        "bad-meta-duplicate-key": fuzzlib.update_bytes(meta_json=json.dumps(fuzzlib.update_meta())[:-1] + ', "rank": 8}'),
        "bad-tensor-duplicate-name": fuzzlib.raw_safetensors(
            sorted(f.items()) + [sorted(f.items())[0]], metadata={"flexlora": json.dumps(fuzzlib.update_meta())}),
        "bad-dtype-f64": fuzzlib.update_bytes({k: v.astype(np.float64) for k, v in f.items()}),
        "bad-dtype-i32": fuzzlib.update_bytes({k: v.astype(np.int32) for k, v in f.items()}),
        "bad-shape-inner": fuzzlib.update_bytes(fuzzlib.valid_factors() | {
            fuzzlib.MODULE + LORA_A_SUFFIX: np.zeros((3, 6), np.float32)}),
        "bad-shape-1d": fuzzlib.update_bytes(fuzzlib.valid_factors() | {
            fuzzlib.MODULE + LORA_A_SUFFIX: np.zeros(24, np.float32)}),
        "bad-nan": fuzzlib.update_bytes({k: np.where(k.endswith("A.weight"), np.nan, v).astype(np.float32)
                                         for k, v in f.items()}),
        "bad-inf": fuzzlib.update_bytes({k: np.full_like(v, np.inf) for k, v in f.items()}),
        "bad-norm-bomb": fuzzlib.update_bytes({k: np.full_like(v, 1e18) for k, v in f.items()}),
        "bad-alpha-bomb": fuzzlib.update_bytes(alpha=1e300),
        "bad-num-examples-huge": fuzzlib.update_bytes(num_examples=10**400),
        "bad-num-examples-float": fuzzlib.update_bytes(num_examples=10.0),
        "bad-rank-lies": fuzzlib.update_bytes(rank=2),
        "bad-rank-above-assigned": fuzzlib.update_bytes(fuzzlib.valid_factors(rank=16), rank=16),
        "bad-rank-pattern-redos": fuzzlib.update_bytes(
            fuzzlib.valid_factors(module="x" * 40 + ".q_proj"), rank_pattern={"(x+x+)+y": 4}),
        "bad-target-modules-lie": fuzzlib.update_bytes(target_modules=["v_proj"]),
        "bad-meta-extra-field": fuzzlib.update_bytes(pickle="cos\nsystem"),
        "bad-meta-not-json": fuzzlib.update_bytes(meta_json="not json"),
        "bad-kind": fuzzlib.update_bytes(kind="global"),
        "bad-dtype-lie": fuzzlib.update_bytes(dtype="float16"),
        "bad-no-metadata": fuzzlib.raw_safetensors(sorted(f.items())),
        "ok-alpha-pattern": encode_update(ClientUpdate(
            client_id="c0", factors=f, num_examples=10, rank=4, alpha=16.0, alpha_pattern={"q_proj": 64.0},
            base_model="ab" * 16, target_modules=["q_proj"], round=1, metrics={"train_loss": 1.0})),
        "bad-alpha-pattern-bomb": fuzzlib.update_bytes(alpha_pattern={"q_proj": 1e300}),
        "bad-alpha-pattern-negative": fuzzlib.update_bytes(alpha_pattern={"q_proj": -16.0}),
        "bad-alpha-pattern-redos": fuzzlib.update_bytes(
            fuzzlib.valid_factors(module="x" * 40 + ".q_proj"), alpha_pattern={"(x+x+)+y": 4.0}),
    }
    g = GlobalFactors(factors=f, rank=4, alpha=16.0, round=1, strategy="flexlora")
    out["bad-global-as-update"] = encode_global(g)
    del out["ok-global-as-update-kind"]
    return out


def structured_seeds() -> dict[str, bytes]:
    """Inputs for the harness's structured mode (odd first byte), from a fixed generator."""
    rng = np.random.default_rng(7)
    return {f"fz-structured-{i}": b"\x01" + rng.integers(0, 256, 64 + 32 * i, dtype=np.uint8).tobytes()
            for i in range(4)}


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for name, data in seeds().items():
        (CORPUS / name).write_bytes(b"\x00" + data)
    for name, data in structured_seeds().items():
        (CORPUS / name).write_bytes(data)
    print(f"wrote {len(seeds()) + len(structured_seeds())} seeds to {CORPUS}")


if __name__ == "__main__":
    main()
