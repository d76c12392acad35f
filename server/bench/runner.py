"""Run every selected backend on every case: warm-up, accuracy, timed repeats, peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from server.bench import accuracy
from server.bench import flops as F
from server.bench.backends import Backend, BenchSettings, load_all, select
from server.bench.cases import CaseSpec, form_dense, save_case
from server.bench.measure import MEMORY_MODES, PeakMemory, python_command, time_call

FORMATION = "(form dW: numpy GEMM)"


@dataclass(kw_only=True)
class BenchConfig:
    cases: list[CaseSpec]
    backends: list[str] | None = None       # glob patterns over backend names; None = all
    device: str | None = None               # "cpu" / "cuda" filter
    warmup: int = 1
    repeats: int = 5
    min_repeats: int = 3
    budget_s: float = 5.0                   # per (case, backend): stop repeating after this
    memory: str = "inprocess"
    include_formation: bool = False
    accurate_ratio: float = 1.01            # "accurate" = within 1% of the optimum
    settings: BenchSettings = field(default_factory=BenchSettings)

    def __post_init__(self) -> None:
        if not self.cases:
            raise ValueError("cases must not be empty")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (its output is scored for accuracy), got {self.warmup}")
        if self.min_repeats < 1 or self.repeats < self.min_repeats:
            raise ValueError(f"need 1 <= min_repeats <= repeats, got min_repeats={self.min_repeats}, repeats={self.repeats}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be positive, got {self.budget_s}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if not self.accurate_ratio >= 1.0:
            raise ValueError(f"accurate_ratio must be >= 1, got {self.accurate_ratio}")


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def resolve_backends(config: BenchConfig, quiet: bool = False) -> tuple[list[Backend], list[dict]]:
    load_all()
    chosen = select(config.backends, config.device)
    usable, skipped = [], []
    for b in chosen:
        ok, reason = b.available()
        if ok:
            usable.append(b)
        else:
            skipped.append({"backend": b.name, "reason": reason})
            _log(f"skip {b.name}: {reason}", quiet)
    return usable, skipped


def run_bench(config: BenchConfig, *, quiet: bool = False) -> dict:
    backends, skipped = resolve_backends(config, quiet)
    records: list[dict] = []
    for ci, spec in enumerate(config.cases, 1):
        runnable = []
        for b in backends:
            ok, reason = b.applies(_SpecView(spec))
            if ok:
                runnable.append(b)
            else:
                records.append(_record(spec, b, status="n/a", reason=reason))
        if not runnable:
            _log(f"[case {ci}/{len(config.cases)}] {spec.label}: no backend applies, skipped", quiet)
            continue
        t0 = time.perf_counter()
        case = spec.build()
        _log(f"[case {ci}/{len(config.cases)}] {spec.label}: built in {time.perf_counter() - t0:.1f} s", quiet)
        formation = None
        if spec.kind == "factored" and any(b.uses_formed_matrix(case) for b in runnable):
            formation = _time_formation(case, config)
            records.append(formation)
            _log(f"    {FORMATION:<28} {formation['time_s']:.4f} s", quiet)
        t0 = time.perf_counter()
        case.truth_singular_values()
        _log(f"    reference singular values (float64 gesdd) in {time.perf_counter() - t0:.1f} s", quiet)
        with tempfile.TemporaryDirectory(prefix="flexlora-bench-") as tmp:
            case_file = None
            if config.memory == "subprocess":
                case_file = os.path.join(tmp, "case.safetensors")
                save_case(case, case_file)
            for b in runnable:
                rec = _run_one(case, b, config, formation, case_file)
                records.append(rec)
                _log("    " + _progress_line(rec), quiet)
        del case
    return {"records": records, "skipped": skipped}


class _SpecView:
    """Lets ``Backend.applies`` look at ``case.spec`` before the (costly) case is built."""

    def __init__(self, spec: CaseSpec) -> None:
        self.spec = spec


def _record(spec: CaseSpec, b: Backend | None, **kw) -> dict:
    rec = {"case": spec.label, "spec": spec.to_json(), "shape": [spec.d_out, spec.d_in], "rank": spec.rank,
           "backend": b.name if b else FORMATION, "family": b.family if b else "formation",
           "device": b.device if b else "cpu"}
    rec.update(kw)
    return rec


def _time_formation(case, config: BenchConfig) -> dict:
    spec = case.spec
    fn = lambda: form_dense(case.Bs, case.As, case.weights)  # noqa: E731
    t0 = time.perf_counter()
    case.dense = fn()
    warm = time.perf_counter() - t0
    timing = time_call(fn, repeats=config.repeats, min_repeats=config.min_repeats, budget_s=config.budget_s, warmup_s=warm)
    fl = F.form_factored(spec.d_out, spec.d_in, spec.total_rank)
    return _record(spec, None, status="ok", timing=timing.to_json(), time_s=timing.median, kernel_s=timing.median,
                   iqr_rel=timing.spread, flops=fl, gflops=fl / timing.median / 1e9)


def _run_one(case, b: Backend, config: BenchConfig, formation: dict | None, case_file: str | None = None) -> dict:
    spec, settings = case.spec, config.settings
    try:
        inputs = b.prepare(case, settings)
        peak = PeakMemory() if config.memory == "inprocess" else None
        t0 = time.perf_counter()
        if peak is not None:
            with peak:
                result = b.run(inputs, settings)
                b.sync()
        else:
            result = b.run(inputs, settings)
            b.sync()
        warm = time.perf_counter() - t0
        acc = accuracy.score(case.matrix, case.truth_singular_values(), *b.to_numpy(result), spec.rank)
        del result
        for _ in range(config.warmup - 1):
            b.run(inputs, settings)
            b.sync()
        timing = time_call(lambda: b.run(inputs, settings), repeats=config.repeats, min_repeats=config.min_repeats,
                           budget_s=config.budget_s, sync=b.sync, warmup_s=warm)
        info = {}
        if hasattr(b, "count_products"):
            info["arpack_products"] = b.count_products(case, settings)
        fl = b.flops(case, settings, info)
        kernel = timing.median
        total, form_note = kernel, None
        if b.uses_formed_matrix(case) and formation is not None:
            form_note = "formation excluded"
            if config.include_formation:
                total += formation["time_s"]
                fl = fl + formation["flops"] if fl is not None else None
                form_note = "formation included"
        rec = _record(spec, b, status="ok", timing=timing.to_json(), kernel_s=kernel, time_s=total,
                      iqr_rel=timing.spread, flops=fl, gflops=(fl / total / 1e9) if fl else None,
                      formation=form_note, **acc, **b.extra(case, settings))
        if peak is not None:
            rec.update(peak_bytes=peak.peak_bytes, peak_method=f"inprocess {peak.method}")
        elif config.memory == "subprocess":
            rec.update(_subprocess_peak(case_file, b, settings))
        rec["accurate"] = _is_accurate(rec, config.accurate_ratio)
        return rec
    except Exception as exc:  # noqa: BLE001 - one failing backend must not stop the suite
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return _record(spec, b, status="error", reason=f"{type(exc).__name__}: {msg}"[:200])


def _is_accurate(rec: dict, ratio: float) -> bool:
    if rec.get("err_ratio") is not None:
        return rec["err_ratio"] <= ratio
    return rec.get("err_rel") is not None and rec["err_rel"] <= 1e-4


def _subprocess_peak(case_file: str, b: Backend, settings: BenchSettings) -> dict:
    job = {"case_file": case_file, "backend": b.name,
           "settings": {"oversample": settings.oversample, "power_iters": settings.power_iters,
                        "seed": settings.seed, "threads": settings.threads}}
    env = dict(os.environ)
    if settings.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(settings.threads)
    proc = subprocess.run([*python_command(), "-m", "server.bench.worker"], input=json.dumps(job), text=True,
                          capture_output=True, env=env, timeout=900, check=False)
    if proc.returncode != 0:
        return {"peak_bytes": None, "peak_method": f"subprocess failed: {proc.stderr.strip().splitlines()[-1:]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_bytes": out["peak_bytes"], "peak_method": f"subprocess {out['method']}"}


def _progress_line(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['backend']:<28} {rec['status']}: {rec.get('reason', '')}"
    ratio = rec.get("err_ratio")
    err = f"err/opt {ratio:.6f}" if ratio is not None else f"err_rel {rec.get('err_rel', float('nan')):.2e}"
    mem = rec.get("peak_bytes")
    mem_s = f"{mem / 2**20:.0f} MiB" if mem is not None else "-"
    return f"{rec['backend']:<28} {rec['time_s']:.4f} s (IQR {100 * rec['iqr_rel']:.0f}%)  {err}  peak {mem_s}"
