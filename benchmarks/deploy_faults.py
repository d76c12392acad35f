"""Deployment Engine under faults, on loopback: 8 SuperNodes, 2 SIGKILLed mid-round, 1 sending garbage.

    python benchmarks/deploy_faults.py              # 8 nodes, 3 rounds; exit 0 when every check holds
    python benchmarks/deploy_faults.py --json out.json

A ``flower-superlink`` (``--insecure``, free port, ``FLWR_HOME`` in a temporary folder, no runtime
dependency installation) and 8 ``flower-supernode`` processes, each the simulated device
``partition-id=i`` of an 8-client federation (``client-task=simulated``):

* nodes 0-4 are honest;
* nodes 5 and 6 are SIGKILLed (their whole process group: SuperNode and ClientApp) during
  round 1, as soon as their log shows they received round 1's train message, before they can
  reply;
* node 7 runs with ``fault=garbage`` (and ``FLEXLORA_TEST_FAULTS=1``): every reply it sends is
  its real update's length of random bytes, which the server must reject with a reason.

The run must complete every round with the 5 honest clients. What is compared: the final
global adapter (each module's dW = s * B @ A from the ServerApp's last checkpoint) with that of
a *reference* run on a fresh SuperLink with only the 5 honest nodes (same partitions of the
same 8-client federation, same seed and settings). Why that reference: the killed nodes never
reply (killed in round 1, before replying) and the garbage node's replies are all rejected, so
a correct server aggregates exactly the honest clients' updates in every round; the honest
nodes sort first (client-000..004), so their per-client seeds (index in the round's sorted
client list) are the same in both runs. Equality means the faulty nodes left no trace.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from flower_local import flower  # noqa: E402

NUM = 8
KILLED = (5, 6)
GARBAGE = 7
SETTINGS = {"strategy": "flexlora", "seed": 11, "num-heldout": 1, "local-steps": 1, "batch-size": 2, "threads": 1,
            "eval-max-new-tokens": 2, "node-wait-s": 180.0, "evaluate": False, "client-task": "simulated"}
F32 = {"rtol": 1.3e-6, "atol": 1e-5}


def _node_config(i: int) -> str:
    return f"partition-id={i} num-partitions={NUM}" + (' fault="garbage"' if i == GARBAGE else "")


def _global_delta(out: Path) -> dict[str, np.ndarray]:
    from server.federation.checkpoint import load_checkpoint
    from server.federation.strategies import make_strategy

    ck = load_checkpoint(out)
    if ck is None:
        raise RuntimeError(f"no checkpoint in {out}")
    strategy = make_strategy(ck.meta["strategy"]["strategy"])
    strategy.load_state(ck.strategy_tensors, ck.meta["strategy"])
    return strategy.global_delta()


def _run(root: Path, nodes: list[int], settings: dict, *, kill: tuple[int, ...] = (), timeout: float) -> dict:
    out = root / "out"
    kill_at: dict[int, float] = {}
    t0 = time.perf_counter()
    with flower(root, simulation=False) as fl:
        for i in nodes:
            fl.supernode(f"node-{i}", _node_config(i), env={"FLEXLORA_TEST_FAULTS": "1"} if i == GARBAGE else None)
        result: dict = {}

        def go():
            result["proc"] = fl.run({**settings, "min-nodes": len(nodes), "output-dir": str(out)}, timeout=timeout)

        runner = threading.Thread(target=go)
        runner.start()
        pending = set(kill)
        while pending and runner.is_alive():
            for i in sorted(pending):
                if "Receiving: train message" in fl.log(f"node-{i}").read_text(errors="replace"):
                    fl.kill(f"node-{i}")
                    kill_at[i] = time.perf_counter() - t0
                    pending.discard(i)
            time.sleep(0.05)
        runner.join()
        logs = {name: fl.log(name).read_text(errors="replace")[-3000:] for name in fl.procs}
    doc_path = out / "flower-results.json"
    doc = json.loads(doc_path.read_text()) if doc_path.exists() else {"status": "missing", "rounds": []}
    return {"doc": doc, "out": out, "wall_s": time.perf_counter() - t0, "killed_at_s": kill_at, "logs": logs,
            "flwr_log": (root / "flwr-run.log").read_text(errors="replace")[-3000:]}


def run(args) -> dict:
    settings = {**SETTINGS, "num-server-rounds": args.rounds, "round-timeout-s": args.round_timeout}
    with tempfile.TemporaryDirectory(prefix="flexlora-deploy-faults-") as tmp:
        tmp = Path(tmp)
        faulty = _run(tmp / "faulty", list(range(NUM)), settings, kill=KILLED, timeout=args.timeout)
        honest = [i for i in range(NUM) if i not in KILLED and i != GARBAGE]
        reference = _run(tmp / "reference", honest, settings, timeout=args.timeout)
        report = {"faulty": {k: v for k, v in faulty.items() if k not in ("out", "logs", "flwr_log")},
                  "reference": {k: v for k, v in reference.items() if k not in ("out", "logs", "flwr_log")}}
        problems = []
        for name, r in (("faulty", faulty), ("reference", reference)):
            if r["doc"].get("status") != "ok" or r["doc"].get("rounds_completed") != args.rounds:
                problems.append(f"{name} run: status {r['doc'].get('status')!r}, error {r['doc'].get('error')!r}, "
                                f"rounds {r['doc'].get('rounds_completed')}\n{r['flwr_log']}")
        if sorted(faulty["killed_at_s"]) != list(KILLED):
            problems.append(f"killed only {sorted(faulty['killed_at_s'])} of {list(KILLED)}")
        if not problems:
            ids = lambda i: f"client-{i:03d}"  # noqa: E731
            for r in faulty["doc"]["rounds"]:
                if sorted(r["ranks"]) != [ids(i) for i in honest]:
                    problems.append(f"round {r['round']} aggregated {sorted(r['ranks'])}, expected the honest "
                                    f"{[ids(i) for i in honest]}")
                if ids(GARBAGE) not in r["rejected"]:
                    problems.append(f"round {r['round']}: the garbage node was not rejected")
            first = faulty["doc"]["rounds"][0]["rejected"]
            if any(ids(i) not in first for i in KILLED):
                problems.append(f"round 1: killed nodes not reported as dropped: {first}")
            ours, ref = _global_delta(faulty["out"]), _global_delta(reference["out"])
            if sorted(ours) != sorted(ref):
                problems.append("the runs' adapters have different modules")
            else:
                diff = max(float(np.abs(ours[m] - ref[m]).max()) for m in ours)
                report["max_abs_diff"] = diff
                report["bit_identical"] = all(np.array_equal(ours[m], ref[m]) for m in ours)
                report["modules"] = len(ours)
                if not all(np.allclose(ours[m], ref[m], **F32) for m in ours):
                    problems.append(f"final adapters differ: max |diff| {diff:.3e}")
        report["problems"] = problems
        return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-timeout", type=float, default=45.0, help="seconds the server waits for replies")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds each `flwr run` may take")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    report = run(args)
    f, r = report["faulty"], report["reference"]
    print(f"deployment: {NUM} SuperNodes on loopback, nodes {list(KILLED)} SIGKILLed in round 1, node {GARBAGE} "
          f"sends garbage; {args.rounds} rounds, round timeout {args.round_timeout:g} s")
    print(f"{'round':>5} {'clients':>7} {'rejected':>8} {'agg_s':>7} {'round_s':>8}  rejected (reason)")
    for e in f["doc"].get("rounds", []):
        reasons = "; ".join(f"{k}: {v[:60]}" for k, v in sorted(e["rejected"].items()))
        print(f"{e['round']:>5} {e['clients']:>7} {len(e['rejected']):>8} {e['aggregation_s']:7.3f} "
              f"{e.get('round_s', float('nan')):8.2f}  {reasons}")
    print(f"faulty run: status {f['doc'].get('status')}, {f['doc'].get('rounds_completed')} rounds, nodes killed at "
          + ", ".join(f"node-{i} {t:.1f} s" for i, t in sorted(f["killed_at_s"].items()))
          + f", wall {f['wall_s']:.1f} s")
    print(f"reference run (5 honest nodes only): status {r['doc'].get('status')}, "
          f"{r['doc'].get('rounds_completed')} rounds, wall {r['wall_s']:.1f} s")
    if "max_abs_diff" in report:
        print(f"final global adapter vs reference over {report['modules']} modules: max |dW diff| "
              f"{report['max_abs_diff']:.3e}, bit-identical: {report['bit_identical']}")
    for p in report["problems"]:
        print(f"PROBLEM: {p}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
