"""One grid cell: a federation run on a shared, already loaded base model.

The loop is the embedded runtime's (``server.simulation.runtime``): every sampled client gets
its rank-specific ``GlobalFactors`` through the wire encoding, trains a peft adapter with
``train_client`` and replies with an encoded ``ClientUpdate`` that the strategy decodes,
validates and streams into its round; FLoRA's clients merge the stack into their base. It is
driven here from the same building blocks so that one process reuses one base model for many
cells and records what the runtime does not expose: wire bytes per client and round, held-out
Rouge-L per task family, and the spectrum of the global update after every round.

Client ranks come from ``benchmarks/workloads.json`` client types in the proportions of the
rank distribution, allotted by largest remainder (not drawn), so a 16-client federation has
the distribution's mix rather than a noisy sample of it.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_client.update import decode_global, encode_global, encode_update

from ..simulation.devices import DEMO_RANKS, load_workloads
from ..simulation.evaluate import generate, score
from ..simulation.local_train import TrainConfig, encode_examples, train_client
from ..simulation.model import TARGET_MODULES, apply_delta, fingerprint, linear_shapes, load_base
from ..simulation.suite import Suite, SuiteConfig, build_suite
from ..strategies import RankSpec, StrategyConfig, make_strategy
from .config import ARMS, Cell, CellSettings
from .convert import suite_by_category
from .spectrum import collapse_warning, module_spectrum, spectrum_summary

__all__ = ["SharedBase", "load_shared_base", "allot_types", "type_spec", "run_cell"]


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


def _suite(settings: CellSettings, seed: int) -> Suite:
    if settings.data:       # real data: one client per category (task), whole categories held out
        return suite_by_category(settings.data, num_clients=settings.num_clients,
                                 num_heldout=settings.num_heldout, seed=seed,
                                 heldout_examples=settings.heldout_examples)
    return build_suite(SuiteConfig(num_clients=settings.num_clients, num_heldout=settings.num_heldout,
                                   heldout_examples=settings.heldout_examples, seed=seed))


def _evaluate(base: SharedBase, delta: Mapping[str, np.ndarray], examples: Sequence[Mapping[str, str]],
              max_new_tokens: int) -> dict:
    apply_delta(base.eval_model, base.state, delta)
    preds = generate(base.eval_model, base.tokenizer, examples, max_new_tokens=max_new_tokens)
    out = score(preds, [ex["output"] for ex in examples])
    families: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        families.setdefault(ex.get("category", "default"), []).append(i)
    out["families"] = {f: score([preds[i] for i in idx], [examples[i]["output"] for i in idx])["rougeL"]
                       for f, idx in sorted(families.items())}
    out["heldout_loss"] = heldout_loss(base.eval_model, base.tokenizer, examples)
    return out


def heldout_loss(model, tokenizer, examples: Sequence[Mapping[str, str]], *, batch_size: int = 32,
                 max_length: int = 128) -> float:
    """Teacher-forced cross-entropy of the responses (token mean): a far less noisy signal
    than greedy-generation Rouge-L on a small held-out set."""
    import torch

    data = encode_examples(tokenizer, examples, max_length)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            chunk = data[i:i + batch_size]
            n = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), n), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), n), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, (x, y) in enumerate(chunk):
                ids[j, :len(x)], labels[j, :len(y)], mask[j, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    return total / max(count, 1)


def _shape_check(base: SharedBase) -> dict:
    """``module_shapes`` for replies' shape validation, where StrategyConfig has the field."""
    from dataclasses import fields

    if "module_shapes" not in {f.name for f in fields(StrategyConfig)}:
        return {}
    return {"module_shapes": linear_shapes(base.model, TARGET_MODULES)}


def _client_seed(seed: int, round: int, index: int) -> int:
    return (seed * 1_000_003 + round * 10_007 + index) % (2**31)


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
    options = {}
    if arm.strategy == "fedit":
        options["rank"] = (min(s.module_rank("x.q_proj") for s in specs.values()) if arm.fedit_rank == "min"
                           else max(s.max_rank() for s in specs.values()))
    scfg = StrategyConfig(alpha=settings.alpha, base_model=base.fingerprint, seed=cell.seed,
                          **_shape_check(base))
    strategy = make_strategy(arm.strategy, scfg, **options)
    tcfg = TrainConfig(steps=settings.local_steps, batch_size=settings.batch_size, lr=settings.lr,
                       alpha=settings.alpha, max_length=settings.max_length, target_modules=TARGET_MODULES)
    heldout = suite.heldout_examples()
    rng = random.Random(f"runtime-{cell.seed}")
    client_delta: dict[str, np.ndarray] = {}
    history = []
    base_scores = _evaluate(base, {}, heldout, settings.eval_max_new_tokens)
    try:
        for rnd in range(1, settings.rounds + 1):
            ids = ids_all if settings.clients_per_round is None else sorted(rng.sample(ids_all, settings.clients_per_round))
            assigned = {cid: strategy.assign_rank(specs[cid]) for cid in ids}
            agg = strategy.begin_round(rnd)
            apply_delta(base.model, base.state, client_delta)
            merged, traffic = False, []
            t_round = time.perf_counter()
            for index, cid in enumerate(ids):
                msg = strategy.configure(client_id=cid, spec=assigned[cid], round=rnd)
                if msg is not None and msg.merge_into_base and not merged:
                    for module in msg.modules():     # FLoRA: every client merges the same stack
                        a, b = msg.factors[module + ".lora_A.weight"], msg.factors[module + ".lora_B.weight"]
                        d = msg.module_scaling(module) * (b @ a)
                        client_delta[module] = client_delta.get(module, 0) + d
                    apply_delta(base.model, base.state, client_delta)
                    merged = True
                wire = encode_global(msg) if msg is not None else None
                update = train_client(base.model, base.tokenizer, client_id=cid, examples=clients[cid].examples,
                                      spec=assigned[cid], init=decode_global(wire) if wire is not None else None,
                                      config=tcfg, seed=_client_seed(cell.seed, rnd, index),
                                      base_model=base.fingerprint, round=rnd)
                reply = encode_update(update)
                agg.add(strategy.decode_reply(reply, spec=assigned[cid]))
                traffic.append({"client": cid, "type": types[cid], "rank": assigned[cid].label(),
                                "sent": len(reply), "received": len(wire) if wire is not None else 0})
                if on_client is not None:
                    on_client(rnd, index + 1, len(ids))
            train_s = time.perf_counter() - t_round
            result = agg.finalize()
            delta = strategy.global_delta()
            t_eval = time.perf_counter()
            scores = _evaluate(base, delta, heldout, settings.eval_max_new_tokens)
            eval_s = time.perf_counter() - t_eval
            # the ranks clients train at (FedIT: one rank, so no collapse warning is possible)
            module_ranks = {m: sorted({s.module_rank(m) for s in assigned.values()}) for m in delta}
            spectrum = module_spectrum(delta, module_ranks)
            history.append({"round": rnd, **scores, "aggregation_s": result.aggregation_s,
                            "train_loss": result.metrics.get("train_loss"), "clients": result.num_clients,
                            "traffic": traffic, "spectrum": spectrum, "spectrum_summary": spectrum_summary(spectrum),
                            "train_s": train_s, "eval_s": eval_s})
    finally:
        apply_delta(base.model, base.state, {})     # leave the shared base clean for the next cell
    warning = collapse_warning(history[-1]["spectrum"], settings.collapse_threshold) if history else None
    final = history[-1]
    return {"cell": {"arm": cell.arm, "strategy": arm.strategy, "distribution": cell.distribution,
                     "seed": cell.seed, "key": cell.key},
            "fedit_rank": options.get("rank"), "base": base_scores,
            "final": {"rougeL": final["rougeL"], "exact_match": final["exact_match"],
                      "families": final["families"], "heldout_loss": final["heldout_loss"]},
            "rounds": history, "collapse_warning": warning,
            "clients": {cid: {"type": types[cid], "rank": specs[cid].label(),
                              "examples": len(clients[cid].examples)} for cid in ids_all},
            "heldout_families": [c.families for c in suite.heldout],
            "base_model": base.fingerprint, "wall_s": time.perf_counter() - t_cell}
