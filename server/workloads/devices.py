"""Simulated devices and how each client's LoRA rank is decided.

Device mix (``DEVICE_MIX``; shares of the federation, free memory for training):

=================  =====  ===========  ====
class              share  free memory  cpus
=================  =====  ===========  ====
phone-12gb         0.35   5.0 GiB      8
tablet-12gb        0.25   6.5 GiB      8
laptop-12gb        0.20   7.5 GiB      8
laptop-16gb        0.10   12 GiB       8
workstation-32gb   0.10   24 GiB       16
=================  =====  ===========  ====

Each client draws a class (deterministically from the seed), gets a
``DeviceProfile.simulated`` with that budget, and the real edge rank policy
(``edge_client.rank_policy.choose_rank``) picks among the paper's client types (r8, r30,
r30_200, r200 from ``server/assets/workloads.json``) for the *planning model* — the LLaMA-1.3B
shape of the paper (workloads ``llama-1.3b``, fp16 weights, batch 1, sequence 256). With the
policy's estimates the class budgets where each type starts to fit are 4.95 / 5.12 / 6.65 / 7.76 GiB
(r8 / r30 / r30_200 / r200: the estimate, its 10% margin and a 256 MiB system reserve), so the five
classes land on r8, r30, r30_200 and r200: heterogeneous by construction. r8 and r30 differ by
little memory on this model (its adapters are small beside its sequence-256 activations), so the
phone's band is narrow. (The phone and the 12 GB laptop were 6.0 and 8.0 GiB while the memory
model applied float32's activation retention to fp16 weights; the bands moved down with the 16-bit
retention, and so did they, to keep the same types. The phone moved again, 5.2 -> 5.0 GiB, when
the memory model let gradients and optimizer states reuse the activations' freed heap (issue 20):
the r30 band now starts at 5.12.)

``--rank-distribution NAME`` instead draws client types with the probabilities of
``rank_distributions[NAME]`` in workloads.json (the paper's setups).

The shipped demo model (hidden 96) is about 21 times narrower than the planning model (2048), so client types map to
demo ranks with ``DEMO_RANKS`` (order-preserving: r8 -> 2, r30 -> 4, r200 -> 16; r30_200 is
4 on attention and 16 on the FFN). A real ``--model`` trains at the client types' own ranks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edge_client.wire import RankSpec
from server.workloads.catalog import load_workloads

__all__ = ["DeviceClass", "DEVICE_MIX", "DEMO_RANKS", "LLAMA_FFN_KEYS", "ClientDevice", "assign_devices", "allot_types",
           "type_spec", "capped_ranks", "planning_config"]

_GIB = 2**30


@dataclass(kw_only=True, frozen=True)
class DeviceClass:
    name: str
    share: float
    free_memory_gib: float
    cpus: int


DEVICE_MIX: tuple[DeviceClass, ...] = (
    DeviceClass(name="phone-12gb", share=0.35, free_memory_gib=5.0, cpus=8),
    DeviceClass(name="tablet-12gb", share=0.25, free_memory_gib=6.5, cpus=8),
    DeviceClass(name="laptop-12gb", share=0.20, free_memory_gib=7.5, cpus=8),
    DeviceClass(name="laptop-16gb", share=0.10, free_memory_gib=12.0, cpus=8),
    DeviceClass(name="workstation-32gb", share=0.10, free_memory_gib=24.0, cpus=16),
)

DEMO_RANKS = {8: 2, 30: 4, 200: 16}


@dataclass(kw_only=True)
class ClientDevice:
    client_id: str
    device: str                       # device class, or "type:<client type>" with --rank-distribution
    client_type: str                  # r8 | r30 | r30_200 | r200
    spec: RankSpec                    # the rank the client trains at (demo-scaled if applicable)
    reasons: list[str]

    def to_json(self) -> dict:
        return {"client_id": self.client_id, "device": self.device, "client_type": self.client_type,
                "rank": self.spec.label(), "reasons": self.reasons}


def planning_config(workloads: Mapping, name: str = "llama-1.3b"):
    from transformers import LlamaConfig

    m = workloads["models"][name]
    heads = max(1, m["hidden"] // 128)
    return LlamaConfig(hidden_size=m["hidden"], intermediate_size=m["ffn"], num_hidden_layers=m["layers"],
                       num_attention_heads=heads, num_key_value_heads=max(1, heads * m["kv_dim"] // m["hidden"]),
                       vocab_size=32000)


# rank_pattern keys of the FFN projections of the LLaMA-style planning model (and the shipped tiny
# model); a real --model passes its own (edge_client.targets.ffn_pattern_keys).
LLAMA_FFN_KEYS = ("gate_proj", "up_proj", "down_proj")


def type_spec(client_type: str, *, rank_map: Mapping[int, int] | None = None,
              ffn_keys: Sequence[str] = LLAMA_FFN_KEYS, workloads: Mapping | None = None) -> RankSpec:
    """The RankSpec of a workloads.json client type: its attention rank, and its FFN rank on
    ``ffn_keys`` through rank_pattern; ``rank_map`` rescales ranks (``DEMO_RANKS`` for the
    shipped tiny model, :func:`capped_ranks` for a real one)."""
    types = (workloads or load_workloads())["client_types"]
    if client_type not in types:
        raise ValueError(f"client_type={client_type!r} is not one of {sorted(types)}")
    attn, ffn = int(types[client_type]["attn"]), int(types[client_type]["ffn"])
    if rank_map is not None:
        attn, ffn = rank_map.get(attn, attn), rank_map.get(ffn, ffn)
    pattern = {m: ffn for m in ffn_keys} if ffn != attn else {}
    return RankSpec(rank=attn, rank_pattern=pattern)


def capped_ranks(shapes: Mapping[str, tuple[int, int]]) -> dict[int, int]:
    """The client types' ranks capped at the smallest targeted module's size (small real models)."""
    cap = min(min(s) for s in shapes.values())
    return {r: min(r, cap) for r in (8, 30, 200)}


def allot_types(shares: Mapping[str, float], n: int, seed: int) -> list[str]:
    """``n`` client types in the proportions ``shares`` (largest remainder), shuffled by seed:
    a 16-client federation gets the distribution's mix rather than a noisy sample of it."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = float(sum(shares.values()))
    if total <= 0 or any(v < 0 for v in shares.values()):
        raise ValueError(f"shares must be >= 0 with a positive sum, got {dict(shares)}")
    names = sorted(shares)
    exact = {k: shares[k] / total * n for k in names}
    counts = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(names, key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    out = [k for k in names for _ in range(counts[k])]
    random.Random(f"types-{seed}").shuffle(out)
    return out


def _draw(rng: random.Random, shares: Sequence[tuple[str, float]]) -> str:
    x, acc = rng.random() * sum(s for _, s in shares), 0.0
    for name, s in shares:
        acc += s
        if x < acc:
            return name
    return shares[-1][0]


def assign_devices(client_ids: Sequence[str], *, seed: int, rank_distribution: str | None = None,
                   rank_map: Mapping[int, int] | None = DEMO_RANKS, workloads: Mapping | None = None,
                   mix: Sequence[DeviceClass] = DEVICE_MIX,
                   ffn_keys: Sequence[str] = LLAMA_FFN_KEYS, allot: bool = False) -> list[ClientDevice]:
    """Device class (or client type) and rank for every client, deterministic from ``seed``:
    the device mix and the edge rank policy, or with ``rank_distribution`` client types drawn
    with its probabilities (``allot``: in its proportions, :func:`allot_types`, over the
    clients in the order given). ``ffn_keys``: the rank_pattern keys that put a client type's
    FFN rank on the model's FFN."""
    wl = workloads or load_workloads()
    types = wl["client_types"]
    rng = random.Random(f"devices-{seed}")
    out: list[ClientDevice] = []
    if rank_distribution is not None:
        dists = wl["rank_distributions"]
        if rank_distribution not in dists:
            raise ValueError(f"rank_distribution={rank_distribution!r} is not one of {sorted(dists)}")
        shares = sorted(dists[rank_distribution].items())
        if allot:
            drawn = allot_types(dict(shares), len(client_ids), seed)
            how = f"allotted in the proportions of rank_distribution {rank_distribution}"
        else:
            drawn = [_draw(rng, shares) for _ in client_ids]
            how = f"drawn from rank_distribution {rank_distribution}"
        for cid, t in zip(client_ids, drawn):
            out.append(ClientDevice(client_id=cid, device=f"type:{t}", client_type=t,
                                    spec=type_spec(t, rank_map=rank_map, ffn_keys=ffn_keys, workloads=wl),
                                    reasons=[how]))
        return out
    if allot:
        raise ValueError("allot needs a rank_distribution")

    from edge_client.rank_policy import choose_rank, paper_candidates
    from edge_client.resources import DeviceProfile

    config = planning_config(wl)
    candidates = paper_candidates(types)
    by_class: dict[str, tuple[str, list[str]]] = {}
    for cls in mix:  # one policy decision per class: every device of a class is identical
        profile = DeviceProfile.simulated(memory_bytes=int(cls.free_memory_gib * _GIB), cpus=cls.cpus)
        choice = choose_rank(profile, config, candidates=candidates, batch=1, seq_len=256, dtype="float16")
        by_class[cls.name] = (choice.label, list(choice.reasons))
    shares = [(c.name, c.share) for c in mix]
    for cid in client_ids:
        name = _draw(rng, shares)
        label, reasons = by_class[name]
        out.append(ClientDevice(client_id=cid, device=name, client_type=label,
                                spec=type_spec(label, rank_map=rank_map, ffn_keys=ffn_keys, workloads=wl), reasons=reasons))
    return out
