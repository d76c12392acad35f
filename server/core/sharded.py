"""Aggregation past one machine: a round's modules sharded over Ray actors (the ``[ray]`` extra).

Every LoRA module is aggregated independently (``sum_k p_k s_k B_k A_k`` and its truncated
SVD), so a round splits by module without approximation: :class:`ShardedAggregator` gives each
module an owner among ``shards`` Ray actors (the first time the module is seen, to the shard
with the least projected state, ``4 d_out d_in`` bytes a module), each actor runs the native
:class:`~server.core.aggregation.Aggregator` for its modules, a client's update is routed to
the owners of its modules, and ``finalize`` runs on every shard in parallel. Each module sees
the same clients, weights, scalings and seed as in one process, so the result is the
single-process aggregator's (bit for bit with the same thread count per module; a test checks).

Nothing accepted is lost when a worker dies: every accepted client's factors are spooled to
disk (safetensors, never pickle) before they are sent, and a shard whose actor dies (or whose
``add`` refuses a client after other shards took it) is rebuilt on a fresh actor by replaying
the spool. The driver validates a whole client first (the aggregator's own checks), so a
rejected client reaches no shard.

Memory: each actor holds its modules' state (the route's need, as in one process); the driver
holds only the module -> shard map. Bytes moved per round: every client's factors once to one
owner per module, and every module's ``(U, S, Vt)`` once back (``benchmarks/plan_sharded.py``
projects both for a 70B round).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edge_client.wire import scaling, split_factors
from server.core.adapter import GlobalAdapter
from server.core.aggregation import (
    Aggregator,
    ClientLedger,
    check_client_args,
    check_client_modules,
    check_finite_contribution,
)
from server.core.validate import as_matrix, as_rank

__all__ = ["ShardedAggregator", "ray_available", "least_loaded", "plan_shards"]


def least_loaded(load: list[int]) -> int:
    """The shard a new module goes to: the least projected state, the lowest index on a tie."""
    return min(range(len(load)), key=lambda s: (load[s], s))


def plan_shards(shapes: Mapping[str, tuple[int, int]], shards: int, *, total_rank: int, rank: int) -> dict:
    """What a round over ``shapes`` (module -> (d_out, d_in)) puts on each of ``shards`` workers
    when every module ends the round at concatenated rank ``total_rank``: the owner of each
    module (the rule :class:`ShardedAggregator` applies, modules first seen in sorted order),
    each worker's end-of-round state on the ``auto`` route (``linalg.route_state_bytes``) and the
    bytes that reach it per client of rank ``rank`` and leave it as ``(U, S, Vt)``."""
    from server.core.linalg import route_state_bytes

    load = [0] * shards
    owner = {}
    for module in sorted(shapes):
        d_out, d_in = shapes[module]
        owner[module] = s = least_loaded(load)
        load[s] += 4 * d_out * d_in
    per = [{"shard": s, "modules": 0, "state_bytes": 0, "in_bytes_per_client": 0, "out_bytes": 0}
           for s in range(shards)]
    for module, s in owner.items():
        d_out, d_in = shapes[module]
        per[s]["modules"] += 1
        per[s]["state_bytes"] += route_state_bytes(d_out, d_in, total_rank, rank)["auto"]
        per[s]["in_bytes_per_client"] += 4 * rank * (d_out + d_in)
        per[s]["out_bytes"] += 4 * rank * (d_out + d_in + 1)
    return {"owner": owner, "shards": per}


def ray_available() -> tuple[bool, str]:
    """``(True, "")`` when Ray can be imported, else ``(False, reason)``; never raises."""
    try:
        import ray  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return False, f"ray is not importable ({type(exc).__name__}: {exc}); pip install 'flexlora[ray]'"
    return True, ""


class _Shard:
    """The body of one Ray actor: the native aggregator for the modules this shard owns."""

    def __init__(self, max_rank: int, options: Mapping[str, Any]) -> None:
        self.agg = Aggregator(max_rank, **options)

    def add(self, factors: Mapping[str, np.ndarray], kwargs: Mapping[str, Any]) -> int:
        self.agg.add(factors, **kwargs)
        return self.agg.state_bytes()

    def finalize(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        adapter = self.agg.finalize()
        return adapter.to_tensors(), dict(adapter.routes)

    def info(self) -> dict:
        import psutil
        return {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss,
                "state_bytes": self.agg.state_bytes(), "modules": len(self.agg.modules)}


class ShardedAggregator(ClientLedger):
    """The streaming aggregator's interface (``add``, ``add_update``, ``finalize``,
    ``state_bytes``) over ``shards`` Ray actors; see the module docstring.

    ``threads``: native threads per actor (default 1: one core each). ``max_state_bytes``: the
    budget of the whole round, split evenly over the shards. ``spool_dir``: where accepted
    updates are kept until ``close`` (default: a temporary folder). ``actor_options``: passed
    to ``ray.remote`` (e.g. ``{"num_cpus": 1, "memory": 8 << 30}``, or a node resource)."""

    def __init__(self, max_rank: int, *, shards: int, method: str = "auto", oversample: int = 10,
                 power_iters: int = 2, seed: int = 0, threads: int | None = 1,
                 dense_threshold: int | None = None, max_state_bytes: int | None = None,
                 sketch_size: int | None = None, core_size: int | None = None,
                 spool_dir: str | os.PathLike | None = None, actor_options: Mapping[str, Any] | None = None,
                 max_rebuilds: int = 3) -> None:
        super().__init__()
        ok, why = ray_available()
        if not ok:
            raise ValueError(f"ShardedAggregator needs Ray: {why}")
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be an int >= 1, got {shards!r}")
        self.max_rank = as_rank(max_rank, "max_rank")
        self.options = dict(method=method, oversample=oversample, power_iters=power_iters, seed=seed,
                            threads=threads, dense_threshold=dense_threshold, sketch_size=sketch_size,
                            core_size=core_size,
                            max_state_bytes=None if max_state_bytes is None else max(1, max_state_bytes // shards))
        Aggregator(self.max_rank, **self.options)   # the same argument checks, before any actor starts
        self.shards = shards
        self.max_rebuilds = int(max_rebuilds)
        self.rebuilds = 0
        self._own_spool = spool_dir is None
        self.spool = Path(tempfile.mkdtemp(prefix="flexlora-spool-") if spool_dir is None else spool_dir)
        self.spool.mkdir(parents=True, exist_ok=True)
        if self._own_spool:   # an abandoned round (never finalized or closed) leaves no folder behind;
            # its actors end with their handles (Ray stops an actor nothing refers to)
            weakref.finalize(self, shutil.rmtree, str(self.spool), True)
        import ray
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     ignore_reinit_error=True, log_to_driver=False)
        self._ray = ray
        self._actor_cls = ray.remote(max_restarts=0, **dict(actor_options or {}))(_Shard)
        self._actors: list[Any] = [None] * shards
        self._owner: dict[str, int] = {}               # module -> shard
        self._shape: dict[str, tuple[int, int]] = {}   # module -> (d_out, d_in)
        self._load = [0] * shards                      # projected state bytes per shard
        self._spooled: list[Path] = []                 # accepted clients, in order

    # ------------------------------------------------------------------ actors and the spool
    def _actor(self, shard: int):
        if self._actors[shard] is None:
            self._actors[shard] = self._actor_cls.remote(self.max_rank, self.options)
        return self._actors[shard]

    def _spool_client(self, subsets: dict[int, dict[str, np.ndarray]], kwargs: dict) -> Path:
        from safetensors.numpy import save_file
        path = self.spool / f"client-{len(self._spooled):06d}.safetensors"
        tensors = {f"{shard}/{key}": np.ascontiguousarray(v) for shard, sub in subsets.items() for key, v in sub.items()}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"flexlora_spool": json.dumps(kwargs)})
        os.replace(tmp, path)
        return path

    def _read_spooled(self, path: Path, shard: int) -> tuple[dict[str, np.ndarray], dict] | None:
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as fh:
            kwargs = json.loads(fh.metadata()["flexlora_spool"])
            prefix = f"{shard}/"
            sub = {k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}
        return (sub, kwargs) if sub else None

    def _rebuild(self, shard: int, clients: list[Path]) -> None:
        """A fresh actor for ``shard`` holding exactly ``clients`` (replayed from the spool)."""
        self.rebuilds += 1
        if self.rebuilds > self.max_rebuilds * self.shards:
            raise RuntimeError(f"shard {shard}: rebuilt {self.rebuilds} times this round; giving up")
        old, self._actors[shard] = self._actors[shard], None
        if old is not None:
            try:
                self._ray.kill(old)
            except Exception:  # noqa: BLE001 - it may be dead already
                pass
        for path in clients:
            item = self._read_spooled(path, shard)
            if item is not None:
                self._ray.get(self._actor(shard).add.remote(*item))

    def _call_all(self, calls: dict[int, Any], retry) -> dict[int, Any]:
        """``ray.get`` of one call per shard; a shard whose actor died is rebuilt from the spool
        and its call retried (``retry(shard)`` makes it again)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        out = {}
        for shard, ref in calls.items():
            for _attempt in range(self.max_rebuilds + 1):
                try:
                    out[shard] = self._ray.get(ref)
                    break
                except (RayActorError, ActorDiedError, ActorUnavailableError):
                    self._rebuild(shard, self._spooled)
                    ref = retry(shard)
            else:
                raise RuntimeError(f"shard {shard} kept failing; the round cannot finish")
        return out

    # ------------------------------------------------------------------ adding clients
    def add(self, factors: Mapping[str, np.ndarray], *, num_examples: int, alpha: float,
            rank: int | None = None, rank_pattern: Mapping[str, int] | None = None,
            rslora: bool = False, client_id: str | None = None, weight: float | None = None) -> None:
        """Add one client: validated whole here (the aggregator's checks), spooled, then sent to
        the owners of its modules. A client refused by a shard reaches none (the shards that
        took it are rebuilt without it)."""
        who = f"client {client_id!r}" if client_id is not None else f"client #{self.num_clients}"
        w = check_client_args(who, num_examples=num_examples, alpha=alpha, weight=weight)
        pairs = split_factors(factors, who, convert=as_matrix, required=True)
        known = {m: _Dims(*self._shape[m]) for m in pairs if m in self._shape}
        check_client_modules(who, pairs, known, max_rank=self.max_rank, rank=rank, rank_pattern=rank_pattern)
        for module, (B, A) in pairs.items():
            check_finite_contribution(who, module, B, A, float(w) * scaling(alpha, B.shape[1], rslora))
        subsets: dict[int, dict[str, np.ndarray]] = {}
        new: list[tuple[str, int]] = []
        for module, (B, A) in pairs.items():
            shard = self._owner.get(module)
            if shard is None:   # a new module: charged now, so the next new one sees its load
                shard = least_loaded(self._load)
                self._load[shard] += 4 * B.shape[0] * A.shape[1]
                new.append((module, shard))
            sub = subsets.setdefault(shard, {})
            sub[f"{module}.lora_B.weight"], sub[f"{module}.lora_A.weight"] = B, A
        kwargs = {"num_examples": int(num_examples), "alpha": float(alpha), "rank": rank,
                  "rank_pattern": dict(rank_pattern) if rank_pattern else None, "rslora": bool(rslora),
                  "client_id": client_id, "weight": weight}
        path = self._spool_client(subsets, kwargs)
        calls = {s: self._actor(s).add.remote(sub, kwargs) for s, sub in subsets.items()}
        try:
            self._call_all(calls, lambda s: self._actor(s).add.remote(subsets[s], kwargs))
        except Exception as exc:
            if not _is_task_value_error(exc):
                raise
            # a shard refused it after others took it: rebuild those without this client
            for module, shard in new:
                self._load[shard] -= 4 * pairs[module][0].shape[0] * pairs[module][1].shape[1]
            for s in subsets:
                self._rebuild(s, self._spooled)
            path.unlink(missing_ok=True)
            raise ValueError(str(_cause(exc))) from None
        # committed: the module map, the spool and the counts
        for module, shard in new:
            self._owner[module] = shard
            self._shape[module] = (pairs[module][0].shape[0], pairs[module][1].shape[1])
        self._spooled.append(path)
        self._finish_client(w, client_id)

    # ------------------------------------------------------------------ results
    @property
    def modules(self) -> list[str]:
        return sorted(self._owner)

    def owners(self) -> dict[str, int]:
        return dict(sorted(self._owner.items()))

    def shard_info(self) -> list[dict]:
        """Per shard: the actor's pid, resident memory, aggregator state bytes and module count."""
        busy = sorted(set(self._owner.values()))
        infos = self._call_all({s: self._actor(s).info.remote() for s in busy}, lambda s: self._actor(s).info.remote())
        return [{"shard": s, **infos[s]} for s in busy]

    def state_bytes(self) -> int:
        return sum(i["state_bytes"] for i in self.shard_info())

    def finalize(self) -> GlobalAdapter:
        """Every shard's truncated SVDs in parallel, merged into one adapter."""
        if self.num_clients == 0:
            raise ValueError("finalize() needs at least one client; none was added")
        busy = sorted(set(self._owner.values()))
        outs = self._call_all({s: self._actor(s).finalize.remote() for s in busy},
                              lambda s: self._actor(s).finalize.remote())
        tensors, routes = {}, {}
        for s in busy:
            tensors.update(outs[s][0])
            routes.update(outs[s][1])
        return GlobalAdapter.from_tensors(tensors, self.max_rank, routes)

    def close(self) -> None:
        """Stop the actors and remove the spool (when this aggregator made it)."""
        for i, actor in enumerate(self._actors):
            if actor is not None:
                try:
                    self._ray.kill(actor)
                except Exception:  # noqa: BLE001
                    pass
                self._actors[i] = None
        if self._own_spool:
            shutil.rmtree(self.spool, ignore_errors=True)

    def __enter__(self) -> "ShardedAggregator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Dims:
    """What ``check_client_modules`` reads of an earlier module: its outer dimensions."""

    def __init__(self, d_out: int, d_in: int) -> None:
        self.d_out, self.d_in = d_out, d_in


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


def _is_task_value_error(exc: BaseException) -> bool:
    """A ValueError raised in the actor (a refused client); Ray re-raises it as a RayTaskError
    that is also a ValueError, with the original as its ``cause``."""
    return isinstance(exc, ValueError) or isinstance(_cause(exc), ValueError)
