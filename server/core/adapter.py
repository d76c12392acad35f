"""The aggregated global adapter: per-module truncated SVD and its redistribution to each
client at the client's own rank and scaling (the ``SPLITS``)."""
from __future__ import annotations

import json
import math
import numbers
import struct
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from edge_client.completion import complete_rows
from edge_client.wire import LORA_A_SUFFIX, LORA_B_SUFFIX, rank_for_module, scaling
from server.core.validate import as_rank

__all__ = ["GlobalAdapter", "SPLITS"]

# Ways to split the rank-r truncation U_r S_r V_r^T into (B, A); the first is the default, the
# official code's (all of S on B). Every config, CLI and strategy takes its choices from here.
SPLITS = ("reference", "balanced")
_METADATA_KEY = "flexlora"
_SCHEMA = 1


@dataclass
class GlobalAdapter:
    """Per module ``(U, S, Vt)`` of the aggregated update at ``max_rank``."""
    modules: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    max_rank: int
    routes: dict[str, str] = field(default_factory=dict)

    def delta(self, module: str) -> np.ndarray:
        """``U diag(S) Vt`` at ``max_rank`` (d_out x d_in)."""
        if module not in self.modules:
            raise ValueError(f"module {module!r} is not in this adapter")
        U, S, Vt = self.modules[module]
        return (U * S) @ Vt

    def client_factors(self, rank: int | Mapping[str, int] | None = None, alpha: float = 16.0,
                       rslora: bool = False, split: str = "reference",
                       rank_pattern: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """peft-named factors at a client's rank with ``s * B @ A`` equal to the rank-r
        truncation of each module's update, ``s`` the client's LoRA scaling.

        ``rank`` is the default rank (None: ``max_rank``) or a rank pattern; ``split`` puts all
        of ``S`` on B (``"reference"``, the default: the official code's ``B = U_r S_r / s``,
        ``A = V_r^T``) or ``sqrt(S)`` on both sides (``"balanced"``).

        Slots beyond the update's numerical rank (zero singular value) get an orthonormal
        completion of ``A`` (unit rows orthogonal to the others, ``B`` zero there), as the
        official full SVD does, so they learn like fresh LoRA slots
        (``edge_client.completion``)."""
        if isinstance(rank, Mapping):
            rank_pattern, rank = {**rank, **(rank_pattern or {})}, None
        default = self.max_rank if rank is None else as_rank(rank)
        if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        out: dict[str, np.ndarray] = {}
        for module, (U, S, Vt) in self.modules.items():
            r = as_rank(rank_for_module(module, default, rank_pattern), f"rank of {module!r}")
            if r > self.max_rank:
                raise ValueError(f"rank {r} for module {module!r} exceeds max_rank "
                                 f"{self.max_rank} of this adapter")
            s = scaling(alpha, r, rslora)
            Sr = S[:r].astype(np.float64) / s
            if split == "balanced":
                root = np.sqrt(Sr)
                B, A = U[:, :r] * root, root[:, None] * Vt[:r]
            else:
                B, A = U[:, :r] * Sr, Vt[:r]
            empty = Sr <= (Sr[0] if Sr.size else 0.0) * 1e-6
            if empty.any():
                B = np.array(B, dtype=np.float64, copy=True)
                B[:, empty] = 0.0
                A = complete_rows(np.where(empty[:, None], 0.0, A), empty)
            out[module + LORA_B_SUFFIX] = np.ascontiguousarray(B, dtype=np.float32)
            out[module + LORA_A_SUFFIX] = np.ascontiguousarray(A, dtype=np.float32)
        return out

    # ------------------------------------------------------------------ serialisation
    def to_tensors(self) -> dict[str, np.ndarray]:
        """``<module>.U``, ``<module>.S``, ``<module>.Vt`` (the checkpoint's and the wire's form)."""
        tensors = {}
        for module, (U, S, Vt) in self.modules.items():
            tensors[f"{module}.U"], tensors[f"{module}.S"], tensors[f"{module}.Vt"] = U, S, Vt
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], max_rank: int,
                     routes: Mapping[str, str] | None = None) -> "GlobalAdapter":
        """Inverse of :meth:`to_tensors`; shapes are checked against ``max_rank``."""
        max_rank = as_rank(max_rank, "max_rank")
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        modules = {}
        for module in names:
            try:
                U, S, Vt = (np.asarray(tensors[f"{module}.{p}"], np.float32) for p in ("U", "S", "Vt"))
            except KeyError as exc:
                raise ValueError(f"module {module!r}: tensor {exc} is missing") from None
            if U.ndim != 2 or S.shape != (max_rank,) or U.shape[1] != max_rank or \
                    Vt.ndim != 2 or Vt.shape[0] != max_rank:
                raise ValueError(f"module {module!r}: shapes {U.shape}, {S.shape}, {Vt.shape} "
                                 f"do not match max_rank {max_rank}")
            modules[module] = (U, S, Vt)
        return cls(modules=modules, max_rank=max_rank, routes=dict(routes or {}))

    def to_bytes(self) -> bytes:
        """safetensors of :meth:`to_tensors` plus JSON metadata (never pickle)."""
        from safetensors.numpy import save
        meta = {"schema": _SCHEMA, "kind": "global_adapter", "max_rank": self.max_rank,
                "modules": sorted(self.modules), "routes": self.routes}
        return save(self.to_tensors(), metadata={_METADATA_KEY: json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "GlobalAdapter":
        from safetensors.numpy import load
        if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
            raise ValueError("data is not a safetensors buffer")
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        if n > len(data) - 8:
            raise ValueError("data has a truncated safetensors header")
        try:
            header = json.loads(bytes(data[8:8 + n]))
            meta = json.loads(header["__metadata__"][_METADATA_KEY])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"data has no FlexLoRA global-adapter metadata: {exc}") from None
        if meta.get("kind") != "global_adapter" or meta.get("schema") != _SCHEMA:
            raise ValueError(f"data is not a schema-{_SCHEMA} global adapter: {meta!r:.200}")
        tensors = load(bytes(data))
        listed = set(meta.get("modules", []))
        return cls.from_tensors({k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] in listed},
                                meta.get("max_rank"), meta.get("routes", {}))
