"""The FlexLoRA Flower ServerApp (``[tool.flwr.app.components] serverapp``).

``flwr run . <superlink-connection>`` runs it on the SuperLink: probe the nodes, build the
federation exactly as ``flexlora simulate`` does (``build_federation`` of the same run config,
with the ranks the nodes report), run the rounds with the federation core's ``RoundEngine`` through
:class:`~server.runtimes.flower.strategy.FlexLoRAFlowerStrategy`, evaluate the global model on the
held-out clients (``client-task=simulated``), and after every round write an atomic checkpoint
(the engine's, so ``--resume`` works from either runtime) and ``flower-results.json`` into
``output-dir``. ``flwr run`` exits 0 even when
the run fails, so the results file's ``status`` ("running" / "ok" / "failed" with ``error``)
is what scripts and tests check.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import CHECKPOINT_NAME
from server.runtimes.build import build_federation, load_shared_base
from server.runtimes.flower.config import FlowerRunConfig, to_run_config
from server.runtimes.flower.strategy import FlexLoRAFlowerStrategy, probe_nodes

__all__ = ["RESULTS_NAME", "app", "run_flower"]

RESULTS_NAME = "flower-results.json"
log = logging.getLogger("flexlora.flower")


def _write_json(path: Path, doc: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def run_flower(grid: Grid, run_config: dict) -> dict:
    """The whole server side of a Flower run; returns the results document it also writes."""
    t0 = time.perf_counter()
    fcfg = FlowerRunConfig.from_run_config(run_config)
    # the settings that do not depend on the nodes, checked before anything is started
    model_only = {k: v for k, v in run_config.items() if k not in ("clients-per-round", "fraction-train")}
    early = to_run_config(model_only, num_clients=1)
    out = Path(early.checkpoint_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    doc: dict = {"status": "running", "runtime": "flower", "output_dir": str(out), "rounds": [],
                 "rounds_completed": 0, "run_config": {k: v for k, v in run_config.items()}}
    _write_json(results_path, doc)
    try:
        # load the base model while the SuperNodes start their ClientApps to answer the probe
        with ThreadPoolExecutor(max_workers=1) as pool:
            loading = pool.submit(load_shared_base, early.model)
            # the probe also waits for every node's ClientApp to start (imports): node-wait-s at least
            nodes = probe_nodes(grid, min_nodes=fcfg.min_nodes, wait_s=fcfg.node_wait_s,
                                timeout_s=max(fcfg.node_wait_s, fcfg.round_timeout_s))
            base = loading.result()
        doc["base_model"] = base.fingerprint
        cfg = to_run_config(run_config, num_clients=len(nodes)).replace(checkpoint_dir=str(out))
        doc.update(strategy=cfg.strategy, config=cfg.identity(),
                   nodes=[{"node_id": n.node_id, "client_id": n.client_id, "rank": n.spec.label(),
                           "num_examples": n.probe.num_examples, "device": n.probe.device} for n in nodes])
        fed = build_federation(cfg, base=base, specs={n.client_id: n.spec for n in nodes},
                               evaluate=fcfg.evaluate and fcfg.client_task == "simulated")
        strategy = fed.strategy
        engine = fed.engine(runtime="flower", checkpoint_dir=out, logger=log)
        if cfg.resume and engine.restore():
            log.info("resuming after round %d from %s", engine.round, out)
        engine.start()
        doc.update(base=engine.base, rounds=list(engine.history), rounds_completed=engine.round,
                   resumed=engine.resumed)

        def on_round(rnd: int, entry: dict) -> None:
            doc["rounds"].append(entry)
            doc["rounds_completed"] = rnd
            # the ServerApp process's peak RSS so far (Linux: KiB); Flower's Simulation Engine
            # runs the ClientApps in Ray actors, other processes, so this is the server alone
            doc["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            _write_json(results_path, doc)

        wrapper = FlexLoRAFlowerStrategy(strategy, nodes, seed=cfg.seed, round_timeout_s=fcfg.round_timeout_s,
                                         on_round=on_round, first_round=engine.round + 1, engine=engine)
        try:
            wrapper.start(grid, num_rounds=cfg.rounds)
        finally:
            engine.close()   # the checkpoint directory's lock
        doc.update(status="ok", wall_s=time.perf_counter() - t0, checkpoint=str(out / CHECKPOINT_NAME))
        _write_json(results_path, doc)
        return doc
    except Exception as exc:
        doc.update(status="failed", error=f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - t0)
        _write_json(results_path, doc)
        log.error("flexlora Flower run failed: %s", doc["error"])
        raise


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logger = logging.getLogger("flexlora")   # our progress lines in `flwr run --stream`, not httpx's
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    run_flower(grid, dict(context.run_config))
