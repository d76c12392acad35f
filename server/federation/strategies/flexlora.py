"""FlexLoRA: aggregate full-size LoRA products, redistribute by truncated SVD at each rank.

Bai, Chen, Qian, Yao, Li. "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources." NeurIPS 2024, arXiv:2402.11505.

Client k sends ``B_k, A_k`` at its own rank r_k (or rank pattern) with scaling
``s_k = alpha_k / r_k``; the server forms ``dW = sum_k p_k s_k B_k A_k`` (``p_k = n_k / sum n``)
and hands client j the rank-r_j truncated SVD of dW split into ``B_j, A_j`` with
``s_j B_j A_j = U_r S_r V_r^T`` (Eckart-Young optimal). The heavy lifting is the streaming
``server.core.aggregation.Aggregator`` (native core); the plain NumPy statement of the same
math, the test oracle, is ``server.core.oracles`` (``flexlora_delta``, ``carry_delta``,
``truncate_delta``).

**Split** (``split``): ``"reference"`` (the default) is the official code's
(alibaba/FederatedScope, branch FlexLoRA, ``fed_utils/adaptive_peft.py``): all of ``S`` on B,
``B = U_r S_r / s``, ``A = V_r^T``. ``"balanced"`` puts ``sqrt(S_r / s)`` on both. The effective
update ``s B A`` is the same; local training from the two differs.

**Carry** (``carry=True``, ours, not in the paper). The server holds the previous global update
``G_t = U diag(sigma) V^T``; client k started from ``T_{r_k}(G_t)`` and sends
``X_k = s_k B_k A_k = T_{r_k}(G_t) + Delta_k``. Plain FlexLoRA sets::

    G_{t+1} = sum_k p_k X_k = sum_i w_i sigma_i u_i v_i^T + sum_k p_k Delta_k,
    w_i = sum_{k: r_k >= i} p_k,

so a direction that only some clients received is shrunk by ``w_i`` every round (the rank
collapse of arXiv 2602.13486: the energy drifts geometrically to the smallest shared rank).
Carrying them forward gives::

    G_{t+1} = G_t + sum_k p_k Delta_k = sum_k p_k X_k + U diag((1 - w_i) sigma_i) V^T.

Since ``1 - w_i = sum_k p_k [i > r_k]``, the carry term splits over clients:
``U diag((1 - w_i) sigma_i) V^T = sum_k p_k R_k`` with ``R_k = G_t - T_{r_k}(G_t)`` the tail
client k did not receive. So each reply is added to the *same* streaming aggregator as one
factor pair ``[s_k B_k | U_tail S_tail] [A_k ; V_tail^T]`` (the client's factors with the tail
appended, pre-scaled so the aggregator's per-module scaling reproduces ``s_k`` on the client's
part) under the client's own weight ``n_k``: ``p_k`` normalisation is untouched, ``w_i`` is per
module (from each client's rank or rank pattern) and, with client sampling or failed clients,
over the clients whose replies were aggregated. Round 1 (no ``G_t``) is plain FlexLoRA.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_client.wire import ClientUpdate, GlobalFactors, factor_keys
from server.core.adapter import SPLITS, GlobalAdapter
from server.federation.strategies.base import RankSpec, RoundAggregation, Strategy, StrategyConfig, split_factors

__all__ = ["FlexLoRA"]


class _FlexRound(RoundAggregation):
    def __init__(self, strategy: "FlexLoRA", round: int) -> None:
        super().__init__(strategy, round)
        # max_round_bytes is the aggregator's budget when it can keep to one (auto/sketch route
        # choice and sketch sizes); robust buffering holds raw updates, so the round checks then
        budget = strategy.config.max_round_bytes
        self.budget_in_aggregator = budget is not None and strategy.method in ("auto", "sketch") \
            and self._pending is None and strategy.device == "cpu"
        self._agg = strategy.new_aggregator(round, max_state_bytes=budget if self.budget_in_aggregator else None)

    def _clips_change(self) -> bool:
        # a client started from T_r(G_t) and moves what is aggregated by its change: clipping
        # bounds the change (reply = sent + c Delta), so one rank-scale law fits every class
        # (the reply's norm is mostly what the client was sent; it falls only as ~rank^-0.17)
        return self.strategy.adapter is not None

    def held_bytes(self) -> int:
        return self._agg.state_bytes()

    def _add(self, update: ClientUpdate) -> None:
        try:
            self._add_to_aggregator(update)
        except ValueError as e:
            if self.budget_in_aggregator and str(e).startswith("max_state_bytes="):
                raise ValueError(f"client {update.client_id!r}: round {self.round}: max_round_bytes="
                                 f"{self.strategy.config.max_round_bytes} is the aggregator's budget: {e}") from None
            raise

    def _add_to_aggregator(self, update: ClientUpdate) -> None:
        adapter = self.strategy.adapter
        c = self._change_mult.get(update.client_id, 1.0)
        if adapter is None or (not self.strategy.carry and c == 1.0):
            self._agg.add_update(update)
            return
        # carry: the client's factors with the tail of G_t it did not receive appended (see the
        # module docstring); alpha=1, rslora=False makes the aggregator's scaling 1/r', so the
        # client's part is pre-scaled by s_k r' and the tail by r'.
        # clipped (robust aggregation): X_k' = T_{r_k}(G_t) + c Delta_k = c X_k + (1 - c) T_{r_k}(G_t),
        # plus the tail with carry: G_t + c Delta_k
        factors = {}
        for module, (b, a) in split_factors(update.factors).items():
            s_k = update.module_scaling(module)
            r_k = a.shape[0]
            bs, as_ = [np.asarray(b, np.float64) * (s_k * c)], [np.asarray(a, np.float64)]
            if module in adapter.modules:
                U, S, Vt = adapter.modules[module]
                head = np.flatnonzero(np.asarray(S[:r_k]) > 0)
                if c != 1.0 and head.size:
                    bs.append(np.asarray(U[:, head], np.float64) * (np.asarray(S[head], np.float64) * (1.0 - c)))
                    as_.append(np.asarray(Vt[head], np.float64))
                keep = np.flatnonzero(np.asarray(S[r_k:]) > 0) + r_k
                if keep.size and self.strategy.carry:
                    bs.append(np.asarray(U[:, keep], np.float64) * np.asarray(S[keep], np.float64))
                    as_.append(np.asarray(Vt[keep], np.float64))
            B, A = np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)
            a_key, b_key = factor_keys(module)
            factors[a_key] = A.astype(np.float32)
            factors[b_key] = (B * B.shape[1]).astype(np.float32)
        self._agg.add(factors, num_examples=update.num_examples, alpha=1.0, rslora=False,
                      client_id=update.client_id)

    def _finalize(self) -> None:
        try:
            self.strategy.adapter = self._agg.finalize()
        finally:
            getattr(self._agg, "close", lambda: None)()   # a sharded round's actors


class FlexLoRA(Strategy):
    """Streaming aggregation of full-size products; per-client truncated-SVD redistribution."""

    name = "flexlora"

    def __init__(self, config: StrategyConfig | None = None, *, max_rank: int = 256,
                 method: str = "auto", split: str = SPLITS[0], carry: bool = False, device: str = "cpu",
                 shards: int = 0) -> None:
        super().__init__(config)
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(carry, bool):
            raise ValueError(f"carry must be a bool, got {carry!r}")
        self.max_rank = int(max_rank)
        self.method = method
        self.split = split
        self.carry = carry
        self.device = device
        self.shards = int(shards)
        self.adapter = None  # server.core.adapter.GlobalAdapter after the first round

    def new_aggregator(self, round: int, *, max_state_bytes: int | None = None):
        """The round's streaming aggregator: the native CPU core, or the CUDA backend with
        ``device="cuda[:N]"`` (same weighting, same result up to float32 rounding), or with
        ``shards=N`` the modules over N Ray actors (the same result; :mod:`server.core.sharded`).
        ``max_state_bytes``: the round's memory budget, which sizes the sketches (CPU routes;
        sharded, split evenly over the shards)."""
        seed = self.config.seed + round
        if self.shards:
            from server.core.sharded import ShardedAggregator
            return ShardedAggregator(self.max_rank, shards=self.shards, method=self.method, seed=seed,
                                     max_state_bytes=max_state_bytes)
        if self.device == "cpu":
            from server.core.aggregation import Aggregator  # native core; imported when first needed
            return Aggregator(self.max_rank, method=self.method, seed=seed, max_state_bytes=max_state_bytes)
        from server.core.cuda_aggregation import CudaAggregator
        return CudaAggregator(self.max_rank, method=self.method, seed=seed, device=self.device)

    def configure(self, *, client_id: str, spec: RankSpec, round: int) -> GlobalFactors | None:
        if self.adapter is None:
            return None
        factors = self.adapter.client_factors(spec.rank, alpha=self.config.alpha,
                                              rslora=self.config.rslora, split=self.split,
                                              rank_pattern=dict(spec.rank_pattern) or None)
        return self._message(factors, spec, round)

    def begin_round(self, round: int) -> RoundAggregation:
        return _FlexRound(self, round)

    def global_delta(self) -> dict[str, np.ndarray]:
        if self.adapter is None:
            return {}
        return {m: np.asarray(self.adapter.delta(m), np.float32) for m in sorted(self.adapter.modules)}

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Per module ``<module>.U``, ``.S``, ``.Vt`` of the global adapter (empty before round 1)."""
        return {} if self.adapter is None else self.adapter.to_tensors()

    def state_meta(self) -> dict:
        meta = {**super().state_meta(), "max_rank": self.max_rank, "split": self.split,
                "carry": self.carry}
        if self.adapter is not None:
            meta.update(adapter_rank=self.adapter.max_rank, routes=self.adapter.routes)
        return meta

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping) -> None:
        self._check_meta(meta)
        if not tensors:
            self.adapter = None
            return
        self.adapter = GlobalAdapter.from_tensors(tensors, meta["adapter_rank"], meta.get("routes", {}))
