"""``flexlora``: the server-side command line.

Subcommands register themselves in ``SUBCOMMANDS`` (name -> (add_arguments, run)); ``simulate``
is the default, so ``flexlora`` with no arguments runs the embedded federation demo. Expected
failures (bad arguments, unreadable data, a failed round) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "SUBCOMMANDS", "build_parser"]


def _add_simulate(p: argparse.ArgumentParser) -> None:
    from server.simulation.runtime import SimulationConfig
    d = SimulationConfig()
    p.add_argument("--strategy", choices=["flexlora", "hetlora", "flora", "fedit", "raflora"], default=d.strategy)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--clients", type=int, default=d.num_clients, help="training clients (default %(default)s)")
    p.add_argument("--clients-per-round", type=int, default=None, help="sample this many each round (default: all)")
    p.add_argument("--heldout-clients", type=int, default=d.num_heldout)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rank-distribution", choices=["uniform", "heavy_tail_light", "heavy_tail_strong", "normal"],
                   default=None, help="draw client types from workloads.json (server/assets) instead of the device mix")
    p.add_argument("--fedit-rank", choices=["min", "max"], default=d.fedit_rank)
    p.add_argument("--split", choices=["reference", "balanced"], default=d.split,
                   help="FlexLoRA/raFLoRA factor split: the official all-S-on-B 'reference' (default) or sqrt(S) on both")
    p.add_argument("--carry", action="store_true", help="FlexLoRA with carry: keep the global directions a client did not receive")
    p.add_argument("--model", default=None, help="HF model id or local path (default: the shipped tiny model)")
    p.add_argument("--data", default=None, help="instruction JSONL (instruction, input, output, category)")
    p.add_argument("--local-steps", type=int, default=d.local_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--min-clients", type=int, default=d.min_clients)
    p.add_argument("--client-timeout", type=float, default=d.client_timeout_s, help="seconds before a silent client is dropped")
    p.add_argument("--checkpoint-dir", default=None, help="write an atomic checkpoint here after every round")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--fault", action="append", default=[], metavar="CLIENT=KIND",
                   help="inject a fault (bad_shape, nan, wrong_base, rank_above, truncated, straggler)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the results document as JSON on stdout")
    p.add_argument("--no-progress", action="store_true")


def _run_simulate(args: argparse.Namespace) -> int:
    from server.simulation.runtime import SimulationConfig, results_summary, run_simulation

    faults = {}
    for item in args.fault:
        cid, sep, kind = item.partition("=")
        if not sep:
            raise ValueError(f"--fault {item!r}: expected CLIENT=KIND")
        faults[cid] = kind
    cfg = SimulationConfig(strategy=args.strategy, rounds=args.rounds, num_clients=args.clients,
                           clients_per_round=args.clients_per_round, num_heldout=args.heldout_clients,
                           seed=args.seed, rank_distribution=args.rank_distribution, fedit_rank=args.fedit_rank,
                           model=args.model, data=args.data, local_steps=args.local_steps,
                           batch_size=args.batch_size, lr=args.lr, alpha=args.alpha, min_clients=args.min_clients,
                           client_timeout_s=args.client_timeout, checkpoint_dir=args.checkpoint_dir,
                           resume=args.resume, faults=faults, threads=args.threads,
                           progress=not args.no_progress, split=args.split, carry=args.carry)
    doc = run_simulation(cfg)
    if args.json:
        json.dump(doc, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(results_summary(doc))
    return 0


def _add_experiment(p: argparse.ArgumentParser) -> None:
    from server.experiments import cli as experiments_cli
    experiments_cli.add_arguments(p)


def _run_experiment(args: argparse.Namespace) -> int:
    from server.experiments import cli as experiments_cli
    return experiments_cli.run(args)


def _add_bench(p: argparse.ArgumentParser) -> None:
    from server.bench import cli as bench_cli
    kinds = p.add_subparsers(dest="bench_kind", required=True)
    bench_cli.add_arguments(kinds.add_parser("svd", help=bench_cli.HELP, description=bench_cli.HELP))


def _run_bench(args: argparse.Namespace) -> int:
    from server.bench import cli as bench_cli
    return bench_cli.run(args)


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "simulate": ("run a whole federation in this process (the default)", _add_simulate, _run_simulate),
    "experiment": ("run the strategy x rank-distribution x seed comparison grid and write its report",
                   _add_experiment, _run_experiment),
    "bench": ("benchmarks: 'flexlora bench svd' times truncated-SVD kernels with their accuracy",
              _add_bench, _run_bench),
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
        return int(args._run(args))
    except (ValueError, OSError) as exc:
        print(f"flexlora {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # SimulationError, RoundFailed
        print(f"flexlora {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
