"""Stub of the private native extension; use server.core.linalg instead."""
from typing import Sequence

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]
kExactPreference: float

def svd_batched(tasks: Sequence[tuple[Sequence[F32], Sequence[F32], Sequence[float]] | tuple[F32, float]],
                ranks: Sequence[int], method: str, oversample: int, power_iters: int, seed: int,
                dense_exact: bool, threads: int) -> list[tuple[F32, F32, F32, str]]: ...
def weighted_sum(Bs: Sequence[F32], As: Sequence[F32], weights: Sequence[float],
                 out: F32 | None = None, threads: int = 0) -> F32: ...
def plan(d_out: int, d_in: int, total_rank: int, rank: int, oversample: int = 10,
         power_iters: int = 2, dense_exact: bool = False, method: str = "auto") -> dict: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def hardware_threads() -> int: ...
def blas_config() -> str: ...
kAutoEnergyTol: float
kAutoMaxPowerIters: int
# Streaming sketch (server.core.linalg.StreamingSketch). dims = (d_out, d_in, k, s, seed): the
# sparse sign test maps are regenerated from them, never passed or stored;
# state = (Y (d_out, k), W (k, d_in), Z (s, s)), updated in place.
kSketchZeta: int
def sketch_update(tasks: Sequence[tuple[tuple[int, int, int, int, int], tuple[F32, F32, F32],
                                        Sequence[F32], Sequence[F32], Sequence[float]]],
                  threads: int) -> None: ...
def sketch_finalize(tasks: Sequence[tuple[tuple[int, int, int, int, int], tuple[F32, F32, F32], float, int]],
                    threads: int) -> list[tuple[F32, F32, F32, str]]: ...
