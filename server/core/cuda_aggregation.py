"""Streaming FlexLoRA aggregation on a CUDA GPU.

:class:`CudaAggregator` and the CPU :class:`server.core.aggregation.Aggregator` share one base,
:class:`server.core.aggregation.AggregatorBase` (same arguments, same per-module weighting
``p_k s_k``, same ``auto`` folding into a dense accumulator past ``dense_threshold``); this
backend keeps the state on the GPU and runs the kernels of :mod:`server.core.cuda` (no sketch
route here):

* client factors arrive as numpy arrays or torch tensors (pinned host memory is fastest;
  CUDA tensors are used in place) and are copied to the device on a dedicated copy stream
  while the previous client's GEMMs run on the compute stream;
* at most ``prefetch`` clients are in flight, so device memory holds the dense accumulators
  and a bounded window of factors, whatever the number of clients;
* a client is validated (shapes, ranks, finiteness on the device) before it touches the
  state, so a rejected client leaves the aggregator as it was.

:meth:`CudaAggregator.finalize` returns a host :class:`~server.core.aggregation.GlobalAdapter`
like the CPU aggregator; :meth:`CudaAggregator.finalize_device` returns the per-module
``(U, S, Vt)`` as torch CUDA tensors.
"""
from __future__ import annotations

import collections
import numbers
from typing import Any, Mapping

import numpy as np

from edge_client.wire import scaling, split_factors
from server.core import cuda
from server.core.adapter import GlobalAdapter
from server.core.aggregation import AggregatorBase, ModuleState, check_client_args, check_client_modules
from server.core.validate import GPU_METHODS

__all__ = ["CudaAggregator"]


class CudaAggregator(AggregatorBase):
    """Streaming weighted aggregation of per-module LoRA factors on a GPU, then truncated
    SVD of every module in one batched native call."""

    def __init__(self, max_rank: int, *, method: str = "auto", oversample: int = 10,
                 power_iters: int = 2, seed: int = 0, threads: int | None = None,
                 dense_threshold: int | None = None, device: str = "cuda", tf32: bool = False,
                 streams: int = 4, prefetch: int = 2, check_finite: bool = True) -> None:
        import torch
        resolved = cuda.resolve_device(device if device != "auto" else "cuda")
        if resolved == "cpu":
            raise ValueError("CudaAggregator needs device='cuda' or 'cuda:N'; use "
                             "server.core.aggregation.Aggregator for the CPU")
        self.device = torch.device(resolved)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # threads is accepted for compatibility; the GPU ignores it
        super().__init__(max_rank, method=method, oversample=oversample, power_iters=power_iters,
                         seed=seed, threads=threads, dense_threshold=dense_threshold,
                         methods=GPU_METHODS)
        self._opts = cuda.options(method, oversample, power_iters, seed, streams, tf32)
        if isinstance(prefetch, bool) or not isinstance(prefetch, numbers.Integral) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1, got {prefetch!r}")
        self.prefetch = int(prefetch)
        self.check_finite = bool(check_finite)
        self.tf32 = tf32
        self._copy = torch.cuda.Stream(self.device)
        self._compute = torch.cuda.Stream(self.device)
        self._inflight: collections.deque = collections.deque()
        self.bytes_copied = 0

    # ------------------------------------------------------------------ adding clients
    def add(self, factors: Mapping[str, Any], *, num_examples: int, alpha: float,
            rank: int | None = None, rank_pattern: Mapping[str, int] | None = None,
            rslora: bool = False, client_id: str | None = None,
            weight: float | None = None) -> None:
        """Add one client's peft-named factors (numpy arrays or torch tensors)."""
        import torch
        who = f"client {client_id!r}" if client_id is not None else f"client #{self.num_clients}"
        w = check_client_args(who, num_examples=num_examples, alpha=alpha, weight=weight)
        pairs = split_factors(factors, who, convert=_factor_in_place, required=True)
        check_client_modules(who, pairs, self._modules, max_rank=self.max_rank, rank=rank,
                             rank_pattern=rank_pattern)
        # Bound the window: wait for the compute of the client `prefetch` places back.
        while len(self._inflight) >= self.prefetch:
            self._inflight.popleft().synchronize()
        with torch.cuda.stream(self._copy):
            dev = {m: (self._to_device(B), self._to_device(A)) for m, (B, A) in pairs.items()}
            if self.check_finite:
                flags = torch.stack([torch.isfinite(t).all() for pair in dev.values() for t in pair])
                ok = bool(flags.all())  # syncs the copy stream only; compute keeps running
                if not ok:
                    for module, (B, A) in dev.items():
                        for name, t in (("lora_B", B), ("lora_A", A)):
                            if not bool(torch.isfinite(t).all()):
                                raise ValueError(f"{who}: {module}.{name} contains NaN or Inf")
        copied = torch.cuda.Event()
        copied.record(self._copy)
        self._compute.wait_event(copied)
        accumulate = []
        with torch.cuda.device(self.device), torch.cuda.stream(self._compute):
            for module, (B, A) in dev.items():
                B.record_stream(self._compute)
                A.record_stream(self._compute)
                item = self._add_module(module, B, A, float(w) * scaling(alpha, B.shape[1], rslora), float(w))
                if item is not None:
                    accumulate.append(item)
            cuda.accumulate(accumulate, self.tf32, self.device)
        done = torch.cuda.Event()
        done.record(self._compute)
        self._inflight.append(done)
        self._finish_client(w, client_id)

    def _to_device(self, x):
        import torch
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        if not t.is_cuda:
            self.bytes_copied += t.numel() * t.element_size()
        t = t.to(self.device, non_blocking=True)
        return t.to(torch.float32).contiguous()

    # backend hooks of AggregatorBase (run on the compute stream)
    def _keep(self, x):
        return x  # the device copy made for this client

    def _zeros(self, d_out: int, d_in: int):
        import torch
        return torch.zeros((d_out, d_in), dtype=torch.float32, device=self.device)

    def _fold(self, st: ModuleState) -> None:
        cuda.weighted_sum(st.Bs, st.As, st.ws, out=st.dense, tf32=self.tf32, check_finite=False)

    def _accumulate(self, st: ModuleState, B, A, w: float):
        # deferred: every dense module of one client runs in one batched native call
        return (st.d_out, st.d_in, B.data_ptr(), A.data_ptr(), B.shape[1], w, st.dense.data_ptr())

    # ------------------------------------------------------------------ results
    def finalize_device(self) -> dict[str, tuple]:
        """Per module ``(U, S, Vt)`` at ``max_rank`` as torch CUDA tensors."""
        import torch
        names = self._check_finalize()
        tasks = self._svd_tasks(names)
        # The SVDs run on the caller's current stream, after every queued accumulation.
        torch.cuda.current_stream(self.device).wait_stream(self._compute)
        out = cuda.run_batched(tasks, [self.max_rank] * len(tasks), self._opts, self.device)
        self._inflight.clear()
        self.routes = {n: r[3] for n, r in zip(names, out)}
        return {n: r[:3] for n, r in zip(names, out)}

    def finalize(self) -> GlobalAdapter:
        """Like :meth:`server.core.aggregation.Aggregator.finalize`: a host GlobalAdapter."""
        dev = self.finalize_device()
        modules = {n: tuple(t.cpu().numpy() for t in usv) for n, usv in dev.items()}
        return GlobalAdapter(modules=modules, max_rank=self.max_rank, routes=dict(self.routes))


def _factor_in_place(x: Any, name: str) -> Any:
    """A factor as given (numpy array or torch tensor, left on its device), checked to be a
    non-empty 2-D float array; ``split_factors``'s converter for this backend."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 2 or min(shape) < 1 or not _is_float(getattr(x, "dtype", None)):
        raise ValueError(f"{name} must be a non-empty 2-D float array, got shape {shape} "
                         f"dtype {getattr(x, 'dtype', None)}")
    return x


def _is_float(dtype: Any) -> bool:
    flag = getattr(dtype, "is_floating_point", None)  # torch dtypes
    if isinstance(flag, bool):
        return flag
    try:
        return dtype is not None and np.dtype(dtype).kind == "f"
    except TypeError:
        return False
