"""``flexlora experiment``: run the comparison grid, write its report, convert real data.

    flexlora experiment run --out results/experiments [--config grid.json] [flags]
    flexlora experiment report --out results/experiments
    flexlora experiment convert ni TASK.json [TASK.json ...] -o clients.jsonl
    flexlora experiment convert dolly databricks-dolly-15k.jsonl -o clients.jsonl

Wiring into ``server.cli``: ``SUBCOMMANDS["experiment"] = (HELP, add_arguments, run)``.
Also ``python -m server.runtimes.experiments ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from server.runtimes.config import RSLORA_HELP, SUITES_HELP, TARGETS_HELP, parse_targets
from server.runtimes.experiments.config import (
    ARMS,
    DISTRIBUTIONS,
    ExperimentConfig,
    experiment_settings,
    load_config_file,
)

__all__ = ["HELP", "add_arguments", "run", "main"]

HELP = "run the strategy x rank-distribution x seed comparison grid and write its report"

# flag -> RunConfig field (None default = take the config file's or the dataclass's value)
_SETTING_FLAGS = {
    "clients": ("num_clients", int), "clients_per_round": ("clients_per_round", int),
    "heldout_clients": ("num_heldout", int), "heldout_examples": ("heldout_examples", int),
    "rounds": ("rounds", int), "local_steps": ("local_steps", int), "batch_size": ("batch_size", int),
    "lr": ("lr", float), "alpha": ("alpha", float), "max_length": ("max_length", int),
    "eval_max_new_tokens": ("eval_max_new_tokens", int), "model": ("model", str), "data": ("data", str),
    "collapse_threshold": ("collapse_threshold", float), "split": ("split", str), "suite": ("suite", str),
    # defences and decoder limits (docs/security.md)
    "clip_norm": ("clip_norm", float), "clip_adaptive": ("clip_adaptive", float),
    "max_weight_share": ("max_weight_share", float), "trim_fraction": ("trim_fraction", float),
    "direction_trim": ("direction_trim", float),
    "max_norm_growth": ("max_norm_growth", float), "max_num_examples": ("max_num_examples", int),
    "max_delta_norm": ("max_delta_norm", float), "device": ("device", str), "shards": ("shards", int),
    "sanity_ratio": ("sanity_ratio", float),
    # the adapter: rank-stabilised scaling (a switch) and the layers that get LoRA (comma list)
    "rslora": ("rslora", bool), "targets": ("target_modules", parse_targets),
}
_HELP = {"suite": SUITES_HELP, "rslora": RSLORA_HELP, "targets": TARGETS_HELP}


def _csv(kind):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _add_run(p: argparse.ArgumentParser) -> None:
    d = experiment_settings()
    p.add_argument("--out", default="results/experiments", help="output folder (default %(default)s)")
    p.add_argument("--config", default=None, help="JSON grid file; flags given here override it")
    p.add_argument("--arms", type=_csv(str), default=None, help=f"comma list of {','.join(ARMS)}")
    p.add_argument("--distributions", type=_csv(str), default=None, help=f"comma list of {','.join(DISTRIBUTIONS)}")
    p.add_argument("--seeds", type=_csv(int), default=None, help="comma list (default 0,1,2)")
    for flag, (name, kind) in _SETTING_FLAGS.items():
        default = getattr(d, name)
        text = f"{_HELP[flag]} " if flag in _HELP else ""
        text += f"(default {','.join(default) if isinstance(default, tuple) else default})"
        if kind is bool:     # a switch: absent leaves the config file's (or the default) value
            p.add_argument("--" + flag.replace("_", "-"), action="store_true", default=None, help=text)
        else:                # parse_targets' errors are reported by build_config in one line
            p.add_argument("--" + flag.replace("_", "-"), type=str if kind is parse_targets else kind,
                           default=None, help=text)
    p.add_argument("--fault", action="append", default=[], metavar="CLIENT=KIND",
                   help="inject a fault into every cell (as in simulate; python:MODULE:FUNCTION is the red-team hook)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    p.add_argument("--fresh", action="store_true", help="recompute every cell, even finished ones")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="run only every N-th cell starting at K (N processes share one grid; default %(default)s)")
    p.add_argument("--no-report", action="store_true", help="only run the cells")
    p.add_argument("--no-plots", action="store_true", help="report without PNG plots")
    p.add_argument("--no-progress", action="store_true")


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    doc = load_config_file(args.config) if args.config else {}
    settings = dict(doc.get("settings", {}))
    for flag, (name, kind) in _SETTING_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{flag.replace('_', '-')} must be finite, got {value}")
            if kind is parse_targets:
                try:
                    value = parse_targets(value)
                except ValueError as exc:
                    raise ValueError(f"--{flag} {exc}") from None
            settings[name] = value
    for item in getattr(args, "fault", None) or []:
        cid, sep, kind = item.partition("=")
        if not sep:
            raise ValueError(f"--fault {item!r}: expected CLIENT=KIND")
        settings.setdefault("faults", {})[cid] = kind
    kw = {k: doc[k] for k in ("arms", "distributions", "seeds", "threads") if k in doc}
    for name in ("arms", "distributions", "seeds", "threads"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return ExperimentConfig(settings=experiment_settings(**settings), **kw)


def _run_grid(args: argparse.Namespace) -> int:
    from server.runtimes.experiments.report import write_report
    from server.runtimes.experiments.runner import run_grid

    cfg = build_config(args)
    k, sep, n = args.shard.partition("/")
    if not (sep and k.isdigit() and n.isdigit()):
        raise ValueError(f"--shard must look like K/N, got {args.shard!r}")
    t0 = time.perf_counter()
    summary = run_grid(cfg, args.out, fresh=args.fresh, progress=not args.no_progress, shard=(int(k), int(n)))
    if not args.no_report:
        argv = list(getattr(args, "_argv", None) or sys.argv[1:])
        argv = argv[argv.index("run"):] if "run" in argv else argv
        # a pure resume (nothing ran) keeps the record of the run that made the cells
        info = None if summary["ran"] == 0 else {
            "command": " ".join(["flexlora", "experiment", *argv]), "wall_s": time.perf_counter() - t0,
            "ran": summary["ran"], "reused": summary["reused"]}
        paths = write_report(args.out, plots=not args.no_plots, run_info=info)
        print(f"report: {', '.join(str(p) for p in paths)}")
    return 0


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/experiments", help="folder holding cells/ (default %(default)s)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--record-command", default=None, help="record this as the command that made the cells")
    p.add_argument("--record-wall-s", type=float, default=None, help="record this as its wall time (s)")


def _run_report(args: argparse.Namespace) -> int:
    from server.runtimes.experiments.report import summarize_dir, write_report

    info = None
    if args.record_command is not None or args.record_wall_s is not None:
        from server.runtimes.experiments.report import load_cells
        info = {"command": args.record_command or "?", "wall_s": args.record_wall_s or 0.0,
                "ran": len(load_cells(args.out)), "reused": 0}
    paths = write_report(args.out, plots=not args.no_plots, run_info=info)
    if args.json:
        json.dump(summarize_dir(args.out), sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(f"report: {', '.join(str(p) for p in paths)}")
    return 0


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=["ni", "dolly"], help="Natural Instructions task files or Dolly-15K JSONL")
    p.add_argument("inputs", nargs="+", help="NI task .json files (or folders of them), or one Dolly .jsonl")
    p.add_argument("-o", "--output", required=True, help="client JSONL to write")
    p.add_argument("--max-per-task", type=int, default=None, help="NI: keep at most this many instances per task")
    p.add_argument("--seed", type=int, default=0, help="NI: which instances --max-per-task keeps")


def _run_convert(args: argparse.Namespace) -> int:
    from server.workloads.convert import convert_dolly, convert_natural_instructions

    if args.format == "ni":
        stats = convert_natural_instructions(args.inputs, args.output, max_per_task=args.max_per_task,
                                             seed=args.seed)
    else:
        if len(args.inputs) != 1:
            raise ValueError(f"dolly takes one JSONL file, got {len(args.inputs)}")
        stats = convert_dolly(args.inputs[0], args.output)
    print(f"wrote {stats['records']} records in {stats['clients']} clients (categories) to {args.output}"
          + (f"; skipped {stats['skipped']}" if stats.get("skipped") else ""))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment_command", metavar="{run,report,convert}", required=True)
    for name, help_text, add, fn in (
            ("run", "run (or resume) the grid, then write the report", _add_run, _run_grid),
            ("report", "write report.md, summary.json and plots from finished cells", _add_report, _run_report),
            ("convert", "convert Natural Instructions / Dolly-15K to the client JSONL format", _add_convert,
             _run_convert)):
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_experiment_run=fn)


def run(args: argparse.Namespace) -> int:
    return int(args._experiment_run(args))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.runtimes.experiments", description=HELP)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        print(f"flexlora experiment: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"flexlora experiment: {exc}", file=sys.stderr)
        return 1
