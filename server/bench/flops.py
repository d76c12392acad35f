"""Nominal floating-point operation counts, one explicit formula per algorithm.

GFLOP/s in the report is ``formula / median time``: an *effective* rate on a nominal count,
comparable across backends that run the same algorithm, not a hardware counter. A *floor* is the time a
count needs at GEMM rates measured on the machine (:func:`floor_seconds`). Conventions
(a multiply-add counts 2):

* GEMM ``(m x p) @ (p x n)``: ``2 m n p``.
* Householder QR of ``m x n`` (m >= n) with the thin Q formed: ``4 m n^2 - 4/3 n^3``.
* Thin SVD of ``m x n`` (m >= n, U1 and V formed), Golub & Van Loan (4th ed., Fig. 8.6.1):
  ``min(14 m n^2 + 8 n^3, 6 m n^2 + 20 n^3)`` (Golub–Reinsch vs R-SVD). LAPACK gesdd and gesvd
  are both charged this count; divide and conquer does fewer operations in practice, so its
  GFLOP/s reads higher. With U not formed (singular values and V only): ``4 m n^2 + 8 n^3``,
  the count charged to the reference aggregation's full SVD.
* Forming a factored LoRA sum ``dW = [B_1..B_K] [w_k A_k]``: ``2 d_out d_in R``, R = sum r_k.
* Randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) on an operator with
  ``l = k + oversample`` columns and ``q`` power iterations: ``2q + 2`` operator applications
  to ``l`` vectors (sketch, ``2q`` power steps, the projection ``Q^T M``), one thin QR of an
  ``m x l`` block after the sketch and each power step and of an ``n x l`` block inside each,
  the SVD of the ``l x n`` projection and ``U = Q U_b``.
  An application costs ``2 m n l`` on a dense M and ``2 l R (d_out + d_in)`` through factors.
* Exact factored route (docs/interfaces.md, ``server.core.linalg``). With R <= min(d_out, d_in)
  (well-conditioned factors) the Gram form: float64 Grams of ``[B_1..B_K]`` and
  ``[w_k A_k]^T`` (``(d_out + d_in) R^2``), two Cholesky (``2/3 R^3``), ``K = Rb Ga Rb^T``
  (``2 R^3``), the tridiagonal reduction of K (``4/3 R^3``), k eigenvectors back-transformed
  and solved (``4 R^2 k``), and the two back-products ``2 (d_out + d_in) R k``. Otherwise
  (R above d) thin QR of both concatenations (rank-capped), the R x R core product
  (``2 R^3``), its SVD (``22 R^3``), and the back-products.
* One-pass sketch (``server.core.linalg.StreamingSketch``, sketch size k, core size s, Tropp,
  Yurtsever, Udell & Cevher 2017): per client of rank r, ``A [Omega | Xi^T]`` and ``[Psi; Phi] B``
  (``2 r (m + n)(k + s)``), then ``B (A Omega)``, ``(Psi B) A``, ``(Phi B)(A Xi^T)``
  (``2 r (m k + k n + s^2)``); finalize: two Householder QRs (``4 d k^2``), ``Phi Q`` and ``Xi P``
  (``2 s k (m + n)``), QRs of ``s x k`` (``4 s k^2`` each), ``Q1^T Z Q2`` (``2 k s^2 + 2 k^2 s``),
  the SVD of ``k x k`` (``22 k^3``), U and V (``2 (m + n) k rank``).
* ARPACK (``scipy:svds``): ``2 m n`` per matrix-vector product, products counted by wrapping
  M in a LinearOperator on the (untimed) accuracy run; re-orthogonalisation is not counted.
"""

from __future__ import annotations


def gemm(m: int, n: int, p: int) -> float:
    return 2.0 * m * n * p


def qr_thin(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n - 4.0 / 3.0 * n ** 3


def svd_thin(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return min(14.0 * m * n * n + 8.0 * n ** 3, 6.0 * m * n * n + 20.0 * n ** 3)


def svd_sigma_v(m: int, n: int) -> float:
    """Thin SVD computing the singular values and V only (Golub & Van Loan, Fig. 8.6.1)."""
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n + 8.0 * n ** 3


def form_factored(d_out: int, d_in: int, total_rank: int) -> float:
    return gemm(d_out, d_in, total_rank)


def _range_finder_tail(m: int, n: int, rank: int, oversample: int, power_iters: int) -> float:
    """QRs, the small SVD and the back-product of the randomized method (all but the applies)."""
    l = min(rank + oversample, min(m, n))
    qrs = (power_iters + 1) * qr_thin(m, l) + power_iters * qr_thin(n, l)
    return qrs + svd_thin(l, n) + gemm(m, l, l)


def randomized_dense(m: int, n: int, rank: int, oversample: int, power_iters: int) -> float:
    l = min(rank + oversample, min(m, n))
    applies = (2 * power_iters + 2) * gemm(m, n, l)
    return applies + _range_finder_tail(m, n, rank, oversample, power_iters)


def randomized_factored(d_out: int, d_in: int, total_rank: int, rank: int, oversample: int, power_iters: int) -> float:
    l = min(rank + oversample, min(d_out, d_in))
    applies = (2 * power_iters + 2) * 2.0 * l * total_rank * (d_out + d_in)
    return applies + _range_finder_tail(d_out, d_in, rank, oversample, power_iters)


def exact_factored(d_out: int, d_in: int, total_rank: int, rank: int) -> float:
    R = total_rank
    if R <= min(d_out, d_in):
        k = min(rank, R)
        return (d_out + d_in) * R * R + (2.0 / 3.0 + 2.0 + 4.0 / 3.0) * R ** 3 + 4.0 * R * R * k \
            + 2.0 * (d_out + d_in) * R * k
    r_out = min(total_rank, d_out)
    r_in = min(total_rank, d_in)
    core = min(r_out, r_in)
    qrs = qr_thin(d_out, r_out) + qr_thin(d_in, r_in)
    return qrs + gemm(r_out, r_in, total_rank if total_rank < min(d_out, d_in) else core) + svd_thin(r_out, r_in) \
        + 2.0 * (d_out + d_in) * core * rank


def dense_route(d_out: int, d_in: int, total_rank: int, rank: int, oversample: int, power_iters: int,
                svd: str = "randomized") -> float:
    """Our dense route: form dW by one GEMM, then a randomized (or exact) SVD of it."""
    tail = randomized_dense(d_out, d_in, rank, oversample, power_iters) if svd == "randomized" else svd_thin(d_out, d_in)
    return form_factored(d_out, d_in, total_rank) + tail


def arpack(m: int, n: int, products: int) -> float:
    return gemm(m, n, 1) * products


def sketch_one_pass(d_out: int, d_in: int, total_rank: int, rank: int, sketch: int, core: int) -> float:
    """The one-pass sketch route: all clients' updates (total rank R) plus finalize (see above)."""
    m, n, R, k, s = d_out, d_in, total_rank, sketch, core
    zeta = min(k, 8)   # nonzeros per column of the sparse sign test maps
    update = 2 * R * ((m + n) * k + s * s) + 4 * R * min(s, 8) * (m + n)
    finalize = 4 * (m + n) * k * k + 2 * zeta * k * (m + n) + 8 * s * k * k + 2 * k * s * s + 2 * k * k * s \
        + 22 * k ** 3 + 2 * (m + n) * k * rank
    return update + finalize


def floor_seconds(flops: float, flops_f64: float, sgemm_gflops: float, dgemm_gflops: float) -> float:
    """The time ``flops`` take at the measured GEMM rates: the float64 part ``flops_f64`` at dgemm's,
    the rest at sgemm's (a lower bound that a route's median is read against: ``x floor``)."""
    return (flops - flops_f64) / (sgemm_gflops * 1e9) + flops_f64 / (dgemm_gflops * 1e9)
