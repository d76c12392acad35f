"""Collect real client updates from a federation, for measurements on realistic spectra
(issue 22, item 2: ``bench_budget.py --updates DIR``).

    python benchmarks/collect_updates.py --model smollm2-135m --suite real --rounds 2 \
        --clients 20 --clients-per-round 10 --local-steps 20 --out /tmp/updates

Runs ``flexlora simulate``'s federation (the same ``RunConfig`` and ``build_federation``; no
evaluation) and writes every reply a client sends, exactly as it arrived on the wire
(safetensors + JSON, the project's update format, never pickle), to
``OUT/round{R}/{client}.update``, plus ``OUT/manifest.json`` (the run's settings and, per
file, the client's rank and number of examples). Replies from round 2 on carry what the
client started from (the server's truncation at its rank) plus its local change, as a
deployed federation's do.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Recording:
    """A transport that hands the plan to ``inner`` and writes every reply's bytes."""

    def __init__(self, inner, out: Path, manifest: dict) -> None:
        self.inner, self.out, self.manifest = inner, out, manifest

    def exchange(self, plan):
        from edge_client.wire import decode_update
        replies = list(self.inner.exchange(plan))
        folder = self.out / f"round{plan.round}"
        folder.mkdir(parents=True, exist_ok=True)
        for reply in replies:
            if reply.data is None:
                continue
            path = folder / f"{reply.client_id}.update"
            path.write_bytes(reply.data)
            u = decode_update(reply.data)
            self.manifest["files"].append({"path": str(path.relative_to(self.out)), "round": plan.round,
                                           "client": reply.client_id, "rank": u.rank,
                                           "num_examples": u.num_examples, "alpha": u.alpha,
                                           "bytes": len(reply.data)})
        write_manifest(self.out, self.manifest)   # after every round: a cut-short run keeps its rounds
        print(f"round {plan.round}: wrote {sum(r.data is not None for r in replies)} updates to {folder}",
              flush=True)
        return replies


def write_manifest(out: Path, manifest: dict) -> None:
    """``OUT/manifest.json``, written atomically (a temporary file, then a rename)."""
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(out / "manifest.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a registered real model (smollm2-135m) or a path; "
                    "default: the shipped tiny model")
    ap.add_argument("--suite", default="real")
    ap.add_argument("--strategy", default="flexlora")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--rank-distribution", default="heavy_tail_light")
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from server.runtimes.build import build_federation
    from server.runtimes.config import RunConfig
    fields = dict(strategy=args.strategy, rounds=args.rounds, num_clients=args.clients,
                  clients_per_round=args.clients_per_round, seed=args.seed,
                  rank_distribution=args.rank_distribution, model=args.model, suite=args.suite,
                  local_steps=args.local_steps, batch_size=args.batch_size, threads=args.threads,
                  progress=False)
    if args.model is not None:
        fields["client_timeout_s"] = 3600.0
    if args.lr is not None:
        fields["lr"] = args.lr
    if args.max_length is not None:
        fields["max_length"] = args.max_length
    cfg = RunConfig(**fields)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fed = build_federation(cfg, evaluate=False)
    manifest = {"command": "python benchmarks/collect_updates.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "model": args.model or "tiny (shipped)", "suite": args.suite, "strategy": args.strategy,
                "ranks": {cid: s.rank for cid, s in fed.specs.items()}, "files": []}
    with fed.in_process_clients() as clients:
        history = fed.engine(runtime="collect").run(Recording(clients, out, manifest), args.rounds)
    manifest["rounds"] = [{k: h.get(k) for k in ("round", "clients", "rejected", "train_loss") if k in h}
                          for h in history]
    manifest["wall_s"] = time.perf_counter() - t0
    write_manifest(out, manifest)
    print(f"{len(manifest['files'])} updates in {out} ({manifest['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
