"""One grid cell: a federation run on a shared, already loaded base model.

The rounds are the federation core's (``server.federation.RoundEngine``) with the simulation's
in-process clients (``server.runtimes.clients``), exactly as ``flexlora simulate`` runs them;
one process reuses one base model for many cells, and each round's entry gains what the report
needs: held-out Rouge-L per task family, the held-out loss, and the spectrum of the global
update (the engine already records wire bytes per client and round).

Client ranks come from ``server/assets/workloads.json`` client types in the proportions of the
rank distribution, allotted by largest remainder (not drawn), so a 16-client federation has
the distribution's mix rather than a noisy sample of it.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edge_client.trainer import LocalTrainer, TrainConfig
from server.federation import RoundEngine
from server.federation.strategies import RankSpec, RobustConfig, StrategyConfig, build_strategy
from server.runtimes.clients import InProcessClients
from server.runtimes.experiments.config import ARMS, Cell, CellSettings
from server.runtimes.experiments.spectrum import collapse_warning, module_spectrum, spectrum_summary
from server.workloads.catalog import load_workloads
from server.workloads.convert import suite_by_category
from server.workloads.devices import DEMO_RANKS
from server.workloads.evaluate import Evaluator
from server.workloads.model import TARGET_MODULES, fingerprint, linear_shapes, load_base
from server.workloads.suite import Suite, SuiteConfig, build_suite

__all__ = ["SharedBase", "load_shared_base", "allot_types", "type_spec", "run_cell", "client_view_loss"]


@dataclass
class SharedBase:
    """The base model loaded once per process; ``model`` is reset to ``state`` per cell."""
    model: object
    eval_model: object
    tokenizer: object
    state: dict
    fingerprint: str
    demo: bool          # the shipped tiny model: client types map to DEMO_RANKS


def load_shared_base(model: str | None = None, *, threads: int | None = None) -> SharedBase:
    import torch

    if threads:
        torch.set_num_threads(threads)
    lm, tok = load_base(model)
    return SharedBase(model=lm, eval_model=copy.deepcopy(lm), tokenizer=tok,
                      state=copy.deepcopy(lm.state_dict()), fingerprint=fingerprint(lm), demo=model is None)


def allot_types(shares: Mapping[str, float], n: int, seed: int) -> list[str]:
    """``n`` client types in the proportions ``shares`` (largest remainder), shuffled by seed."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = float(sum(shares.values()))
    if total <= 0 or any(v < 0 for v in shares.values()):
        raise ValueError(f"shares must be >= 0 with a positive sum, got {dict(shares)}")
    names = sorted(shares)
    exact = {k: shares[k] / total * n for k in names}
    counts = {k: int(np.floor(v)) for k, v in exact.items()}
    by_remainder = sorted(names, key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    out = [k for k in names for _ in range(counts[k])]
    random.Random(f"types-{seed}").shuffle(out)
    return out


def type_spec(client_type: str, *, demo: bool, workloads: Mapping | None = None) -> RankSpec:
    """The RankSpec of a workloads.json client type (attention rank, FFN rank via rank_pattern)."""
    types = (workloads or load_workloads())["client_types"]
    if client_type not in types:
        raise ValueError(f"client_type={client_type!r} is not one of {sorted(types)}")
    attn, ffn = int(types[client_type]["attn"]), int(types[client_type]["ffn"])
    if demo:
        attn, ffn = DEMO_RANKS.get(attn, attn), DEMO_RANKS.get(ffn, ffn)
    pattern = {m: ffn for m in ("gate_proj", "up_proj", "down_proj")} if ffn != attn else {}
    return RankSpec(rank=attn, rank_pattern=pattern)


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


def _suite(settings: CellSettings, seed: int) -> Suite:
    if settings.data:       # real data: one client per category (task), whole categories held out
        return suite_by_category(settings.data, num_clients=settings.num_clients,
                                 num_heldout=settings.num_heldout, seed=seed,
                                 heldout_examples=settings.heldout_examples)
    if settings.suite == "rank":
        from server.workloads.rank_suite import build_rank_suite
        return build_rank_suite(num_clients=settings.num_clients, num_heldout=settings.num_heldout,
                                heldout_examples=settings.heldout_examples, seed=seed)
    return build_suite(SuiteConfig(num_clients=settings.num_clients, num_heldout=settings.num_heldout,
                                   heldout_examples=settings.heldout_examples, seed=seed))


def _shape_check(base: SharedBase) -> dict:
    return linear_shapes(base.model, TARGET_MODULES)


def run_cell(cell: Cell, settings: CellSettings, base: SharedBase,
             on_client: Callable[[int, int, int], None] | None = None) -> dict:
    """Run one federation; returns its result document (JSON-ready).

    ``on_client(round, done, total)`` is called after every client (progress)."""
    arm = ARMS[cell.arm]
    wl = load_workloads()
    if cell.distribution not in wl["rank_distributions"]:
        raise ValueError(f"distribution={cell.distribution!r} is not in workloads.json")
    t_cell = time.perf_counter()
    suite = _suite(settings, cell.seed)
    clients = {c.client_id: c for c in suite.train}
    ids_all = sorted(clients)
    types = dict(zip(ids_all, allot_types(wl["rank_distributions"][cell.distribution], len(ids_all), cell.seed)))
    specs = {cid: type_spec(t, demo=base.demo, workloads=wl) for cid, t in types.items()}
    scfg = StrategyConfig(alpha=settings.alpha, base_model=base.fingerprint, seed=cell.seed,
                          module_shapes=_shape_check(base), limits=settings.decode_limits(),
                          robust=RobustConfig(clip_norm=settings.clip_norm, clip_adaptive=settings.clip_adaptive,
                                              max_weight_share=settings.max_weight_share,
                                              trim_fraction=settings.trim_fraction))
    strategy = build_strategy(arm.strategy, scfg, specs=specs.values(), fedit_rank=arm.fedit_rank or "min",
                              split=settings.split, carry=arm.carry)
    tcfg = TrainConfig(steps=settings.local_steps, batch_size=settings.batch_size, lr=settings.lr,
                       alpha=settings.alpha, max_length=settings.max_length, target_modules=tuple(TARGET_MODULES))
    evaluator = Evaluator(base.eval_model, base.tokenizer, base.state, suite.heldout_examples(),
                          max_new_tokens=settings.eval_max_new_tokens, families=True)

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
        for t in entry["traffic"]:
            t["type"] = types[t["client"]]

    trainer = LocalTrainer(base.model, base.tokenizer, config=tcfg, base_model_id=base.fingerprint)
    with InProcessClients(trainer, {cid: c.examples for cid, c in clients.items()}, base_state=base.state,
                          progress=progress, faults=settings.faults) as transport:
        engine = RoundEngine(strategy, specs, seed=cell.seed, clients_per_round=settings.clients_per_round,
                             evaluate=lambda s: evaluator(s.global_delta()), on_round=add_spectrum,
                             base_model=base.fingerprint, runtime="experiment",
                             max_norm_growth=settings.max_norm_growth)
        engine.run(transport, settings.rounds)
    history = engine.history
    client_view = client_view_loss(strategy, specs, base, suite.heldout_examples(), round=settings.rounds + 1)
    warning = collapse_warning(history[-1]["spectrum"], settings.collapse_threshold) if history else None
    final = history[-1]
    return {"cell": {"arm": cell.arm, "strategy": arm.strategy, "distribution": cell.distribution,
                     "seed": cell.seed, "key": cell.key, "split": settings.split, "carry": arm.carry},
            "fedit_rank": getattr(strategy, "rank", None) if arm.strategy == "fedit" else None, "base": engine.base,
            "final": {"rougeL": final["rougeL"], "exact_match": final["exact_match"],
                      "families": final["families"], "heldout_loss": final["heldout_loss"],
                      "client_view_loss": client_view},
            "rounds": history, "collapse_warning": warning,
            "clients": {cid: {"type": types[cid], "rank": specs[cid].label(),
                              "examples": len(clients[cid].examples)} for cid in ids_all},
            "heldout_families": [c.families for c in suite.heldout],
            "base_model": base.fingerprint, "wall_s": time.perf_counter() - t_cell}
