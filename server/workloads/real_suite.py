"""The real-content multi-task instruction suite (issue 20), after the paper's Natural-Instructions
split (Bai et al. 2024, Sec. 5.1): clients are tasks, and the measure is tasks no client trained on.

From the task table of :mod:`.real_tasks` (33 task types: knowledge look-ups, transformations,
classifications, each with its own instruction and source of facts), :func:`build_real_suite`

1. holds out ``num_unseen_tasks`` whole tasks, drawn per kind in proportion (seed-fixed): the
   unseen-task evaluation set, ``unseen_examples`` examples each;
2. from every other task reserves ``seen_heldout_examples`` examples that no client gets: the
   held-out evaluation set of seen tasks;
3. gives every training client one or two of the remaining tasks (every other client two), with
   unequal sizes (drawn from ``client_sizes``, split unequally between a client's two tasks), dealt
   so every seen task has a client while there are enough client slots.

Examples of a task never repeat before its pool is spent (then a client's draw wraps). Records
are the client JSONL format (``instruction``, ``input``, ``output``, ``category`` = task);
:func:`export_jsonl` writes train / seen / unseen JSONL and a manifest with every task's source
and the source versions. Everything is a pure function of ``RealSuiteConfig``.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.workloads.real_tasks import KINDS, TASKS, source_versions
from server.workloads.suite import ClientData, Suite, write_jsonl

__all__ = ["RealSuiteConfig", "RealSuite", "build_real_suite", "real_suite", "export_jsonl", "split_evaluators",
           "FACTS_TASKS", "FactsSuiteConfig", "FactsSuite", "facts_suite", "FACTS_QV_TASKS",
           "build_facts_federation"]


def _int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"RealSuiteConfig.{name} must be an int >= {lo}, got {value!r}")
    return value


def _tasks(owner: str, tasks) -> tuple[str, ...]:
    """``tasks`` as a tuple of known task names without repeats (ValueError naming ``owner`` otherwise)."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"{owner}.tasks has unknown tasks {unknown}; known: {sorted(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{owner}.tasks has duplicates: {list(tasks)}")
    return tasks


@dataclass(kw_only=True)
class RealSuiteConfig:
    num_clients: int = 20
    num_unseen_tasks: int = 6
    client_sizes: tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128)   # examples per client, drawn per client
    seen_heldout_examples: int = 8       # per seen task, never given to a client
    unseen_examples: int = 16            # per unseen task
    tasks: tuple[str, ...] = field(default_factory=lambda: tuple(TASKS))
    unseen: tuple[str, ...] = ()         # hold out exactly these tasks (their count is num_unseen_tasks)
    seed: int = 0

    def __post_init__(self) -> None:
        _int("num_clients", self.num_clients, 1)
        _int("num_unseen_tasks", self.num_unseen_tasks, 0)
        _int("seen_heldout_examples", self.seen_heldout_examples, 0)
        _int("unseen_examples", self.unseen_examples, 1)
        _int("seed", self.seed, -2**63)
        self.client_sizes = tuple(self.client_sizes)
        if not self.client_sizes:
            raise ValueError("RealSuiteConfig.client_sizes must not be empty")
        for i, n in enumerate(self.client_sizes):
            _int(f"client_sizes[{i}]", n, 2)
        self.tasks = _tasks("RealSuiteConfig", self.tasks)
        if isinstance(self.unseen, str):
            raise ValueError(f"RealSuiteConfig.unseen must be a sequence of task names, got the string {self.unseen!r}")
        self.unseen = tuple(self.unseen)
        if self.unseen:
            missing = [t for t in self.unseen if t not in self.tasks]
            if missing:
                raise ValueError(f"RealSuiteConfig.unseen names tasks not in the suite: {missing}; "
                                 f"known: {sorted(self.tasks)}")
            if len(set(self.unseen)) != len(self.unseen):
                raise ValueError(f"RealSuiteConfig.unseen has duplicates: {list(self.unseen)}")
            if self.num_unseen_tasks != len(self.unseen):
                raise ValueError(f"RealSuiteConfig.unseen names {len(self.unseen)} tasks but num_unseen_tasks is "
                                 f"{self.num_unseen_tasks}; hold out {len(self.unseen)} (one per task)")
        if self.num_unseen_tasks >= len(self.tasks):
            raise ValueError(f"RealSuiteConfig.num_unseen_tasks={self.num_unseen_tasks} leaves no task to train on "
                             f"({len(self.tasks)} tasks)")


@dataclass(kw_only=True)
class RealSuite:
    config: RealSuiteConfig
    train: list[ClientData]
    heldout_seen: list[ClientData]       # one per seen task: examples no client holds
    heldout_unseen: list[ClientData]     # one per unseen task: a task no client holds
    unused_tasks: list[str]              # neither unseen nor held by a client (too few clients)

    def seen_tasks(self) -> list[str]:
        return sorted({t for c in self.train for t in c.families})

    def unseen_tasks(self) -> list[str]:
        return [c.families[0] for c in self.heldout_unseen]

    def as_suite(self, heldout: str = "unseen") -> Suite:
        """The runtimes' ``Suite``: training clients and the held-out set ``unseen`` (the paper's
        metric), ``seen`` or ``both``."""
        sets = {"unseen": self.heldout_unseen, "seen": self.heldout_seen,
                "both": self.heldout_unseen + self.heldout_seen}
        if heldout not in sets:
            raise ValueError(f"heldout must be one of {sorted(sets)}, got {heldout!r}")
        return Suite(train=self.train, heldout=sets[heldout])

    def manifest(self) -> dict:
        seen, unseen = set(self.seen_tasks()), set(self.unseen_tasks())
        return {"config": asdict(self.config), "sources": source_versions(),
                "tasks": [{"task": n, "kind": t.kind, "instruction": t.instruction, "source": t.source,
                           "pool": len(t.items()),
                           "split": "seen" if n in seen else "unseen" if n in unseen else "unused"}
                          for n, t in TASKS.items() if n in self.config.tasks],
                "clients": [{"client": c.client_id, "tasks": c.families, "examples": len(c.examples)}
                            for c in self.train]}


def _record(task: str, pair: tuple[str, str]) -> dict[str, str]:
    return {"instruction": TASKS[task].instruction, "input": pair[0], "output": pair[1], "category": task}


def _pick_unseen(tasks: list[str], k: int, rng: random.Random) -> list[str]:
    """``k`` tasks, spread over the kinds in proportion to how many tasks each kind has."""
    by_kind = {kind: sorted(t for t in tasks if TASKS[t].kind == kind) for kind in KINDS}
    for names in by_kind.values():
        rng.shuffle(names)
    picked: list[str] = []
    while len(picked) < k:    # the kind whose share of the picks lags its share of the tasks most
        kind = min((kd for kd in KINDS if by_kind[kd]),
                   key=lambda kd: (sum(TASKS[p].kind == kd for p in picked) + 1) / (len(by_kind[kd]) + 1e-9))
        picked.append(by_kind[kind].pop())
    return sorted(picked)


def real_suite(config: RealSuiteConfig | None = None) -> RealSuite:
    cfg = config or RealSuiteConfig()
    rng = random.Random(f"real-suite-{cfg.seed}")
    unseen = sorted(cfg.unseen) if cfg.unseen else _pick_unseen(list(cfg.tasks), cfg.num_unseen_tasks, rng)
    seen = [t for t in cfg.tasks if t not in unseen]
    rng.shuffle(seen)

    pools: dict[str, list[tuple[str, str]]] = {}
    for t in cfg.tasks:
        pool = list(TASKS[t].items())
        rng.shuffle(pool)
        pools[t] = pool
    heldout_unseen = [ClientData(client_id=f"unseen-{t}", families=[t],
                                 examples=[_record(t, p) for p in pools[t][:cfg.unseen_examples]])
                      for t in unseen]
    heldout_seen, train_pools = [], {}
    for t in sorted(seen):
        # keep at least half of a small pool for training
        cut = min(cfg.seen_heldout_examples, len(pools[t]) // 2)
        if cut:
            heldout_seen.append(ClientData(client_id=f"seen-{t}", families=[t],
                                           examples=[_record(t, p) for p in pools[t][:cut]]))
        train_pools[t] = pools[t][cut:]
    cursor = dict.fromkeys(seen, 0)

    def draw(task: str, n: int) -> list[dict[str, str]]:
        pool, start = train_pools[task], cursor[task]
        cursor[task] = start + n
        return [_record(task, pool[(start + i) % len(pool)]) for i in range(n)]

    train, slot = [], 0
    for i in range(cfg.num_clients):
        count = 2 if i % 2 == 1 and len(seen) > 1 else 1
        held = [seen[(slot + j) % len(seen)] for j in range(count)]
        slot += count
        n = rng.choice(cfg.client_sizes)
        if count == 2:
            first = max(1, min(n - 1, round(n * rng.uniform(0.55, 0.8))))
            examples = draw(held[0], first) + draw(held[1], n - first)
            rng.shuffle(examples)
        else:
            examples = draw(held[0], n)
        train.append(ClientData(client_id=f"client-{i:03d}", families=held, examples=examples))
    held_tasks = {t for c in train for t in c.families}
    heldout_seen = [c for c in heldout_seen if c.families[0] in held_tasks]
    return RealSuite(config=cfg, train=train, heldout_seen=heldout_seen, heldout_unseen=heldout_unseen,
                     unused_tasks=sorted(t for t in seen if t not in held_tasks))


def build_real_suite(*, num_clients: int, num_heldout: int, heldout_examples: int, seed: int,
                     heldout: str = "unseen", unseen: tuple[str, ...] = ()) -> Suite:
    """The suite as the runtimes take it (same arguments as ``build_rank_suite``): ``num_heldout``
    unseen tasks of ``heldout_examples`` examples each (``unseen``: exactly these tasks, else the
    seed's draw); ``heldout`` picks the evaluation set."""
    cfg = RealSuiteConfig(num_clients=num_clients, num_unseen_tasks=num_heldout, unseen_examples=heldout_examples,
                          seed=seed, unseen=tuple(unseen))
    return real_suite(cfg).as_suite(heldout)


def export_jsonl(suite: RealSuite, out_dir: str | Path) -> dict[str, Path]:
    """``train.jsonl`` (records with ``client``), ``heldout_seen.jsonl``, ``heldout_unseen.jsonl``
    and ``manifest.json`` (tasks, kinds, instructions, sources, splits, source versions)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "heldout_seen", "heldout_unseen")}
    write_jsonl(paths["train"], ({**r, "client": c.client_id} for c in suite.train for r in c.examples))
    write_jsonl(paths["heldout_seen"], (r for c in suite.heldout_seen for r in c.examples))
    write_jsonl(paths["heldout_unseen"], (r for c in suite.heldout_unseen for r in c.examples))
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(json.dumps(suite.manifest(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def split_evaluators(model, tokenizer, base_state, suite: RealSuite, **kw) -> dict:
    """One ``Evaluator`` per evaluation set (``seen``: held-out examples of trained tasks; ``unseen``:
    tasks no client holds), each reporting Rouge-L, exact match, held-out loss and per-task Rouge-L.
    They share ``model`` (each call resets it to ``base_state`` plus the delta)."""
    from server.workloads.evaluate import Evaluator

    sets = {"seen": [r for c in suite.heldout_seen for r in c.examples],
            "unseen": [r for c in suite.heldout_unseen for r in c.examples]}
    return {name: Evaluator(model, tokenizer, base_state, examples, families=True, **kw)
            for name, examples in sets.items() if examples}


# ---------------------------------------------------------------------------------------------- facts variant
# Knowledge look-ups whose answers are arbitrary codes or long names (not inferable from the input
# by a rule): learning them is memorisation, the regime where adapter capacity should show.
FACTS_TASKS = ("unicode_name", "country_numeric", "currency_numeric", "element_mass", "language_alpha3")


@dataclass(kw_only=True)
class FactsSuiteConfig:
    """The memorisation variant of the suite (issue 20, rank sensitivity): a fixed set of
    ``facts_per_task`` facts of each of ``tasks``, trained for several epochs; the measures are the
    loss on those trained facts (memorisation), on ``heldout_per_task`` other facts of the same
    tasks, and on the real suite's unseen tasks (same ``seed``; the facts tasks must not be among them)."""
    tasks: tuple[str, ...] = FACTS_TASKS
    facts_per_task: int = 24
    heldout_per_task: int = 16
    num_unseen_tasks: int = 6
    unseen_examples: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _int("facts_per_task", self.facts_per_task, 1)
        _int("heldout_per_task", self.heldout_per_task, 0)
        _int("num_unseen_tasks", self.num_unseen_tasks, 0)
        _int("unseen_examples", self.unseen_examples, 1)
        _int("seed", self.seed, -2**63)
        self.tasks = _tasks("FactsSuiteConfig", self.tasks)
        if not self.tasks:
            raise ValueError("FactsSuiteConfig.tasks must not be empty")
        for t in self.tasks:
            need = self.facts_per_task + self.heldout_per_task
            if len(TASKS[t].items()) < need:
                raise ValueError(f"FactsSuiteConfig: task {t!r} has {len(TASKS[t].items())} facts, fewer than "
                                 f"facts_per_task + heldout_per_task = {need}")


@dataclass(kw_only=True)
class FactsSuite:
    config: FactsSuiteConfig
    train: list[dict]            # the facts trained on (every epoch sees all of them)
    heldout_seen: list[dict]     # other facts of the same tasks, never trained on
    heldout_unseen: list[dict]   # the real suite's unseen tasks

    def unseen_tasks(self) -> list[str]:
        return sorted({r["category"] for r in self.heldout_unseen})


def facts_suite(config: FactsSuiteConfig | None = None) -> FactsSuite:
    """The facts variant, a pure function of ``config``: per task a seeded draw of disjoint trained
    and held-out facts; the unseen set is :func:`real_suite`'s at the same seed."""
    cfg = config or FactsSuiteConfig()
    real = real_suite(RealSuiteConfig(num_unseen_tasks=cfg.num_unseen_tasks, unseen_examples=cfg.unseen_examples,
                                      seed=cfg.seed))
    clash = sorted(set(cfg.tasks) & set(real.unseen_tasks()))
    if clash:
        raise ValueError(f"FactsSuiteConfig.tasks {clash} are unseen tasks of the real suite at seed {cfg.seed}; "
                         "pick other tasks or another seed")
    rng = random.Random(f"facts-suite-{cfg.seed}")
    train, held = [], []
    for t in cfg.tasks:
        pool = rng.sample(TASKS[t].items(), cfg.facts_per_task + cfg.heldout_per_task)
        train += [_record(t, p) for p in pool[:cfg.facts_per_task]]
        held += [_record(t, p) for p in pool[cfg.facts_per_task:]]
    return FactsSuite(config=cfg, train=train, heldout_seen=held,
                      heldout_unseen=[r for c in real.heldout_unseen for r in c.examples])


# ------------------------------------------------------------------------------------ facts federation
# The central probe's capacity-bound setting (scripts/rank_sensitivity.py --suite facts --targets
# q_proj,v_proj): 4 x 70 = 280 arbitrary facts, which a q/v-only adapter must memorise.
FACTS_QV_TASKS = ("country_numeric", "currency_numeric", "language_alpha3", "element_mass")


def _deal(n: int, weights: list[float]) -> list[int]:
    """``n`` items over ``len(weights)`` holders in proportion to ``weights``, every holder at
    least one (largest remainder on what is left after one each); the counts sum to ``n``."""
    rest = n - len(weights)
    total = sum(weights)
    shares = [rest * w / total for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[:rest - sum(counts)]:
        counts[i] += 1
    return [1 + c for c in counts]


def build_facts_federation(*, num_clients: int, num_heldout: int, heldout_examples: int, seed: int,
                           tasks: tuple[str, ...] = FACTS_QV_TASKS, facts_per_task: int = 70) -> Suite:
    """The facts suite (:func:`facts_suite`, ``heldout_per_task=0``) as a federation, a pure
    function of its arguments (same arguments as ``build_real_suite`` plus the facts):

    * client ``i`` holds one task (even ``i``) or two (odd ``i``), dealt round-robin over
      ``tasks`` as :func:`real_suite` deals its tasks; every task needs a client;
    * each task's ``facts_per_task`` facts are split among the clients holding it in unequal,
      seeded proportions; every fact goes to exactly one client, every client gets at least one;
    * held out: the real suite's ``num_heldout`` unseen tasks at ``seed`` (``heldout_examples``
      examples each, one ``unseen-{task}`` client per task), as ``build_real_suite``'s;
    * recall: every fact, one ``facts-{task}`` set per task (what the federation must memorise:
      the evaluator's ``recall_*`` scores, where the central rank curve's effect lives).

    ValueError when a facts task is one of those unseen tasks (pick another seed), when too few
    clients leave a task without one, or too many leave a client without a fact."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"build_facts_federation: num_clients must be an int >= 1, got {num_clients!r}")
    facts = facts_suite(FactsSuiteConfig(tasks=tasks, facts_per_task=facts_per_task, heldout_per_task=0,
                                         num_unseen_tasks=num_heldout, unseen_examples=heldout_examples, seed=seed))
    tasks = facts.config.tasks
    held: list[list[str]] = []
    slot = 0
    for i in range(num_clients):
        count = 2 if i % 2 == 1 and len(tasks) > 1 else 1
        held.append([tasks[(slot + j) % len(tasks)] for j in range(count)])
        slot += count
    holders = {t: [i for i, h in enumerate(held) if t in h] for t in tasks}
    empty = [t for t in tasks if not holders[t]]
    if empty:
        raise ValueError(f"build_facts_federation: num_clients={num_clients} clients hold {slot} task slots, "
                         f"fewer than the {len(tasks)} tasks; tasks {empty} would have no client (use at least "
                         f"{next(n for n in range(1, 2 * len(tasks)) if n + n // 2 >= len(tasks))} clients)")
    crowded = {t: len(h) for t, h in holders.items() if len(h) > facts_per_task}
    if crowded:
        t, n = next(iter(crowded.items()))
        raise ValueError(f"build_facts_federation: num_clients={num_clients} clients deal task {t!r} to {n} of "
                         f"them, more than its facts_per_task={facts_per_task} facts; every client needs at least "
                         "one fact (use fewer clients or more facts_per_task)")
    rng = random.Random(f"facts-federation-{seed}")
    examples: list[list[dict[str, str]]] = [[] for _ in range(num_clients)]
    for t in tasks:
        records = [r for r in facts.train if r["category"] == t]     # facts_suite's seeded draw, in its order
        counts = _deal(len(records), [rng.uniform(1.0, 4.0) for _ in holders[t]])
        start = 0
        for i, n in zip(holders[t], counts):
            examples[i] += records[start:start + n]
            start += n
    train = []
    for i, (tasks_i, ex) in enumerate(zip(held, examples)):
        rng.shuffle(ex)
        train.append(ClientData(client_id=f"client-{i:03d}", families=list(tasks_i), examples=ex))
    heldout = [ClientData(client_id=f"unseen-{t}", families=[t],
                          examples=[r for r in facts.heldout_unseen if r["category"] == t])
               for t in facts.unseen_tasks()]
    recall = [ClientData(client_id=f"facts-{t}", families=[t], examples=[r for r in facts.train if r["category"] == t])
              for t in tasks]
    return Suite(train=train, heldout=heldout, recall=recall)
