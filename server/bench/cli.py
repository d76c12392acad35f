"""``flexlora bench svd``: argument definitions and the entry point.

The main CLI wires it in two lines::

    from server.bench import cli as bench_cli
    bench_cli.add_arguments(subparsers.add_parser("svd", help=bench_cli.HELP)); ... bench_cli.run(args)

``python -m server.bench svd ...`` runs the same thing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "benchmark truncated-SVD kernels (ours, LAPACK, ARPACK, scikit-learn, torch): speed, accuracy, memory"


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from server.bench.presets import PRESETS

    p = parser
    p.add_argument("--preset", choices=PRESETS, default="quick", help="case set and repeat policy (default: quick)")
    p.add_argument("--shapes", type=_csv_list, help="explicit D_OUTxD_IN list, e.g. 2048x2048,5504x2048")
    p.add_argument("--spectra", type=_csv_list, help="dense-case spectra: fast,slow,flat ('' for none)")
    p.add_argument("--rank-mixes", type=_csv_list, help="factored cases from workloads.json rank mixes ('' for none)")
    p.add_argument("--clients", type=int, help="clients per factored case")
    p.add_argument("--rank", type=int, help="target rank k (default: the largest client rank / the preset's)")
    p.add_argument("--rank-scale", type=float, help="multiply client ranks (small smoke runs)")
    p.add_argument("--backends", type=_csv_list, help="glob patterns over backend names, e.g. 'ours:*,torch-*'")
    p.add_argument("--list-backends", action="store_true", help="list backends, their availability and exit")
    p.add_argument("--repeats", type=int, help="timed repeats after the warm-up (at most)")
    p.add_argument("--min-repeats", type=int, help="timed repeats at least, even past --budget")
    p.add_argument("--budget", type=float, help="seconds per (case, backend) after which repeats stop")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls (the first is scored for accuracy)")
    p.add_argument("--memory", choices=("inprocess", "subprocess", "off"), help="peak memory mode (see measure.py)")
    p.add_argument("--threads", type=int, help="BLAS / torch / OpenMP threads (default: all usable cores)")
    p.add_argument("--oversample", type=int, default=10, help="oversampling of every randomized backend")
    p.add_argument("--power-iters", type=int, default=2, help="power iterations of every randomized backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include-formation", action="store_true",
                   help="add the time of forming dW (one GEMM) to dense backends on factored cases")
    p.add_argument("--tolerance", type=float, default=1.01, help="err/opt counted as accurate (default 1.01)")
    p.add_argument("--workloads", help="path to a workloads.json (default: $FLEXLORA_WORKLOADS if set, else the "
                   "copy shipped in the package, server/assets/workloads.json)")
    p.add_argument("--json", help="write the full results as JSON")
    p.add_argument("--csv", help="write one row per (case, backend) as CSV")
    p.add_argument("--markdown", help="write the table as markdown")
    p.add_argument("--plot", help="directory for PNGs (time vs size, accuracy/speed frontier)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _configure_threads(threads: int | None) -> None:
    if threads is None:
        return
    import importlib

    # threadpoolctl limits only libraries already loaded: load every BLAS/OpenMP user first.
    for mod in ("scipy.linalg", "scipy.sparse.linalg", "sklearn.utils.extmath", "server.core.linalg"):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - an absent library is skipped later with its reason
            pass
    try:
        import server.core.linalg as linalg

        linalg.set_num_threads(threads)
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass


def _list_backends() -> int:
    from server.bench.backends import load_all

    for b in load_all():
        ok, reason = b.available()
        print(f"{b.name:<28} {b.device:<5} {'ok' if ok else 'unavailable: ' + reason}\n    {b.algorithm}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as exc:
        print(f"flexlora bench svd: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from server.bench import report
    from server.bench.backends import BenchSettings
    from server.bench.machine import format_machine, machine_info
    from server.bench.measure import prepare_allocator
    from server.bench.presets import build_cases, get_preset, parse_shape
    from server.bench.runner import BenchConfig, run_bench
    from server.workloads.catalog import load_workloads

    if args.list_backends:
        return _list_backends()
    preset = get_preset(args.preset)
    for name in ("clients", "rank", "repeats", "min_repeats", "warmup", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    settings = BenchSettings(oversample=args.oversample, power_iters=args.power_iters, seed=args.seed, threads=args.threads)
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else None
    cases = build_cases(load_workloads(args.workloads), preset, shapes=shapes, spectra=args.spectra,
                        rank_mixes=args.rank_mixes, clients=args.clients, rank=args.rank,
                        rank_scale=args.rank_scale, seed=args.seed)
    repeats = args.repeats or preset.repeats
    config = BenchConfig(
        cases=cases, backends=args.backends or (list(preset.backends) if preset.backends else None),
        device=None if args.backends else preset.device, warmup=args.warmup, repeats=repeats,
        min_repeats=min(args.min_repeats or preset.min_repeats, repeats),
        budget_s=args.budget if args.budget is not None else preset.budget_s,
        memory=args.memory or preset.memory, include_formation=args.include_formation,
        accurate_ratio=args.tolerance, settings=settings)
    _configure_threads(args.threads)
    prepare_allocator()
    info = machine_info(args.threads)
    print(format_machine(info), flush=True)
    print(f"preset  : {preset.name}; {len(cases)} cases; warm-up {config.warmup}, repeats {config.min_repeats}-"
          f"{config.repeats} (budget {config.budget_s} s); memory {config.memory}; oversample {settings.oversample}, "
          f"power iters {settings.power_iters}\n", flush=True)
    result = run_bench(config, quiet=args.quiet)
    result["machine"] = info
    result["config"] = {"preset": preset.name, "argv": sys.argv[1:], "warmup": config.warmup, "repeats": config.repeats,
                        "min_repeats": config.min_repeats, "budget_s": config.budget_s, "memory": config.memory,
                        "include_formation": config.include_formation, "tolerance": config.accurate_ratio,
                        "oversample": settings.oversample, "power_iters": settings.power_iters, "seed": settings.seed}
    print(report.format_results(result, accurate_ratio=config.accurate_ratio))
    for path, text in ((args.json, lambda: report.to_json(result)), (args.csv, lambda: report.to_csv(result)),
                       (args.markdown, lambda: report.format_results(result, markdown=True,
                                                                     accurate_ratio=config.accurate_ratio))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text(), encoding="utf-8")
            print(f"wrote {path}")
    if args.plot:
        from server.bench.plots import write_plots

        for p in write_plots(result, args.plot):
            print(f"wrote {p}")
    return 0 if any(r["status"] == "ok" for r in result["records"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("svd", help=HELP, description=HELP))
    return run(parser.parse_args(argv))
