"""The edge client on tiny LLaMA, Qwen2, Mistral, GPT-2 and GPT-NeoX models saved with
``save_pretrained``: probe, plan, train, export and one simulate round, all with default targets
(discovered from the model). Prints a table; exit status 1 if any cell fails.
``python scripts/model_zoo.py [--arch gpt2 ...]``
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

STAGES = ("probe", "plan", "train", "export", "simulate")


def _cli(argv: list[str]):
    """(exit status, the JSON document the command printed or its last output line)."""
    from edge_client.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    text = out.getvalue()
    if rc in (0, 1):   # the exporter prints progress lines before the document
        pos = 0
        for line in text.splitlines(keepends=True):
            if line.startswith(("{", "[")):
                try:
                    return rc, json.JSONDecoder().raw_decode(text[pos:])[0]
                except json.JSONDecodeError:
                    pass
            pos += len(line)
    lines = (text + err.getvalue()).strip().splitlines()
    return rc, lines[-1][:120] if lines else ""


def run_arch(arch: str, tmp: Path) -> dict[str, tuple[bool, str]]:
    from edge_client.testing import save_tiny_model, synthetic_records

    path = save_tiny_model(arch, tmp / arch)
    data = tmp / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in synthetic_records(8)) + "\n")
    res: dict[str, tuple[bool, str]] = {}

    def stage(name, fn):
        t = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:  # a table of outcomes: every failure is reported, none stops it
            ok, detail = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
            traceback.print_exc(file=sys.stderr)
        res[name] = (ok, f"{detail} ({time.perf_counter() - t:.1f}s)")

    def probe():
        rc, out = _cli(["probe", "--model", path, "--ranks", "2,4,8", "--seq-len", "32", "--json"])
        choice = out["choice"] if rc == 0 else None
        return rc == 0, f"rank {choice['rank']}" if choice else out[-120:]

    def plan():
        rc, out = _cli(["plan", "--model", path, "--ranks", "2,8", "--seq-len", "32", "--json"])
        return rc == 0, f"{out[-1]['lora_parameter_count']} LoRA params at r8" if rc == 0 else out

    def train():
        rc, out = _cli(["train", "--model", path, "--data", str(data), "--out", str(tmp / f"{arch}.upd"),
                        "--rank", "4", "--steps", "2", "--batch", "4", "--json"])
        return rc == 0, f"loss {out['last_loss']:.3f}" if rc == 0 else out

    def export():
        rc, out = _cli(["export", "--model", path, "--adapter", str(tmp / f"{arch}.upd"),
                        "--out", str(tmp / f"{arch}.onnx"), "--json"])
        return rc == 0, f"max abs logit diff {out['max_abs_logit_diff']:.1e}" if rc in (0, 1) else out

    def simulate():
        from server.runtimes.config import RunConfig
        from server.runtimes.simulate import run_simulation

        doc = run_simulation(RunConfig(model=path, rounds=1, num_clients=2, num_heldout=1, local_steps=2,
                                              batch_size=4, eval_max_new_tokens=4, progress=False, threads=1))
        rounds = doc.get("rounds") or []
        from transformers import AutoModelForCausalLM

        from edge_client.targets import discover_targets

        targets = discover_targets(AutoModelForCausalLM.from_pretrained(path))
        return bool(rounds), f"{len(rounds)} round, targets {','.join(targets)}"

    for name, fn in zip(STAGES, (probe, plan, train, export, simulate)):
        stage(name, fn)
    return res


def main(argv=None) -> int:
    from edge_client.testing import ARCHITECTURES

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", action="append", choices=ARCHITECTURES, default=None)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="zoo-"))
    table = {arch: run_arch(arch, tmp) for arch in args.arch or ARCHITECTURES}
    print("| model | " + " | ".join(STAGES) + " |")
    print("|---" * (len(STAGES) + 1) + "|")
    for arch, res in table.items():
        print(f"| {arch} | " + " | ".join(("pass: " if res[s][0] else "FAIL: ") + res[s][1] for s in STAGES) + " |")
    return 0 if all(ok for res in table.values() for ok, _ in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
