"""Federated LoRA strategies: FlexLoRA and the baselines it is compared with.

``make_strategy(name, config, **options)`` builds one by name; see ``base.Strategy`` for the
interface runtimes (embedded simulation, Flower) drive.
"""

from __future__ import annotations

from server.federation.strategies.base import (
    RankSpec,
    RoundAggregation,
    RoundFailed,
    RoundResult,
    Strategy,
    StrategyConfig,
)
from server.federation.strategies.fedit import FedIT, federation_rank
from server.federation.strategies.flexlora import FlexLoRA
from server.federation.strategies.flora import FLoRA
from server.federation.strategies.hetlora import HetLoRA
from server.federation.strategies.raflora import RaFLoRA
from server.federation.strategies.robust import RobustConfig

__all__ = ["RankSpec", "RoundAggregation", "RoundFailed", "RoundResult", "Strategy",
           "StrategyConfig", "RobustConfig", "FedIT", "FlexLoRA", "FLoRA", "HetLoRA", "RaFLoRA", "STRATEGIES",
           "make_strategy",
           "build_strategy"]

STRATEGIES = {"flexlora": FlexLoRA, "hetlora": HetLoRA, "flora": FLoRA, "fedit": FedIT, "raflora": RaFLoRA}


def make_strategy(name: str, config: StrategyConfig | None = None, **options) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](config, **options)


SVD_STRATEGIES = ("flexlora", "raflora")   # the strategies that take ``split``


def build_strategy(name: str, config: StrategyConfig, *, specs, fedit_rank: str = "min",
                   split: str | None = None, carry: bool = False, device: str = "cpu", shards: int = 0,
                   **options) -> Strategy:
    """``make_strategy`` for a federation whose devices afford ``specs`` (RankSpecs): the one place
    where strategy options that depend on the federation are derived (FedIT's rank), and where
    the runtimes' ``split`` (FlexLoRA, raFLoRA; None: the strategy's default, the official
    split), ``carry`` (FlexLoRA only), ``device`` (where FlexLoRA and raFLoRA aggregate:
    ``"cpu"`` or ``"cuda[:N]"``) and ``shards`` (their modules over Ray actors) options reach
    the strategy."""
    if name == "fedit" and "rank" not in options:
        options["rank"] = federation_rank(specs, fedit_rank)
    if split is not None and name in SVD_STRATEGIES:
        options["split"] = split
    if carry:
        if name != "flexlora":
            raise ValueError(f"carry is an option of strategy 'flexlora', not {name!r}")
        options["carry"] = True
    if device != "cpu":
        if name not in SVD_STRATEGIES:
            raise ValueError(f"device {device!r}: only {', '.join(SVD_STRATEGIES)} aggregate on a GPU, not {name!r}")
        options["device"] = device
    if shards:
        if name not in SVD_STRATEGIES:
            raise ValueError(f"shards: only {', '.join(SVD_STRATEGIES)} shard their aggregation, not {name!r}")
        options["shards"] = shards
    return make_strategy(name, config, **options)
