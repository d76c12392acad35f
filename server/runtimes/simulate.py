"""The embedded runtime: a whole federation in one process (``flexlora simulate``).

Each round every sampled client is sent its rank-specific ``GlobalFactors`` (through the wire
encoding), trains locally, and replies with an encoded ``ClientUpdate``; the server decodes
and validates each reply against what it assigned (rejections are logged with their reason),
streams the valid ones into the strategy, evaluates the global model on the held-out clients,
and writes an atomic checkpoint. A client that does not reply within ``client_timeout_s`` is
dropped. Fewer than ``min_clients`` valid replies fail the run with the state of the last
completed round intact on disk.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict

from server.federation import ResumeError
from server.federation.strategies import RoundFailed
from server.runtimes.build import build_federation, load_shared_base
from server.runtimes.config import RunConfig

__all__ = ["SimulationError", "run_simulation", "results_summary"]

log = logging.getLogger("flexlora.simulate")


class SimulationError(RuntimeError):
    """A run could not go on (e.g. a round below min_clients); the message says why."""


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so setup garbage does not count as server RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: VmHWM) so later peaks exclude the setup."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _progress(cfg: RunConfig):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return lambda orders, rnd: tqdm(orders, desc=f"round {rnd}/{cfg.rounds}", unit="client", file=sys.stderr,
                                    leave=False)


def run_simulation(cfg: RunConfig, *, stop_after: int | None = None) -> dict:
    """Run (or resume) the federation; returns the results document (also what --json prints).

    ``stop_after`` ends the run after that many rounds of this invocation (tests).
    """
    t0 = time.perf_counter()
    # The shipped tiny model trains fastest on one thread (tiny matmuls); the native
    # aggregation core keeps its own thread setting.
    base = load_shared_base(cfg.model, threads=cfg.threads or (1 if cfg.model is None else None))
    fed = build_federation(cfg, base=base, families=True)
    with fed.in_process_clients(progress=_progress(cfg)) as transport:
        engine = fed.engine(runtime="embedded", checkpoint_dir=cfg.checkpoint_dir, runtime_state=transport,
                            logger=log, overwrite=cfg.overwrite)
        try:
            resumed = bool(cfg.resume and engine.restore(cfg.resume_round))
            engine.start()
        except ResumeError as exc:
            engine.close()
            raise SimulationError(f"--{exc}") from None
        except BaseException:
            engine.close()
            raise
        setup_peak = _peak_rss_bytes()
        _release_free_memory()
        reset = _reset_peak_rss()
        try:
            engine.run(transport, cfg.rounds, stop_after=stop_after)
        except RoundFailed as exc:
            raise SimulationError(str(exc)) from None
        finally:
            engine.close()
    suite = fed.workload.suite
    return {
        "strategy": cfg.strategy, "config": asdict(cfg), "base_model": base.fingerprint,
        "base": engine.base, "rounds": engine.history, "rounds_completed": engine.round, "resumed": resumed,
        "devices": [d.to_json() for d in fed.workload.devices.values()],
        "heldout_examples": len(suite.heldout_examples()),
        "heldout_families": [c.families for c in suite.heldout],
        # ru_maxrss is reset with VmHWM on Linux, hence the max with the setup's peak
        "peak_rss_bytes": max(setup_peak, _peak_rss_bytes()), "setup_peak_rss_bytes": setup_peak,
        # peak RSS while rounds ran (server + simulated clients), setup (model load, rank policy) excluded
        "rounds_peak_rss_bytes": _vm_hwm_bytes() if reset else None,
        "wall_s": time.perf_counter() - t0,
    }


def results_summary(doc: Mapping) -> str:
    """The human-readable closing summary."""
    lines = [f"strategy {doc['strategy']}: {doc['rounds_completed']} rounds, "
             f"{len(doc['devices'])} clients, {doc['heldout_examples']} held-out examples "
             f"(families {', '.join('+'.join(f) for f in doc['heldout_families'])})"]
    counts: dict[str, int] = {}
    for d in doc["devices"]:
        key = f"{d['device']} -> {d['client_type']} (rank {d['rank']})"
        counts[key] = counts.get(key, 0) + 1
    lines.append("devices and ranks: " + "; ".join(f"{n} x {k}" for k, n in sorted(counts.items())))
    lines.append(f"{'round':>5}  {'rougeL':>7}  {'exact':>6}  {'ho_loss':>7}  {'clients':>7}  {'rejected':>8}  "
                 f"{'train_loss':>10}  {'agg_s':>7}  {'train_s':>7}")
    b = doc["base"]
    if b:
        lines.append(f"{'base':>5}  {b['rougeL']:7.4f}  {b['exact_match']:6.3f}  "
                     f"{b.get('heldout_loss', float('nan')):7.4f}")
    for r in doc["rounds"]:
        lines.append(f"{r['round']:>5}  {r['rougeL']:7.4f}  {r['exact_match']:6.3f}  "
                     f"{r.get('heldout_loss', float('nan')):7.4f}  {r['clients']:>7}  "
                     f"{len(r['rejected']):>8}  {r.get('train_loss', float('nan')):10.4f}  "
                     f"{r['aggregation_s']:7.3f}  {r['train_s']:7.1f}")
    rounds_peak = doc.get("rounds_peak_rss_bytes")
    during = f", {rounds_peak / 2**20:.0f} MiB during the rounds" if rounds_peak else ""
    agg = sum(r["aggregation_s"] for r in doc["rounds"])
    lines.append(f"server aggregation {agg:.3f} s in total; peak RSS {doc['peak_rss_bytes'] / 2**20:.0f} MiB"
                 f" (setup: model, rank policy){during}; wall {doc['wall_s']:.1f} s")
    done = [r for r in doc["rounds"] if "rougeL" in r]
    if done and b:
        last = done[-1]
        loss = ""
        if "heldout_loss" in b and "heldout_loss" in last:
            loss = (f"held-out loss {b['heldout_loss']:.4f} (base) -> {last['heldout_loss']:.4f} "
                    f"({last['heldout_loss'] - b['heldout_loss']:+.4f}); ")
        lines.append(f"after round {last['round']}: {loss}Rouge-L {b['rougeL']:.4f} -> {last['rougeL']:.4f} "
                     f"({last['rougeL'] - b['rougeL']:+.4f})")
        fams_b, fams_l = b.get("families") or {}, last.get("families") or {}
        if len(fams_b) > 1 and fams_l:
            lines.append("Rouge-L per held-out task: " + ", ".join(
                f"{f} {fams_b[f]:.3f} -> {fams_l.get(f, float('nan')):.3f}" for f in sorted(fams_b)))
        if "recall_exact" in b and "recall_exact" in last:
            lines.append(f"the federation's own facts (teacher-forced): exact {b['recall_exact']:.3f} (base) -> "
                         f"{last['recall_exact']:.3f}, loss {b['recall_loss']:.4f} -> {last['recall_loss']:.4f}")
    return "\n".join(lines)
