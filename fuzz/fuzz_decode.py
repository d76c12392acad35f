"""Coverage-guided fuzzing (atheris / libFuzzer) of the update decoder and server reply handling.

    pip install atheris
    python fuzz/fuzz_decode.py fuzz/corpus -runs=200000 -timeout=5      # bounded run
    python fuzz/fuzz_decode.py fuzz/corpus -max_total_time=600          # time-bounded run

Pass a scratch folder first to keep new corpus entries out of the committed one
(``python fuzz/fuzz_decode.py /tmp/fz fuzz/corpus ...``). The first input byte picks the
mode: even -> the rest is the payload as is (raw byte mutations of the seeds); odd -> the
rest drives a structured generator (``FuzzedDataProvider``) that writes a mostly well-formed
payload with one or more lying, oversized, non-finite or mistyped parts, which reaches the
deeper checks that random bytes rarely get past. Every input goes through ``check_one``:
anything but a ``ValueError`` rejection (or an accepted update meeting the invariants) is a
crash, and libFuzzer's ``-timeout`` turns a hang into one.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris  # noqa: E402

with atheris.instrument_imports():
    import fuzzlib

    import edge_client.wire  # noqa: F401

import numpy as np  # noqa: E402

_JSON_VALUES = [None, True, False, 0, -1, 1, 2**31, 10**30, 1.5, float("nan"), float("inf"), "", "x",
                "q_proj", [], ["q_proj"], ["q_proj", "q_proj"], {}, {"q_proj": 2}, {"(a+)+b": 2},
                {"q_proj": 0}, [[[[]]]]]
_FIELDS = sorted(set(fuzzlib.update_meta()) | {"alpha_pattern"})
# peft's per-module alpha (optional wire field): well-formed, lying, hostile
_ALPHA_PATTERNS = [{"q_proj": 32.0}, {"q_proj": 1e30}, {"q_proj": 1e-30}, {"q_proj": -8.0}, {"q_proj": 0},
                   {"q_proj": float("nan")}, {"q_proj": float("inf")}, {"q_proj": "8"}, {"q_proj": True},
                   {"(a+)+b": 8.0}, {"": 8.0}, {f"k{i}": 8.0 for i in range(100)}, {"q_proj": [8.0]},
                   {"self_attn.q_proj": 4.0, "q_proj": 16.0}, [], "q_proj", 8.0]


def _array(fdp: atheris.FuzzedDataProvider, shape, dtype: str) -> np.ndarray:
    n = int(np.prod(shape))
    kind = fdp.ConsumeIntInRange(0, 11)
    if kind == 9:      # values from the input
        vals = [fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeProbability() for _ in range(min(n, 16))]
        arr = np.resize(np.asarray(vals or [0.0], np.float64), n)
    elif kind == 10:   # norm bomb: finite but large
        arr = np.full(n, 10.0 ** fdp.ConsumeIntInRange(0, 38))
    elif kind == 11:   # one non-finite entry
        arr = np.full(n, 0.01)
        if n:
            arr[fdp.ConsumeIntInRange(0, n - 1)] = fdp.PickValueInList([np.nan, np.inf, -np.inf])
    else:
        arr = np.random.default_rng(fdp.ConsumeIntInRange(0, 1000)).standard_normal(n) * 0.1
    with np.errstate(over="ignore", invalid="ignore"):
        if fdp.ConsumeIntInRange(0, 15) == 15:         # a tensor whose dtype differs from the rest
            dtype = fdp.PickValueInList(["float32", "float16", "float64", "int32"])
        arr = arr.astype(dtype)
    return arr.reshape(shape)


def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    dtype = fdp.PickValueInList(["float32", "float16"])
    meta = fuzzlib.update_meta(dtype=dtype)
    for _ in range(fdp.ConsumeIntInRange(0, 3) // 2):     # metadata that lies
        field = fdp.PickValueInList(_FIELDS)
        meta[field] = fdp.PickValueInList(_JSON_VALUES + [meta.get(field)])
    if fdp.ConsumeIntInRange(0, 3) == 3:                   # a per-module alpha
        meta["alpha_pattern"] = fdp.PickValueInList(_ALPHA_PATTERNS)
    r = fdp.ConsumeIntInRange(1, 9)
    meta["rank"] = fdp.ConsumeIntInRange(0, 80) if fdp.ConsumeIntInRange(0, 7) == 7 else r
    if fdp.ConsumeIntInRange(0, 3) == 3:
        meta["num_examples"] = fdp.ConsumeIntInRange(-2, 2**62) * (10 ** fdp.ConsumeIntInRange(0, 30))
    tensors = []
    for m in range(fdp.ConsumeIntInRange(1, 3)):
        module = fuzzlib.MODULE.replace("0", str(m))
        if fdp.ConsumeIntInRange(0, 7) == 7:               # a module the metadata does not allow
            module = fdp.PickValueInList(["x.v_proj", "bad name.q_proj", module + "x"])
        d_out, d_in = fdp.ConsumeIntInRange(1, 9), fdp.ConsumeIntInRange(1, 9)
        a_shape, b_shape = (r, d_in), (d_out, r)
        if fdp.ConsumeIntInRange(0, 7) == 7:               # a shape that lies
            a_shape = fdp.PickValueInList([(r,), (r, d_in, 1), (r + 1, d_in)])
            b_shape = fdp.PickValueInList([(d_out, r), (r, d_out), (d_out, r, 1)])
        tensors.append((module + ".lora_A.weight", _array(fdp, a_shape, dtype)))
        tensors.append((module + ".lora_B.weight", _array(fdp, b_shape, dtype)))
    if fdp.ConsumeIntInRange(0, 7) == 7 and tensors:       # duplicated tensor name
        tensors.append(tensors[0])
    extra = ""
    if fdp.ConsumeIntInRange(0, 7) == 7:                   # duplicated metadata key
        extra = ', "__metadata__": {"flexlora": "{}"}'
    meta_text = json.dumps(meta)
    if fdp.ConsumeIntInRange(0, 15) == 15:
        meta_text = "[" * fdp.ConsumeIntInRange(1, 100000)
    data = fuzzlib.raw_safetensors(tensors, metadata={"flexlora": meta_text}, header_extra=extra)
    if fdp.ConsumeIntInRange(0, 7) == 7:                   # truncate or append
        cut = fdp.ConsumeIntInRange(0, len(data))
        data = data[:cut] if fdp.ConsumeBool() else data + fdp.ConsumeBytes(cut)
    return data


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        payload = data[1:]
    else:
        payload = structured(atheris.FuzzedDataProvider(data[1:]))
    fuzzlib.check_one(payload)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
