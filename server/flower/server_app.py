"""The FlexLoRA Flower ServerApp (``[tool.flwr.app.components] serverapp``).

``flwr run . <superlink-connection>`` runs it on the SuperLink: probe the nodes, build the
strategy exactly as ``flexlora simulate`` does (same config, base-model fingerprint, FedIT
rank rule), run the rounds through :class:`~server.flower.strategy.FlexLoRAFlowerStrategy`,
evaluate the global model on the held-out clients (``client-task=simulated``), and after every
round write an atomic checkpoint (the embedded runtime's format, so ``--resume`` works from
either runtime) and ``flower-results.json`` into ``output-dir``. ``flwr run`` exits 0 even when
the run fails, so the results file's ``status`` ("running" / "ok" / "failed" with ``error``)
is what scripts and tests check.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..simulation.checkpoint import load_checkpoint, save_checkpoint
from ..strategies import StrategyConfig, make_strategy
from .config import FlowerRunConfig, simulation_config
from .strategy import FlexLoRAFlowerStrategy, NodeInfo, probe_nodes

__all__ = ["RESULTS_NAME", "app", "run_flower"]

RESULTS_NAME = "flower-results.json"
log = logging.getLogger("flexlora.flower")


def _write_json(path: Path, doc: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _build_strategy(cfg, nodes: list[NodeInfo], base_model: str, module_shapes):
    scfg = StrategyConfig(alpha=cfg.alpha, min_clients=cfg.min_clients, base_model=base_model,
                          module_shapes=module_shapes, seed=cfg.seed, limits=cfg.limits,
                          max_round_bytes=cfg.max_round_bytes)
    options = {}
    if cfg.strategy == "fedit":  # the embedded runtime's rule, over the ranks the nodes reported
        options["rank"] = (min(n.spec.module_rank("x.q_proj") for n in nodes) if cfg.fedit_rank == "min"
                           else max(n.spec.max_rank() for n in nodes))
    return make_strategy(cfg.strategy, scfg, **options)


def run_flower(grid: Grid, run_config: dict) -> dict:
    """The whole server side of a Flower run; returns the results document it also writes."""
    t0 = time.perf_counter()
    fcfg = FlowerRunConfig.from_run_config(run_config)
    out = Path(fcfg.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    doc: dict = {"status": "running", "runtime": "flower", "output_dir": str(out), "rounds": [],
                 "rounds_completed": 0, "run_config": {k: v for k, v in run_config.items()}}
    _write_json(results_path, doc)
    try:
        from ..simulation.model import fingerprint, load_base

        # load the base model while the SuperNodes start their ClientApps to answer the probe
        with ThreadPoolExecutor(max_workers=1) as pool:
            model_only = {k: v for k, v in run_config.items() if k not in ("clients-per-round", "fraction-train")}
            loading = pool.submit(load_base, simulation_config(model_only, num_clients=1).model)
            # the probe also waits for every node's ClientApp to start (imports): node-wait-s at least
            nodes = probe_nodes(grid, min_nodes=fcfg.min_nodes, wait_s=fcfg.node_wait_s,
                                timeout_s=max(fcfg.node_wait_s, fcfg.round_timeout_s))
            model, tokenizer = loading.result()
        if fcfg.client_task == "edge":
            from edge_client.trainer import fingerprint as edge_fingerprint
            base_model = edge_fingerprint(model)
        else:
            base_model = fingerprint(model)
        doc["base_model"] = base_model
        cfg = simulation_config(run_config, num_clients=len(nodes))
        doc.update(strategy=cfg.strategy, config=cfg.identity(),
                   nodes=[{"node_id": n.node_id, "client_id": n.client_id, "rank": n.spec.label(),
                           "num_examples": n.probe.num_examples, "device": n.probe.device} for n in nodes])
        from ..simulation.model import TARGET_MODULES, linear_shapes

        targets = (str(run_config.get("target-modules", "q_proj,v_proj")).split(",")
                   if fcfg.client_task == "edge" else TARGET_MODULES)
        strategy = _build_strategy(cfg, nodes, base_model, linear_shapes(model, targets))
        first_round, history = 1, []
        rng = random.Random(f"runtime-{cfg.seed}")   # the embedded runtime's sampling stream
        if fcfg.resume and (ck := load_checkpoint(out)) is not None:
            if ck.meta.get("config") != cfg.identity() or ck.meta.get("base_model") != base_model:
                raise ValueError(f"resume: checkpoint in {out} was made with other settings or another base model")
            strategy.load_state(ck.strategy_tensors, ck.meta["strategy"])
            first_round = int(ck.meta["round"]) + 1
            version, internal, gauss = ck.meta["rng"]
            rng.setstate((version, tuple(internal), gauss))
            history = [h for h in ck.meta.get("history", []) if "round" in h]
            doc["base"] = next((h["base"] for h in ck.meta.get("history", []) if "base" in h), {})
            log.info("resuming after round %d from %s", first_round - 1, out)
        doc["rounds"], doc["rounds_completed"], doc["resumed"] = history, first_round - 1, first_round > 1

        evaluate_fn = None
        if fcfg.evaluate and fcfg.client_task == "simulated":
            evaluate_fn = _evaluator(cfg, strategy, model, tokenizer)
            if not doc["resumed"]:
                doc["base"] = {k: float(v) for k, v in evaluate_fn(0, None).items()}

        def on_round(rnd: int, entry: dict) -> None:
            doc["rounds"].append(entry)
            doc["rounds_completed"] = rnd
            # the ServerApp process's peak RSS so far (Linux: KiB); Flower's Simulation Engine
            # runs the ClientApps in Ray actors, other processes, so this is the server alone
            doc["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            state = rng.getstate()   # after this round's draw: what a resume continues from
            meta = {"round": rnd, "config": cfg.identity(), "strategy": strategy.state_meta(),
                    "rng": [state[0], list(state[1]), state[2]], "base_model": base_model, "runtime": "flower",
                    "history": [{"base": doc.get("base", {})}, *doc["rounds"]]}
            save_checkpoint(out, meta=meta, strategy_tensors=strategy.state_tensors())
            _write_json(results_path, doc)

        wrapper = FlexLoRAFlowerStrategy(strategy, nodes, seed=cfg.seed, round_timeout_s=fcfg.round_timeout_s,
                                         on_round=on_round, first_round=first_round,
                                         clients_per_round=cfg.clients_per_round, rng=rng)
        wrapper.start(grid, num_rounds=fcfg.num_rounds, evaluate_fn=evaluate_fn)
        doc.update(status="ok", wall_s=time.perf_counter() - t0, checkpoint=str(out / "checkpoint.safetensors"))
        _write_json(results_path, doc)
        return doc
    except Exception as exc:
        doc.update(status="failed", error=f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - t0)
        _write_json(results_path, doc)
        log.error("flexlora Flower run failed: %s", doc["error"])
        raise


def _evaluator(cfg, strategy, model, tokenizer):
    import copy

    from ..simulation.evaluate import evaluate
    from ..simulation.model import apply_delta
    from .simulated import build_suite_for

    base_state = copy.deepcopy(model.state_dict())
    heldout = build_suite_for(cfg).heldout_examples()

    def evaluate_fn(rnd, arrays) -> MetricRecord:
        apply_delta(model, base_state, strategy.global_delta())
        scores = evaluate(model, tokenizer, heldout, max_new_tokens=cfg.eval_max_new_tokens)
        return MetricRecord({k: float(v) for k, v in scores.items()})

    return evaluate_fn


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
