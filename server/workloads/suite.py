"""The bundled federated instruction suite: clients, their task families, held-out clients.

Training clients each hold one or two task families (non-IID, with unequal data sizes);
held-out clients hold pairs of families that no training client holds together ("unseen
mixes"), so evaluation measures generalisation across task combinations. Everything is a
pure function of ``SuiteConfig`` (seed included).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_client.data import iter_jsonl
from server.workloads.tasks import FAMILIES, make_example

__all__ = ["SuiteConfig", "ClientData", "Suite", "build_suite", "write_jsonl", "read_jsonl",
           "load_suite_from_jsonl"]


@dataclass(kw_only=True)
class SuiteConfig:
    num_clients: int = 20
    num_heldout: int = 4
    min_examples: int = 24
    max_examples: int = 64
    heldout_examples: int = 24          # per held-out client
    families: Sequence[str] = field(default_factory=lambda: list(FAMILIES))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.num_heldout < 0:
            raise ValueError(f"num_heldout must be >= 0, got {self.num_heldout}")
        if not 1 <= self.min_examples <= self.max_examples:
            raise ValueError(f"need 1 <= min_examples <= max_examples, got "
                             f"{self.min_examples}, {self.max_examples}")
        if self.heldout_examples < 1:
            raise ValueError(f"heldout_examples must be >= 1, got {self.heldout_examples}")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or len(self.families) < 2:
            raise ValueError(f"families must be >= 2 known families, got {list(self.families)}")


@dataclass(kw_only=True)
class ClientData:
    client_id: str
    families: list[str]
    examples: list[dict[str, str]]


@dataclass(kw_only=True)
class Suite:
    train: list[ClientData]
    heldout: list[ClientData]
    # examples the clients train on, scored to see how much of its own data the global model has
    # learnt (the facts suite: every fact; empty elsewhere)
    recall: list[ClientData] = field(default_factory=list)

    def heldout_examples(self) -> list[dict[str, str]]:
        return [ex for c in self.heldout for ex in c.examples]

    def recall_examples(self) -> list[dict[str, str]]:
        return [ex for c in self.recall for ex in c.examples]


def build_suite(config: SuiteConfig | None = None) -> Suite:
    cfg = config or SuiteConfig()
    rng = random.Random(cfg.seed)
    fams = list(cfg.families)
    rng.shuffle(fams)
    nf = len(fams)
    train: list[ClientData] = []
    seen_pairs: set[frozenset[str]] = set()
    for i in range(cfg.num_clients):
        held = [fams[i % nf]]
        if i % 2 == 1:  # every other client holds a second family
            held.append(fams[(i + 1 + (i // nf)) % nf])
            seen_pairs.add(frozenset(held))
        n = rng.randint(cfg.min_examples, cfg.max_examples)
        examples = [make_example(rng.choice(held), rng) for _ in range(n)]
        train.append(ClientData(client_id=f"client-{i:03d}", families=held, examples=examples))
    unseen = [p for p in itertools.combinations(sorted(fams), 2) if frozenset(p) not in seen_pairs]
    rng.shuffle(unseen)
    heldout = []
    for j in range(cfg.num_heldout):
        pair = list(unseen[j % len(unseen)])
        examples = [make_example(pair[k % 2], rng) for k in range(cfg.heldout_examples)]
        heldout.append(ClientData(client_id=f"heldout-{j:03d}", families=pair, examples=examples))
    return Suite(train=train, heldout=heldout)


def write_jsonl(path: str | Path, records: Iterable[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    out = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str) \
                or not isinstance(rec.get("output"), str):
            raise ValueError(f"{path}:{lineno}: record needs string 'instruction' and 'output'")
        rec.setdefault("input", "")
        rec.setdefault("category", "default")
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def load_suite_from_jsonl(path: str | Path, *, num_clients: int, num_heldout: int,
                          seed: int) -> Suite:
    """Partition a real JSONL data set by ``category``: categories go round-robin to
    training clients, and ``num_heldout`` whole categories are kept for evaluation."""
    records = read_jsonl(path)
    cats: dict[str, list[dict[str, str]]] = {}
    for rec in records:
        cats.setdefault(rec["category"], []).append(rec)
    names = sorted(cats)
    random.Random(seed).shuffle(names)
    if len(names) > num_heldout:
        held_names, train_names = names[:num_heldout], names[num_heldout:]
    else:  # too few categories: hold out a slice of every category instead
        held_names, train_names = [], names
    heldout = [ClientData(client_id=f"heldout-{j:03d}", families=[c], examples=cats[c])
               for j, c in enumerate(held_names)]
    if not heldout:
        pool = [r for c in names for r in cats[c]]
        random.Random(seed + 1).shuffle(pool)
        cut = max(1, len(pool) // 10)
        heldout = [ClientData(client_id="heldout-000", families=names, examples=pool[:cut])]
        cats = {"all": pool[cut:]}
        train_names = ["all"]
    train_records = [r for c in train_names for r in cats[c]]
    train = [ClientData(client_id=f"client-{i:03d}", families=[], examples=[])
             for i in range(num_clients)]
    for i, rec in enumerate(train_records):
        c = train[i % num_clients]
        c.examples.append(rec)
        if rec["category"] not in c.families:
            c.families.append(rec["category"])
    return Suite(train=[c for c in train if c.examples], heldout=heldout)
