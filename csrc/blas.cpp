#include "blas.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace flexlora::detail {

void gemm(bool transA, bool transB, int m, int n, int k, float alpha, const float* A,
          int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves C untouched when k = 0 only for beta = 1
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) C[i + static_cast<size_t>(j) * ldc] *= beta;
    return;
  }
  scipy_cblas_sgemm(CblasColMajor, transA ? CblasTrans : CblasNoTrans,
                    transB ? CblasTrans : CblasNoTrans, m, n, k, alpha, A, lda, B, ldb, beta,
                    C, ldc);
}

void thin_qr(Mat& a, Mat* R) {
  const int m = a.rows, n = a.cols, k = std::min(m, n);
  if (k == 0) return;
  std::vector<float> tau(k);
  lapack_int info = scipy_LAPACKE_sgeqrf(LAPACK_COL_MAJOR, m, n, a.p(), m, tau.data());
  if (info != 0) throw std::runtime_error("sgeqrf failed, info=" + std::to_string(info));
  if (R) {
    *R = Mat(k, n);
    for (int j = 0; j < n; ++j)
      for (int i = 0; i <= std::min(j, k - 1); ++i)
        R->data[i + static_cast<size_t>(j) * k] = a.data[i + static_cast<size_t>(j) * m];
  }
  info = scipy_LAPACKE_sorgqr(LAPACK_COL_MAJOR, m, k, k, a.p(), m, tau.data());
  if (info != 0) throw std::runtime_error("sorgqr failed, info=" + std::to_string(info));
  a.cols = k;
  a.data.resize(static_cast<size_t>(m) * k);
}

void thin_svd(Mat& a, Mat& U, std::vector<float>& S, Mat& Vt) {
  const int m = a.rows, n = a.cols, k = std::min(m, n);
  U = Mat(m, k);
  Vt = Mat(k, n);
  S.assign(k, 0.0f);
  if (k == 0) return;
  lapack_int info = scipy_LAPACKE_sgesdd(LAPACK_COL_MAJOR, 'S', m, n, a.p(), m, S.data(),
                                         U.p(), m, Vt.p(), k);
  if (info != 0) {
    // gesdd can fail to converge on pathological input; gesvd is slower but more robust.
    std::vector<float> superb(std::max(1, k - 1));
    info = scipy_LAPACKE_sgesvd(LAPACK_COL_MAJOR, 'S', 'S', m, n, a.p(), m, S.data(), U.p(),
                                m, Vt.p(), k, superb.data());
    if (info != 0) throw std::runtime_error("sgesvd failed, info=" + std::to_string(info));
  }
}

namespace {
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
inline double unit_open(uint64_t bits) {  // (0, 1]
  return (static_cast<double>(bits >> 11) + 1.0) * (1.0 / 9007199254740992.0);
}
}  // namespace

void gaussian_fill(float* x, size_t n, uint64_t seed) {
  const uint64_t base = splitmix64(seed ^ 0x5EEDF1E7105AULL);
  const double two_pi = 6.283185307179586;
  for (size_t i = 0; i < n; i += 2) {
    const uint64_t pair = i / 2;
    const double u1 = unit_open(splitmix64(base + 2 * pair));
    const double u2 = unit_open(splitmix64(base + 2 * pair + 1));
    const double r = std::sqrt(-2.0 * std::log(u1));
    x[i] = static_cast<float>(r * std::cos(two_pi * u2));
    if (i + 1 < n) x[i + 1] = static_cast<float>(r * std::sin(two_pi * u2));
  }
}

void blas_set_threads(int n) { scipy_openblas_set_num_threads(std::max(1, n)); }
int blas_get_threads() { return scipy_openblas_get_num_threads(); }

}  // namespace flexlora::detail
