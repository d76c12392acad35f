"""``build_federation(config)``: the one place a federation is assembled from a ``RunConfig``.

Every runtime calls it (``flexlora simulate``, the experiment cells, the Flower ServerApp) and
then only says how clients are reached (in-process clients, Flower nodes) and where results
go; the Flower simulated SuperNodes call :func:`build_workload`, the part without a strategy.

* :class:`SharedBase` -- the base model loaded once per process: a training copy reset per
  client, an evaluation copy, the tokenizer, the base weights and their fingerprint.
* :func:`build_workload` -- the suite (training and held-out clients) and each client's
  device and rank (``devices -> ranks``, scaled to the model: demo ranks for the shipped tiny
  model, capped at the smallest module for a real one).
* :func:`build_federation` -- the workload, the strategy (with the federation-dependent
  options: FedIT's rank, the split, carry, the aggregation device), the evaluator and the
  local training settings; :meth:`Federation.engine` and :meth:`Federation.in_process_clients`
  give the round engine and the in-process transport.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edge_client.targets import ffn_pattern_keys
from edge_client.trainer import LocalTrainer, TrainConfig
from edge_client.wire import RankSpec
from server.federation import RoundEngine
from server.federation.strategies import Strategy, build_strategy
from server.runtimes.clients import InProcessClients
from server.runtimes.config import RunConfig
from server.workloads.convert import suite_by_category
from server.workloads.devices import DEMO_RANKS, LLAMA_FFN_KEYS, ClientDevice, assign_devices, capped_ranks
from server.workloads.evaluate import Evaluator
from server.workloads.model import fingerprint, linear_shapes, load_base
from server.workloads.suite import Suite, SuiteConfig, build_suite, load_suite_from_jsonl

__all__ = ["SharedBase", "load_shared_base", "Workload", "build_workload", "Federation", "build_federation",
           "suite_for", "train_config_for"]


@dataclass
class SharedBase:
    """The base model loaded once per process; ``model`` is reset to ``state`` per client."""
    name: str | None      # the --model given (None: the shipped tiny model)
    model: object
    eval_model: object
    tokenizer: object
    state: dict
    fingerprint: str

    @property
    def demo(self) -> bool:
        """The shipped tiny model: client types map to ``DEMO_RANKS``."""
        return self.name is None


def load_shared_base(model: str | None = None, *, threads: int | None = None, evaluation: bool = True) -> SharedBase:
    """Load ``model`` (None: the shipped tiny model) with ``threads`` torch threads (None: as is);
    ``evaluation=False`` (a process that only trains) skips the evaluation copy."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    lm, tok = load_base(model)
    return SharedBase(name=model, model=lm, eval_model=copy.deepcopy(lm) if evaluation else None, tokenizer=tok,
                      state=copy.deepcopy(lm.state_dict()), fingerprint=fingerprint(lm))


def suite_for(cfg: RunConfig) -> Suite:
    """The suite (training and held-out clients) a run with ``cfg`` uses."""
    if cfg.data:
        if cfg.data_split == "per_category":   # one client per category (task), whole categories held out
            return suite_by_category(cfg.data, num_clients=cfg.num_clients, num_heldout=cfg.num_heldout,
                                     seed=cfg.seed, heldout_examples=cfg.heldout_examples)
        return load_suite_from_jsonl(cfg.data, num_clients=cfg.num_clients, num_heldout=cfg.num_heldout,
                                     seed=cfg.seed)
    if cfg.suite in ("rank", "real", "facts"):
        if cfg.suite == "rank":
            from server.workloads.rank_suite import build_rank_suite as build
        elif cfg.suite == "real":   # real facts (server.workloads.real_tasks); held out: whole unseen tasks
            from server.workloads.real_suite import build_real_suite as build
        else:   # arbitrary facts of the memorisation tasks dealt over clients; held out: unseen tasks
            from server.workloads.real_suite import build_facts_federation as build
        extra = {"unseen": cfg.unseen_tasks} if cfg.unseen_tasks else {}
        return build(num_clients=cfg.num_clients, num_heldout=cfg.num_heldout,
                     heldout_examples=cfg.heldout_examples, seed=cfg.seed, **extra)
    return build_suite(SuiteConfig(num_clients=cfg.num_clients, num_heldout=cfg.num_heldout,
                                   heldout_examples=cfg.heldout_examples, seed=cfg.seed))


def train_config_for(cfg: RunConfig) -> TrainConfig:
    return TrainConfig(steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, alpha=cfg.alpha,
                       rslora=cfg.rslora, max_length=cfg.max_length, target_modules=tuple(cfg.target_modules))


@dataclass
class Workload:
    """What the clients are: the suite, and each training client's examples, device and rank."""
    suite: Suite
    examples: dict[str, list]              # training client id -> its examples
    devices: dict[str, ClientDevice]       # training client id -> device class / client type and rank
    module_shapes: dict[str, tuple[int, int]]

    @property
    def specs(self) -> dict[str, RankSpec]:
        return {cid: d.spec for cid, d in self.devices.items()}


def build_workload(cfg: RunConfig, base: SharedBase) -> Workload:
    suite = suite_for(cfg)
    examples = {c.client_id: c.examples for c in suite.train}
    unknown = sorted(set(cfg.faults) - set(examples))
    if unknown:
        raise ValueError(f"faults name unknown clients {unknown[:5]}; the clients are "
                         f"{sorted(examples)[0]} .. {sorted(examples)[-1]}")
    shapes = linear_shapes(base.model, cfg.target_modules)
    if base.demo:
        rank_map, ffn_keys = DEMO_RANKS, LLAMA_FFN_KEYS
    else:
        rank_map, ffn_keys = capped_ranks(shapes), ffn_pattern_keys(base.model, cfg.target_modules)
    devices = assign_devices(sorted(examples), seed=cfg.seed, rank_distribution=cfg.rank_distribution,
                             rank_map=rank_map, ffn_keys=ffn_keys, allot=cfg.rank_assignment == "allot")
    return Workload(suite=suite, examples=examples, devices={d.client_id: d for d in devices},
                    module_shapes=shapes)


@dataclass
class Federation:
    """A federation ready to run: say how clients are reached (:meth:`in_process_clients`, or
    Flower nodes) and where results go (:meth:`engine`'s checkpoint and callbacks)."""
    config: RunConfig
    base: SharedBase
    workload: Workload
    specs: dict[str, RankSpec]
    strategy: Strategy
    evaluator: Evaluator | None
    train_config: TrainConfig

    def evaluate(self, strategy: Strategy) -> dict:
        return self.evaluator(strategy.global_delta())

    def trainer(self, client_id: str | None = None) -> LocalTrainer:
        return LocalTrainer(self.base.model, self.base.tokenizer, config=self.train_config,
                            base_model_id=self.base.fingerprint, client_id=client_id)

    def in_process_clients(self, *, progress=None) -> InProcessClients:
        cfg = self.config
        return InProcessClients(self.trainer(), self.workload.examples, base_state=self.base.state,
                                timeout_s=cfg.client_timeout_s, faults=cfg.faults, progress=progress)

    def engine(self, *, runtime: str, checkpoint_dir=None, runtime_state=None,
               on_round: Callable[[dict], None] | None = None, logger=None, overwrite: bool = True) -> RoundEngine:
        cfg = self.config
        return RoundEngine(self.strategy, self.specs, seed=cfg.seed, clients_per_round=cfg.clients_per_round,
                           evaluate=self.evaluate if self.evaluator is not None else None, on_round=on_round,
                           checkpoint_dir=checkpoint_dir, identity=cfg.identity(), base_model=self.base.fingerprint,
                           runtime_state=runtime_state, runtime=runtime, logger=logger,
                           max_norm_growth=cfg.max_norm_growth, overwrite=overwrite,
                           keep_checkpoints=cfg.keep_checkpoints, sanity_ratio=cfg.sanity_ratio)


def build_federation(cfg: RunConfig, *, base: SharedBase | None = None,
                     specs: Mapping[str, RankSpec] | None = None, evaluate: bool = True,
                     families: bool = False, recall_every_round: bool = True) -> Federation:
    """Assemble the federation ``cfg`` describes. ``base``: an already loaded base (loaded here
    otherwise); ``specs``: the clients' ranks when the runtime learns them itself (Flower
    probes the nodes), else the workload's; ``families``: per-task-family scores too;
    ``recall_every_round``: score the suite's recall set (the facts suite's facts) after every
    round, else only when asked (``evaluator.recall``)."""
    base = base or load_shared_base(cfg.model, threads=cfg.threads)
    workload = build_workload(cfg, base)
    specs = dict(specs) if specs is not None else workload.specs
    scfg = cfg.strategy_config(base_model=base.fingerprint, module_shapes=workload.module_shapes)
    strategy = build_strategy(cfg.strategy, scfg, specs=specs.values(), fedit_rank=cfg.fedit_rank, split=cfg.split,
                              carry=cfg.carry, device=cfg.device, shards=cfg.shards)
    evaluator = Evaluator(base.eval_model, base.tokenizer, base.state, workload.suite.heldout_examples(),
                          max_new_tokens=cfg.eval_max_new_tokens, families=families,
                          recall_examples=workload.suite.recall_examples(),
                          recall_every_call=recall_every_round) if evaluate else None
    return Federation(config=cfg, base=base, workload=workload, specs=specs, strategy=strategy,
                      evaluator=evaluator, train_config=train_config_for(cfg))
