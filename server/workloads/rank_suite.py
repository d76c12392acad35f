"""A task suite where the needed adaptation is genuinely high-rank (issue 12).

Each *family* is a code: a random bijection of the closed word vocabulary (``tasks.WORDS``, 30
words) onto itself, fixed by the suite seed. An example asks to apply code ``k`` to 2-4 words;
the answer is the coded words. A code is a lookup table of 30 independent key -> value facts,
so a family needs on the order of 30 independent directions in the output mapping, and the
suite (``num_families`` codes) far more: capacity, hence held-out loss, keeps improving with
the LoRA rank (``scripts/rank_sensitivity.py`` measures it), which the bundled demo suite does
not need.

Clients (categories ``code<k>-c<i>``) hold one code each and a random share of its word
combinations; unseen clients (held out whole by ``server.workloads.convert.suite_by_category``)
hold codes that training clients also hold, with other word combinations, so the held-out loss
measures how much of each table the global model has learned. Deterministic from ``seed``;
offline; words only from the shipped tokenizer's vocabulary.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from server.workloads.tasks import WORDS

__all__ = ["RankSuiteConfig", "make_codes", "rank_suite_records"]


@dataclass(kw_only=True)
class RankSuiteConfig:
    num_families: int = 4
    clients_per_family: int = 5
    examples_per_client: int = 48
    min_words: int = 2
    max_words: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_families", "clients_per_family", "examples_per_client", "min_words", "max_words"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.min_words > self.max_words or self.max_words > len(WORDS):
            raise ValueError(f"need 1 <= min_words <= max_words <= {len(WORDS)}, got "
                             f"{self.min_words}, {self.max_words}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


_NAMES = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def make_codes(num_families: int, seed: int) -> list[dict[str, str]]:
    """``num_families`` random bijections of ``WORDS`` (no fixed points), deterministic."""
    rng = random.Random(f"codes-{seed}")
    codes = []
    for _ in range(num_families):
        while True:
            perm = list(WORDS)
            rng.shuffle(perm)
            if all(a != b for a, b in zip(WORDS, perm)):
                break
        codes.append(dict(zip(WORDS, perm)))
    return codes


def _code_name(k: int) -> str:
    return _NAMES[k] if k < len(_NAMES) else str(k + 1)


def rank_suite_records(config: RankSuiteConfig | None = None) -> list[dict[str, str]]:
    """The suite as JSONL records (``instruction``, ``input``, ``output``, ``category``)."""
    cfg = config or RankSuiteConfig()
    codes = make_codes(cfg.num_families, cfg.seed)
    rng = random.Random(f"examples-{cfg.seed}")
    out = []
    for k, code in enumerate(codes):
        instruction = f"Apply code {_code_name(k)} to the words."
        for i in range(cfg.clients_per_family):
            for _ in range(cfg.examples_per_client):
                words = rng.sample(WORDS, rng.randint(cfg.min_words, cfg.max_words))
                out.append({"instruction": instruction, "input": " ".join(words),
                            "output": " ".join(code[w] for w in words), "category": f"code{k}-c{i}"})
    return out


def build_rank_suite(*, num_clients: int, num_heldout: int, heldout_examples: int, seed: int,
                     num_families: int = 4, examples_per_client: int = 48):
    """The suite as a ``Suite``: ``num_clients`` training clients and ``num_heldout`` unseen
    clients, families dealt round-robin so every held-out client's code is also trained on
    (held-out clients get ``heldout_examples`` examples each)."""
    from server.workloads.suite import ClientData, Suite

    if num_clients < num_families:
        raise ValueError(f"num_clients={num_clients} must be >= num_families={num_families}")
    per = -(-(num_clients + num_heldout) // num_families)
    cfg = RankSuiteConfig(num_families=num_families, clients_per_family=per,
                          examples_per_client=max(examples_per_client, heldout_examples), seed=seed)
    cats: dict[str, list[dict[str, str]]] = {}
    for rec in rank_suite_records(cfg):
        cats.setdefault(rec["category"], []).append(rec)
    held = [f"code{j % num_families}-c{j // num_families}" for j in range(num_heldout)]
    train = [c for i in range(per) for c in (f"code{k}-c{i}" for k in range(num_families)) if c not in held]
    train = train[:num_clients]
    heldout = [ClientData(client_id=f"heldout-{j:03d}", families=[c], examples=cats[c][:heldout_examples])
               for j, c in enumerate(held)]
    clients = [ClientData(client_id=f"client-{i:03d}", families=[c], examples=cats[c][:examples_per_client])
               for i, c in enumerate(train)]
    return Suite(train=clients, heldout=heldout)
