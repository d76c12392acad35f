"""``flexlora``: the server-side command line.

Subcommands register themselves in ``SUBCOMMANDS`` (name -> (add_arguments, run)); ``simulate``
is the default, so ``flexlora`` with no arguments runs the embedded federation demo. Expected
failures (bad arguments, unreadable data, a failed round) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "SUBCOMMANDS", "build_parser"]


REAL_MODEL_TIMEOUT_S = 1800.0   # simulate's client timeout with --model (a real model's round takes minutes)


class BadNumber(str):
    """A refused command-line number (or other value); :func:`main` reports the first one in one line (exit 1)."""


def check_numbers(args: argparse.Namespace) -> None:
    for name, value in vars(args).items():
        if isinstance(value, BadNumber):
            raise ValueError(f"--{name.replace('_', '-')} {value}")


def number(kind: type, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """argparse type: an int or float in range, finite (inf, NaN, huge, zero or negative refused
    up front with one line naming the value and the range)."""
    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            return BadNumber(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        bad = not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) \
            or (hi is not None and value > hi)
        if bad:
            rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
            return BadNumber(f"{text} is outside {rng}")
        return value
    parse.__name__ = kind.__name__
    return parse


def target_list(text: str):
    """argparse type: comma-separated LoRA target module short names (``q_proj,v_proj``); a
    refused list is reported by :func:`main` in one line, like a refused number."""
    from server.runtimes.config import parse_targets
    try:
        return parse_targets(text)
    except ValueError as exc:
        return BadNumber(str(exc))


def _max_clients() -> int:
    """Clients the memory can hold: about 4 MiB each (data, state and one buffered update of the
    shipped model) against the available memory (/proc/meminfo; 64 GiB where unknown)."""
    avail = 64 * 2**30
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(1, min(1_000_000, avail // (4 * 2**20)))


def add_defence_arguments(p: argparse.ArgumentParser, d) -> None:
    """Robust aggregation, round guard and decoder limits (shared by simulate and experiment)."""
    g = p.add_argument_group("defences (docs/security.md; all off by default)")
    g.add_argument("--clip-norm", type=number(float, lo=0, hi=1e30, lo_open=True), default=d.clip_norm,
                   help="clip each client's effective update to this Frobenius norm")
    g.add_argument("--clip-adaptive", type=number(float, lo=0, hi=1e6, lo_open=True), default=d.clip_adaptive,
                   help="clip each client's effective update to this multiple of the round's median norm")
    g.add_argument("--max-weight-share", type=number(float, lo=0, hi=1, lo_open=True), default=d.max_weight_share,
                   help="cap on any client's share of the aggregation weight")
    g.add_argument("--trim-fraction", type=number(float, lo=0, hi=0.49), default=d.trim_fraction,
                   help="drop this fraction of clients farthest (Gram distance) from the rest each round")
    g.add_argument("--direction-trim", type=number(float, lo=0, hi=0.49), default=d.direction_trim,
                   help="then drop this fraction of clients whose change points away from the others' "
                        "(median cosine, per rank class)")
    g.add_argument("--max-norm-growth", type=number(float, lo=1, hi=1e30, lo_open=True), default=d.max_norm_growth,
                   help="do not commit a round whose global update norm grows more than this factor")
    g.add_argument("--max-num-examples", type=number(int, lo=1, hi=10**12), default=None,
                   help="decoder: largest num_examples a reply may claim (default 10^9)")
    g.add_argument("--max-delta-norm", type=number(float, lo=0, hi=1e30, lo_open=True), default=None,
                   help="decoder: largest per-module delta norm s*||BA||_F (default 1e8)")
    g.add_argument("--max-reply-bytes", type=number(int, lo=1024, hi=2**40), default=None,
                   help="decoder: largest reply in bytes (default 2 GiB)")
    g.add_argument("--max-round-bytes", type=number(int, lo=1, hi=2**50), default=d.max_round_bytes,
                   help="aggregator memory budget per round in bytes (flexlora: sketches sized to fit it)")


def defence_settings(args: argparse.Namespace) -> dict:
    """``RunConfig`` fields from :func:`add_defence_arguments`."""
    return {"clip_norm": args.clip_norm, "clip_adaptive": args.clip_adaptive,
            "max_weight_share": args.max_weight_share, "trim_fraction": args.trim_fraction,
            "direction_trim": args.direction_trim,
            "max_norm_growth": args.max_norm_growth, "max_round_bytes": args.max_round_bytes,
            "max_num_examples": args.max_num_examples, "max_delta_norm": args.max_delta_norm,
            "max_reply_bytes": args.max_reply_bytes}


def _add_simulate(p: argparse.ArgumentParser) -> None:
    from server.core.adapter import SPLITS
    from server.federation.strategies import STRATEGIES
    from server.runtimes.config import RSLORA_HELP, SUITES, SUITES_HELP, TARGETS_HELP, RunConfig
    from server.workloads.catalog import load_workloads
    d = RunConfig()
    p.add_argument("--strategy", choices=list(STRATEGIES), default=d.strategy)
    p.add_argument("--rounds", type=number(int, lo=1, hi=100_000), default=d.rounds)
    p.add_argument("--clients", type=number(int, lo=1, hi=1_000_000), default=d.num_clients, help="training clients (default %(default)s)")
    p.add_argument("--clients-per-round", type=number(int, lo=1, hi=1_000_000), default=None, help="sample this many each round (default: all)")
    p.add_argument("--heldout-clients", type=number(int, lo=1, hi=100_000), default=None,
                   help=f"held-out (unseen) clients evaluated each round (default {d.num_heldout}; with "
                        "--unseen-tasks, their count)")
    p.add_argument("--seed", type=number(int, lo=0, hi=2**31 - 1), default=d.seed)
    p.add_argument("--rank-distribution", choices=list(load_workloads()["rank_distributions"]),
                   default=None, help="draw client types from workloads.json (server/assets) instead of the device mix")
    p.add_argument("--fedit-rank", choices=["min", "max"], default=d.fedit_rank)
    p.add_argument("--split", choices=list(SPLITS), default=d.split,
                   help="FlexLoRA/raFLoRA factor split: the official all-S-on-B 'reference' (default) or sqrt(S) on both")
    p.add_argument("--carry", action="store_true", help="FlexLoRA with carry: keep the global directions a client did not receive")
    p.add_argument("--shards", type=number(int, lo=0, hi=4096), default=d.shards,
                   help="FlexLoRA/raFLoRA: aggregate the modules over this many Ray actors (needs flexlora[ray]; "
                        "$RAY_ADDRESS joins a cluster; default 0: in this process)")
    p.add_argument("--device", default=d.device,
                   help="where FlexLoRA/raFLoRA aggregate: cpu (default) or cuda[:N] (needs a FLEXLORA_CUDA=ON build and a GPU)")
    p.add_argument("--model", default=None, help="registered name (smollm2-135m), local folder, .gguf file or HF "
                   "hub id (default: the shipped tiny model)")
    p.add_argument("--data", default=None, help="instruction JSONL (instruction, input, output, category)")
    p.add_argument("--suite", choices=list(SUITES), default=d.suite,
                   help=SUITES_HELP)
    p.add_argument("--heldout-examples", type=number(int, lo=1, hi=1_000_000), default=d.heldout_examples,
                   help="examples per held-out client (generated suites; default %(default)s)")
    p.add_argument("--unseen-tasks", type=lambda text: tuple(t.strip() for t in text.split(",") if t.strip()),
                   default=(), metavar="TASK,...",
                   help="with --suite real: hold out exactly these tasks (names as in "
                        "server/workloads/real_tasks.py) instead of the seed's draw")
    p.add_argument("--local-steps", type=number(int, lo=1, hi=10**7), default=d.local_steps)
    p.add_argument("--batch-size", type=number(int, lo=1, hi=1_000_000), default=d.batch_size)
    p.add_argument("--lr", type=number(float, lo=0, hi=1e3, lo_open=True), default=d.lr)
    p.add_argument("--alpha", type=number(float, lo=0, hi=1e6, lo_open=True), default=d.alpha)
    p.add_argument("--rslora", action="store_true", help=RSLORA_HELP)
    p.add_argument("--targets", type=target_list, default=d.target_modules,
                   help=f"{TARGETS_HELP} (default {','.join(d.target_modules)}: every linear projection of the blocks)")
    p.add_argument("--min-clients", type=number(int, lo=1, hi=1_000_000), default=d.min_clients)
    p.add_argument("--client-timeout", type=number(float, lo=0, hi=10**7, lo_open=True), default=None,
                   help=f"seconds before a silent client is dropped (default {d.client_timeout_s:g} on the shipped "
                        f"model, {REAL_MODEL_TIMEOUT_S:g} with --model: a real model's local round takes minutes)")
    p.add_argument("--checkpoint-dir", default=None, help="write an atomic checkpoint here after every round")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--overwrite", action="store_true", help="start over an existing checkpoint in --checkpoint-dir")
    p.add_argument("--resume-round", type=number(int, lo=1, hi=10**9), default=None,
                   help="with --resume: start from this kept round's checkpoint (the last good state)")
    p.add_argument("--sanity-ratio", type=number(float, lo=0, hi=1e30), default=d.sanity_ratio,
                   help="do not commit a round whose global norm grows more than this x the median accepted "
                        "reply norm (default %(default)s; 0: off)")
    p.add_argument("--keep-checkpoints", type=number(int, lo=1, hi=1000), default=d.keep_checkpoints,
                   help="round checkpoints kept (default %(default)s)")
    p.add_argument("--fault", action="append", default=[], metavar="CLIENT=KIND",
                   help="inject a fault (bad_shape, nan, wrong_base, rank_above, truncated, straggler; adversarial: "
                        "scaled, sign_flip, noise, inflate) or python:MODULE:FUNCTION, a bytes -> bytes function "
                        "applied to that client's reply (red-team hook)")
    add_defence_arguments(p, d)
    p.add_argument("--threads", type=number(int, lo=1, hi=4096), default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the results document as JSON on stdout")
    p.add_argument("--no-progress", action="store_true")


def simulate_config(args: argparse.Namespace):
    """The ``RunConfig`` that ``flexlora simulate``'s parsed ``args`` describe."""
    from server.runtimes.config import RunConfig

    faults = {}
    for item in args.fault:
        cid, sep, kind = item.partition("=")
        if not sep:
            raise ValueError(f"--fault {item!r}: expected CLIENT=KIND")
        faults[cid] = kind
    if args.clients > _max_clients():
        raise ValueError(f"--clients {args.clients} exceeds what the available memory holds (about {_max_clients()})")
    timeout = args.client_timeout
    if timeout is None:
        timeout = RunConfig.client_timeout_s if args.model is None else REAL_MODEL_TIMEOUT_S
    cfg = RunConfig(strategy=args.strategy, rounds=args.rounds, num_clients=args.clients,
                    clients_per_round=args.clients_per_round,
                    num_heldout=args.heldout_clients or len(args.unseen_tasks) or RunConfig.num_heldout,
                    unseen_tasks=args.unseen_tasks, heldout_examples=args.heldout_examples,
                    seed=args.seed, rank_distribution=args.rank_distribution, fedit_rank=args.fedit_rank,
                    model=args.model, data=args.data, suite=args.suite, local_steps=args.local_steps,
                    batch_size=args.batch_size, lr=args.lr, alpha=args.alpha, rslora=args.rslora,
                    target_modules=tuple(args.targets), min_clients=args.min_clients,
                    client_timeout_s=timeout, checkpoint_dir=args.checkpoint_dir,
                    resume=args.resume or args.resume_round is not None, faults=faults, threads=args.threads,
                    progress=not args.no_progress, overwrite=args.overwrite,
                    keep_checkpoints=args.keep_checkpoints, split=args.split, carry=args.carry,
                    resume_round=args.resume_round, sanity_ratio=args.sanity_ratio or None,
                    device=args.device, shards=args.shards, **defence_settings(args))
    return cfg


def _run_simulate(args: argparse.Namespace) -> int:
    from server.runtimes.simulate import results_summary, run_simulation

    doc = run_simulation(simulate_config(args))
    if args.json:
        json.dump(doc, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(results_summary(doc))
    return 0


def _add_experiment(p: argparse.ArgumentParser) -> None:
    from server.runtimes.experiments import cli as experiments_cli
    experiments_cli.add_arguments(p)


def _run_experiment(args: argparse.Namespace) -> int:
    from server.runtimes.experiments import cli as experiments_cli
    return experiments_cli.run(args)


def _add_bench(p: argparse.ArgumentParser) -> None:
    from server.bench import cli as bench_cli
    kinds = p.add_subparsers(dest="bench_kind", required=True)
    bench_cli.add_arguments(kinds.add_parser("svd", help=bench_cli.HELP, description=bench_cli.HELP))


def _run_bench(args: argparse.Namespace) -> int:
    from server.bench import cli as bench_cli
    return bench_cli.run(args)


def _add_aggregate(p: argparse.ArgumentParser) -> None:
    p.add_argument("updates", nargs="+", metavar="UPDATE", help="update files or peft adapter folders")
    p.add_argument("--rank", type=int, required=True, help="rank of the global adapter written")
    p.add_argument("--out", required=True, help="output: a peft adapter folder (or a .safetensors wire file)")
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha of the output (default: the first update's)")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--base-model", default=None, help="refuse updates whose base_model differs from this")
    p.add_argument("--json", action="store_true")


def _run_aggregate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_client.peft_io import read_update_path, write_peft_adapter
    from edge_client.wire import encode_global
    from server.core.offline import aggregate_updates

    updates = [read_update_path(p) for p in args.updates]
    if args.base_model:
        for path, u in zip(args.updates, updates):
            if u.base_model != args.base_model:
                raise ValueError(f"{path}: base_model {u.base_model!r} is not --base-model {args.base_model!r}")
    g = aggregate_updates(updates, args.rank, alpha=args.alpha, rslora=args.rslora)
    if args.out.endswith(".safetensors"):
        Path(args.out).write_bytes(encode_global(g))
    else:
        write_peft_adapter(args.out, g.factors, alpha=g.alpha, rslora=g.rslora,
                           extra={"clients": [u.client_id for u in updates], "rank": g.rank})
    summary = {"out": args.out, "clients": len(updates), "examples": sum(u.num_examples for u in updates),
               "modules": len(g.modules()), "rank": g.rank, "alpha": g.alpha}
    print(json.dumps(summary) if args.json else " ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "simulate": ("run a whole federation in this process (the default)", _add_simulate, _run_simulate),
    "experiment": ("run the strategy x rank-distribution x seed comparison grid and write its report",
                   _add_experiment, _run_experiment),
    "bench": ("benchmarks: 'flexlora bench svd' times truncated-SVD kernels with their accuracy",
              _add_bench, _run_bench),
    "aggregate": ("aggregate update files or peft adapter folders offline into one adapter at --rank",
                  _add_aggregate, _run_aggregate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexlora", description="FlexLoRA federated LoRA server tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every round and rejection")
    sub = parser.add_subparsers(dest="command")
    for name, (help_text, add, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert ``simulate`` unless a subcommand (or top-level help) is named."""
    i = 0
    while i < len(argv) and argv[i] in ("-v", "--verbose"):
        i += 1
    if i < len(argv) and (argv[i] in SUBCOMMANDS or argv[i] in ("-h", "--help")):
        return argv
    return argv[:i] + ["simulate"] + argv[i:]


def main(argv: Sequence[str] | None = None) -> int:
    argv = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        check_numbers(args)
        return int(args._run(args))
    except (ValueError, OSError) as exc:
        print(f"flexlora {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # SimulationError, RoundFailed
        print(f"flexlora {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
