"""FLoRA: stacking-based heterogeneous LoRA aggregation, merged into the base each round.

Wang, Shen, Fang, Yu, Kamath, Chi, Chen, Jia, Zhou. "FLoRA: Federated Fine-Tuning Large
Language Models with Heterogeneous Low-Rank Adaptations." NeurIPS 2024 (arXiv:2409.05976).

The server stacks the clients' factors, ``B = [p_1 s_1 B_1, ..., p_K s_K B_K]`` and
``A = [A_1; ...; A_K]``, so ``B @ A = sum_k p_k s_k B_k A_k`` exactly, at global rank
``R = sum_k r_k``. Every client receives the stack, merges ``B @ A`` into its base weights
and starts a fresh adapter at its own rank the next round. The server keeps the merged
total (the global model's delta) and the last stack. Server memory grows with the number
of clients in a round (the stack is inherent to the method).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge_client.wire import ClientUpdate, GlobalFactors, join_factors, split_factors
from server.federation.strategies.base import RankSpec, RoundAggregation, Strategy, StrategyConfig

__all__ = ["FLoRA", "stack_factors", "merge_once"]


def stack_factors(clients: Sequence[tuple[np.ndarray, np.ndarray, float, float]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(B_stack, A_stack)`` for ``clients = [(B_k, A_k, s_k, n_k)]``; ``B_stack @ A_stack``
    equals ``sum_k p_k s_k B_k A_k``."""
    if not clients:
        raise ValueError("clients must be non-empty")
    total = float(sum(n for *_, n in clients))
    bs = [(n / total) * s * b.astype(np.float64) for b, a, s, n in clients]
    as_ = [a.astype(np.float64) for _, a, _, _ in clients]
    return np.concatenate(bs, axis=1), np.concatenate(as_, axis=0)


def merge_once(message: GlobalFactors | None, merged_round: int) -> bool:
    """Whether a client whose base already holds the stacks up to ``merged_round`` must merge
    ``message``: only a ``merge_into_base`` stack from a later round (a stack re-sent after a
    round that was not committed was merged already)."""
    return message is not None and message.merge_into_base and int(message.round) > int(merged_round)


class _StackRound(RoundAggregation):
    def __init__(self, strategy: "FLoRA", round: int) -> None:
        super().__init__(strategy, round)
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._n = 0.0

    def _add(self, update: ClientUpdate) -> None:
        n = float(update.num_examples)
        staged = [(module, (n * update.module_scaling(module) * b, a))
                  for module, (b, a) in split_factors(update.factors).items()]
        for module, (b, a) in staged:
            first = self._parts.get(module)
            if first and (b.shape[0], a.shape[1]) != (first[0][0].shape[0], first[0][1].shape[1]):
                raise ValueError(f"client {update.client_id!r}: module {module!r} is {b.shape[0]}x{a.shape[1]}, "
                                 f"other clients sent {first[0][0].shape[0]}x{first[0][1].shape[1]}")
        for module, part in staged:   # commit only when every module was checked
            self._parts.setdefault(module, []).append(part)
        self._n += n

    def _finalize(self) -> None:
        st = self.strategy
        stack = {m: ((np.concatenate([b for b, _ in parts], axis=1) / self._n).astype(np.float32),
                     np.concatenate([a for _, a in parts], axis=0).astype(np.float32))
                 for m, parts in self._parts.items()}
        merged = dict(st.merged)
        for m, (b, a) in stack.items():
            d = b @ a
            merged[m] = merged[m] + d if m in merged else d
        st.stack, st.merged = stack, merged


class FLoRA(Strategy):
    """Stack the clients' factors; clients merge the stack and restart their adapters."""

    name = "flora"
    merge_into_base = True

    def __init__(self, config: StrategyConfig | None = None) -> None:
        super().__init__(config)
        self.stack: dict[str, tuple[np.ndarray, np.ndarray]] = {}     # last round, module -> (B, A)
        self.merged: dict[str, np.ndarray] = {}                      # module -> total merged dW

    def configure(self, *, client_id: str, spec: RankSpec, round: int) -> GlobalFactors | None:
        if not self.stack:
            return None
        # Every module is named in the pattern with its stacked rank R_m; B carries 1/s(R_m)
        # so that the client's merge of s(R_m) * B @ A is exactly the stacked product.
        pattern = {m: int(b.shape[1]) for m, (b, _) in self.stack.items()}
        out = {m: (b / self.send_scaling(pattern[m]), a) for m, (b, a) in self.stack.items()}
        msg_spec = RankSpec(rank=max(pattern.values()), rank_pattern=pattern)
        # The message's round is the round whose aggregation produced the stack (the last one
        # committed), not the round being configured: after a round that was not committed
        # (RoundFailed) the same stack goes out again, and a client must not merge it twice
        # (see merge_once).
        return self._message(join_factors(out), msg_spec, self.rounds_completed)

    def begin_round(self, round: int) -> RoundAggregation:
        return _StackRound(self, round)

    def global_delta(self) -> dict[str, np.ndarray]:
        return {m: d.astype(np.float32) for m, d in sorted(self.merged.items())}

    def state_tensors(self) -> dict[str, np.ndarray]:
        out = {f"merged.{m}": d for m, d in self.merged.items()}
        out.update({f"stack.{k}": v for k, v in join_factors(self.stack).items()})
        return out

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping) -> None:
        self._check_meta(meta)
        self.merged = {k[len("merged."):]: np.asarray(v, np.float32)
                       for k, v in tensors.items() if k.startswith("merged.")}
        self.stack = dict(split_factors({k[len("stack."):]: v for k, v in tensors.items()
                                         if k.startswith("stack.")}))
