"""One grid cell: a federation run on a shared, already loaded base model.

The federation is ``build_federation`` of the cell's ``RunConfig`` (the grid's settings with
the cell's strategy arm, rank distribution and seed) and its rounds are the round engine's
with the in-process clients, exactly as ``flexlora simulate`` runs them; one process reuses one
base model for many cells, and each round's entry gains what the report needs: held-out
Rouge-L per task family, the held-out loss, and the spectrum of the global update (the engine
already records wire bytes per client and round).

Client ranks come from ``server/assets/workloads.json`` client types in the proportions of the
rank distribution, allotted by largest remainder (not drawn), so a 16-client federation has
the distribution's mix rather than a noisy sample of it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping

import numpy as np

from edge_client.wire import RankSpec
from server.runtimes.build import SharedBase, build_federation
from server.runtimes.config import RunConfig
from server.runtimes.experiments.config import ARMS, Cell
from server.runtimes.experiments.spectrum import collapse_warning, module_spectrum, spectrum_summary
from server.workloads.catalog import load_workloads

__all__ = ["cell_config", "run_cell", "client_view_loss", "fedit_rank_of", "reuse_fedit_cell"]


def client_view_loss(strategy, specs: Mapping[str, RankSpec], base: SharedBase, examples, *, round: int) -> float:
    """The official code's view of the global model: each client's model before it trains
    (base + the factors the strategy would send it, e.g. FlexLoRA's rank-r_k truncation; the
    merged global model for FLoRA), its held-out loss averaged over the training clients."""
    from server.workloads.evaluate import apply_delta, heldout_loss

    by_label: dict[str, list[str]] = {}
    for cid, spec in specs.items():
        by_label.setdefault(strategy.assign_rank(spec).label(), []).append(cid)
    total, n = 0.0, 0
    for _label, cids in sorted(by_label.items()):
        spec = strategy.assign_rank(specs[cids[0]])
        msg = strategy.configure(client_id=cids[0], spec=spec, round=round)
        if msg is None or strategy.merge_into_base:
            delta = strategy.global_delta()
        else:
            delta = {}
            for key, a in msg.factors.items():
                if key.endswith(".lora_A.weight"):
                    module = key[: -len(".lora_A.weight")]
                    b = msg.factors[module + ".lora_B.weight"]
                    delta[module] = (msg.module_scaling(module) * (np.asarray(b, np.float64) @ a)).astype(np.float32)
        apply_delta(base.eval_model, base.state, delta)
        total += heldout_loss(base.eval_model, base.tokenizer, examples) * len(cids)
        n += len(cids)
    return total / n


def cell_config(cell: Cell, settings: RunConfig) -> RunConfig:
    """The cell's run: the grid's settings with the arm's strategy, the distribution and the seed."""
    arm = ARMS[cell.arm]
    if cell.distribution not in load_workloads()["rank_distributions"]:
        raise ValueError(f"distribution={cell.distribution!r} is not in workloads.json")
    return settings.replace(strategy=arm.strategy, fedit_rank=arm.fedit_rank or "min", carry=arm.carry,
                            rank_distribution=cell.distribution, seed=cell.seed)


def run_cell(cell: Cell, settings: RunConfig, base: SharedBase,
             on_client: Callable[[int, int, int], None] | None = None) -> dict:
    """Run one federation; returns its result document (JSON-ready).

    ``on_client(round, done, total)`` is called after every client (progress)."""
    arm = ARMS[cell.arm]
    t_cell = time.perf_counter()
    # the facts' recall (a forward pass per fact) is scored before and after the run, not every round
    fed = build_federation(cell_config(cell, settings), base=base, families=True, recall_every_round=False)
    strategy, specs, devices = fed.strategy, fed.specs, fed.workload.devices
    suite = fed.workload.suite

    def progress(orders, rnd):
        for done, order in enumerate(orders, 1):
            yield order
            if on_client is not None:
                on_client(rnd, done, len(orders))

    def add_spectrum(entry: dict) -> None:
        delta = strategy.global_delta()
        # the ranks clients trained at this round (FedIT: one rank, so no collapse warning is possible)
        assigned = [strategy.assign_rank(specs[cid]) for cid in entry["ranks"]]
        module_ranks = {m: sorted({s.module_rank(m) for s in assigned}) for m in delta}
        entry["spectrum"] = module_spectrum(delta, module_ranks)
        entry["spectrum_summary"] = spectrum_summary(entry["spectrum"])
        _type_traffic(entry, devices)

    with fed.in_process_clients(progress=progress) as transport:
        engine = fed.engine(runtime="experiment", on_round=add_spectrum)
        engine.run(transport, settings.rounds)
    history = engine.history
    recall = {"base": fed.evaluator.recall({}), "final": fed.evaluator.recall(strategy.global_delta())}
    client_view = client_view_loss(strategy, specs, base, suite.heldout_examples(), round=settings.rounds + 1)
    warning = collapse_warning(history[-1]["spectrum"], settings.collapse_threshold) if history else None
    final = history[-1]
    return {"cell": {"arm": cell.arm, "strategy": arm.strategy, "distribution": cell.distribution,
                     "seed": cell.seed, "key": cell.key, "split": settings.split, "carry": arm.carry},
            "fedit_rank": getattr(strategy, "rank", None) if arm.strategy == "fedit" else None,
            "base": {**engine.base, **recall["base"]},
            "final": {"rougeL": final["rougeL"], "exact_match": final["exact_match"],
                      "families": final["families"], "heldout_loss": final["heldout_loss"],
                      "client_view_loss": client_view, **recall["final"]},
            "rounds": history, "collapse_warning": warning,
            "clients": _clients(fed),
            "heldout_families": [c.families for c in suite.heldout],
            "base_model": base.fingerprint, "wall_s": time.perf_counter() - t_cell}


def _type_traffic(entry: dict, devices) -> None:
    for t in entry["traffic"]:
        t["type"] = devices[t["client"]].client_type


def _clients(fed) -> dict:
    devices = fed.workload.devices
    return {cid: {"type": devices[cid].client_type, "rank": fed.specs[cid].label(),
                  "examples": len(fed.workload.examples[cid])} for cid in sorted(devices)}


def fedit_rank_of(cell: Cell, settings: RunConfig, base: SharedBase) -> int | None:
    """The one rank a FedIT cell trains every client at (None for other arms): its distribution's
    smallest or largest device rank. Builds the federation, trains nothing."""
    if ARMS[cell.arm].strategy != "fedit":
        return None
    return build_federation(cell_config(cell, settings), base=base, evaluate=False).strategy.rank


def reuse_fedit_cell(cell: Cell, settings: RunConfig, base: SharedBase, twin: Mapping) -> dict:
    """``cell``'s document from ``twin``, a finished cell of the same FedIT arm and seed under
    another distribution with the same resolved rank. FedIT trains every client at that one rank;
    the clients, their data, the round's sampling (by client id) and the clients' seeds do not
    depend on the distribution, so the run is the same one. Only what the distribution names
    changes: the cell, the clients' device types and own ranks, and the types in the traffic
    records. ``reused_from`` says where the numbers come from."""
    fed = build_federation(cell_config(cell, settings), base=base, evaluate=False)
    rank = fed.strategy.rank if ARMS[cell.arm].strategy == "fedit" else None
    if rank is None or twin.get("fedit_rank") != rank or twin["cell"]["arm"] != cell.arm \
            or twin["cell"]["seed"] != cell.seed or twin["cell"]["distribution"] == cell.distribution:
        raise ValueError(f"{twin['cell']['key']} is not a FedIT twin of {cell.key} (rank {rank})")
    doc = copy.deepcopy(dict(twin))
    doc["cell"] = {**doc["cell"], "distribution": cell.distribution, "key": cell.key}
    doc["clients"] = _clients(fed)
    for entry in doc["rounds"]:
        _type_traffic(entry, fed.workload.devices)
    doc["reused_from"] = twin.get("reused_from") or twin["cell"]["key"]
    return doc
