"""Simulated clients: the round engine's in-process transport (``flexlora simulate``, the
experiment cells) and the FLoRA merge-once state every simulated client keeps (also the Flower
simulated SuperNodes', :mod:`server.runtimes.flower.simulated`).

Every client trains through the edge client's one trainer (``edge_client.trainer.LocalTrainer``)
on one shared base model (that is what makes 20 clients a round fit in seconds on a CPU), from
the bytes the server would send it (``decode_global`` of the order's wire bytes) and replies
with the bytes a device would send (``encode_update``). FLoRA's ``merge_into_base`` stacks are
merged once per round into the shared base (every client receives the same stack), and the
merged total travels in the checkpoint.

Clients run one at a time on a worker thread so that a client silent for ``timeout_s`` is
dropped (a simulated straggler never answers). ``faults`` (client id -> fault) turn a client's
reply into a faulty one on the wire (:mod:`.faults`), for tests and demos.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from edge_client.trainer import LocalTrainer
from edge_client.wire import decode_global, encode_update
from server.federation import Order, Reply, RoundPlan
from server.federation.strategies.flora import merge_once
from server.runtimes.faults import faulty_reply
from server.workloads.model import apply_delta

__all__ = ["InProcessClients", "MergedStacks", "fresh_or_global"]

_DELTA_PREFIX = "client_delta."
_MERGED_ROUND = "client_merged_round"


class MergedStacks:
    """FLoRA's ``merge_into_base`` stacks a client has merged into its base weights: the summed
    delta per module and the round of the last stack merged. Each stack is merged once, however
    often it is received (a stack re-sent after a round that was not committed was merged
    already); the state round-trips through tensors (checkpoints, Flower node state)."""

    def __init__(self) -> None:
        self.delta: dict[str, np.ndarray] = {}
        self.round = -1

    def absorb(self, message) -> bool:
        """Merge ``message`` (a ``GlobalFactors`` or None) if it is a stack not merged yet."""
        if not merge_once(message, self.round):
            return False
        for module in message.modules():
            self.delta[module] = self.delta.get(module, 0) + message.module_delta(module)
        self.round = int(message.round)
        return True

    def apply(self, model, base_state: Mapping) -> None:
        """Reset ``model`` to ``base_state`` plus every stack merged so far."""
        apply_delta(model, base_state, self.delta)

    def state_tensors(self) -> dict[str, np.ndarray]:
        out = {_DELTA_PREFIX + k: v for k, v in self.delta.items()}
        if self.delta:
            out[_MERGED_ROUND] = np.array([self.round], np.int64)
        return out

    def load_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.delta = {k[len(_DELTA_PREFIX):]: np.asarray(v, np.float32)
                      for k, v in tensors.items() if k.startswith(_DELTA_PREFIX)}
        self.round = int(np.asarray(tensors[_MERGED_ROUND]).reshape(-1)[0]) if _MERGED_ROUND in tensors else -1


def fresh_or_global(message):
    """What a client's trainer loads: the server's factors, or nothing (a fresh adapter) when
    there are none or when they are a FLoRA stack (merged into the base instead)."""
    return None if message is None or message.merge_into_base else message


class InProcessClients:
    """Round-engine transport over simulated clients sharing ``trainer``'s base model."""

    def __init__(self, trainer: LocalTrainer, examples: Mapping[str, Sequence[dict]], *, base_state: Mapping,
                 timeout_s: float | None = None, faults: Mapping[str, str] | None = None,
                 progress=None) -> None:
        self.trainer = trainer
        self.examples = dict(examples)
        self.base_state = base_state
        self.timeout_s = timeout_s
        self.faults = dict(faults or {})
        self.progress = progress          # callable(iterable, round) -> iterable (a progress bar)
        self.stacks = MergedStacks()      # FLoRA: what every client merged into the shared base
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="client")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        apply_delta(self.trainer.base, self.base_state, {})   # leave the shared base clean

    def __enter__(self) -> "InProcessClients":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- state that travels in the checkpoint -----------------------------------------
    def state_tensors(self) -> dict[str, np.ndarray]:
        return self.stacks.state_tensors()

    def load_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.stacks.load_state(tensors)

    # --- one round ---------------------------------------------------------------------
    def exchange(self, plan: RoundPlan) -> list[Reply]:
        # every client of a round receives the same stack: merge it once into the shared base
        self.stacks.absorb(next((o.message for o in plan.orders if o.message is not None
                                 and o.message.merge_into_base), None))
        self.stacks.apply(self.trainer.base, self.base_state)
        orders = plan.orders if self.progress is None else self.progress(plan.orders, plan.round)
        return [self._ask(order) for order in orders]

    def _ask(self, order: Order) -> Reply:
        cancel = threading.Event()
        future = self._pool.submit(self._train, order, cancel)
        try:
            data = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            cancel.set()
            future.result()   # a simulated straggler returns at once when cancelled
            return Reply(client_id=order.client_id, error=f"no reply within {self.timeout_s:g} s; dropped")
        except Exception as exc:  # noqa: BLE001 - a client that fails is dropped with its reason
            return Reply(client_id=order.client_id, error=f"client failed: {type(exc).__name__}: {exc}")
        return Reply(client_id=order.client_id, data=data)

    def _train(self, order: Order, cancel: threading.Event) -> bytes | None:
        fault = self.faults.get(order.client_id)
        if fault == "straggler":
            cancel.wait()        # never answers; released when the server gives up
            return None
        init = decode_global(order.wire) if order.wire is not None else None
        self.trainer.load_global(fresh_or_global(init))   # the shared base holds FLoRA's stacks (see exchange)
        update = self.trainer.train(self.examples[order.client_id], round=order.round, seed=order.seed,
                                    spec=order.spec, client_id=order.client_id)
        return faulty_reply(update, fault, init) if fault else encode_update(update)
