#include "blas.h"

#include <cblas.h>
#include <lapacke.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <new>
#include <cmath>
#include <stdexcept>
#include <string>

namespace flexlora::detail {

namespace {
constexpr size_t kHuge = size_t{2} << 20;  // 2 MiB
}

void* big_alloc(size_t bytes) {
  if (bytes < 4 * kHuge) {
    void* p = std::malloc(bytes ? bytes : 1);
    if (!p) throw std::bad_alloc();
    return p;
  }
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, rounded);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, rounded, MADV_HUGEPAGE);  // advisory; ignored where THP is off
#endif
  return p;
}

void big_free(void* p, size_t) noexcept { std::free(p); }

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

std::vector<double> gram(const Mat& X, bool rows) {
  const int m = rows ? X.cols : X.rows, n = rows ? X.rows : X.cols;
  std::vector<float> g(static_cast<size_t>(n) * n, 0.0f);
  if (n > 0 && m > 0)
    scipy_cblas_ssyrk(CblasColMajor, CblasUpper, rows ? CblasNoTrans : CblasTrans, n, m, 1.0f,
                      X.p(), X.rows, 0.0f, g.data(), n);
  std::vector<double> G(g.size());
  for (int j = 0; j < n; ++j)
    for (int i = 0; i <= j; ++i) {
      const double v = g[i + static_cast<size_t>(j) * n];
      G[i + static_cast<size_t>(j) * n] = v;
      G[j + static_cast<size_t>(i) * n] = v;
    }
  return G;
}

namespace {
// One Cholesky-QR step: X <- X R^{-1} with G + shift I = R^T R. Without a shift it refuses
// (returns false, X untouched) when a pivot falls below kMinPivot * max diag(G): then
// cond(X)^2 > ~1e6 and the float32 Gram has lost X's small directions.
bool cholqr_step(Mat& X, std::vector<double> G, double shift_rel) {
  constexpr double kMinPivot = 1e-6;
  const int n = X.cols;
  double gmax = 0.0;
  for (int i = 0; i < n; ++i) gmax = std::max(gmax, G[i + static_cast<size_t>(i) * n]);
  if (!(gmax > 0.0) || !std::isfinite(gmax)) return false;
  for (int i = 0; i < n; ++i) G[i + static_cast<size_t>(i) * n] += shift_rel * gmax;
  if (scipy_LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', n, G.data(), n) != 0) return false;
  std::vector<float> R(static_cast<size_t>(n) * n, 0.0f);
  for (int j = 0; j < n; ++j) {
    const double d = G[j + static_cast<size_t>(j) * n];
    if (!(d * d > kMinPivot * gmax)) return false;
    for (int i = 0; i <= j; ++i)
      R[i + static_cast<size_t>(j) * n] = static_cast<float>(G[i + static_cast<size_t>(j) * n]);
  }
  scipy_cblas_strsm(CblasColMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, X.rows,
                    n, 1.0f, R.data(), n, X.p(), X.rows);
  return true;
}
}  // namespace

void orthonormalize(Mat& X, const std::vector<double>* G0) {
  // CholQR2; if X is too ill-conditioned for a plain first step, shifted CholQR3 (Fukaya et
  // al., SISC 2020): the shift 1e-5 max diag(G) keeps the Cholesky positive and leaves a
  // basis with cond <= ~300, which two plain steps then make orthonormal.
  if (X.cols == 0 || X.rows == 0) return;
  if (X.rows >= X.cols) {
    bool ok = cholqr_step(X, G0 ? *G0 : gram(X), 0.0);
    if (!ok) ok = cholqr_step(X, G0 ? *G0 : gram(X), 1e-5) && cholqr_step(X, gram(X), 0.0);
    if (ok && cholqr_step(X, gram(X), 0.0)) return;
  }
  thin_qr(X, nullptr);  // wide, rank-deficient or non-finite: Householder, always stable
}

std::vector<double> gram_f64(const float* X, int rows, int cols, int ld, bool of_rows) {
  const int n = of_rows ? rows : cols;
  std::vector<double> G(static_cast<size_t>(n) * n, 0.0);
  if (rows == 0 || cols == 0) return G;
  constexpr int kBlock = 256;  // columns (of_rows) or rows (else) converted at a time
  const int total = of_rows ? cols : rows;
  std::vector<double> buf(static_cast<size_t>(kBlock) * n);
  for (int b0 = 0; b0 < total; b0 += kBlock) {
    const int b = std::min(kBlock, total - b0);
    if (of_rows) {  // X[:, b0:b0+b] -> buf (rows x b, ld rows); G += buf buf^T
      for (int j = 0; j < b; ++j) {
        const float* src = X + static_cast<size_t>(b0 + j) * ld;
        double* dst = buf.data() + static_cast<size_t>(j) * rows;
        for (int i = 0; i < rows; ++i) dst[i] = src[i];
      }
      scipy_cblas_dsyrk(CblasColMajor, CblasUpper, CblasNoTrans, n, b, 1.0, buf.data(), rows,
                        1.0, G.data(), n);
    } else {  // X[b0:b0+b, :] -> buf (b x cols, ld b); G += buf^T buf
      for (int j = 0; j < cols; ++j) {
        const float* src = X + b0 + static_cast<size_t>(j) * ld;
        double* dst = buf.data() + static_cast<size_t>(j) * b;
        for (int i = 0; i < b; ++i) dst[i] = src[i];
      }
      scipy_cblas_dsyrk(CblasColMajor, CblasUpper, CblasTrans, n, b, 1.0, buf.data(), b, 1.0,
                        G.data(), n);
    }
  }
  for (int j = 0; j < n; ++j)
    for (int i = j + 1; i < n; ++i) G[i + static_cast<size_t>(j) * n] = G[j + static_cast<size_t>(i) * n];
  return G;
}

bool scaled_cholesky(std::vector<double>& G, int n, double min_pivot) {
  std::vector<double> d(n);
  for (int i = 0; i < n; ++i) {
    const double g = G[i + static_cast<size_t>(i) * n];
    if (!(g > 0.0) || !std::isfinite(g)) return false;
    d[i] = 1.0 / std::sqrt(g);
  }
  for (int j = 0; j < n; ++j)
    for (int i = 0; i <= j; ++i) G[i + static_cast<size_t>(j) * n] *= d[i] * d[j];
  if (scipy_LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', n, G.data(), n) != 0) return false;
  for (int j = 0; j < n; ++j) {
    const double p = G[j + static_cast<size_t>(j) * n];
    if (!(p * p >= min_pivot)) return false;
    for (int i = 0; i <= j; ++i) G[i + static_cast<size_t>(j) * n] /= d[j];  // Rf = Rs D^{-1}
    for (int i = j + 1; i < n; ++i) G[i + static_cast<size_t>(j) * n] = 0.0;
  }
  return true;
}

void trmm_upper(bool left, bool trans, int rows, int cols, const double* T, int ldt, double* B,
                int ldb) {
  if (rows == 0 || cols == 0) return;
  scipy_cblas_dtrmm(CblasColMajor, left ? CblasLeft : CblasRight, CblasUpper,
                    trans ? CblasTrans : CblasNoTrans, CblasNonUnit, rows, cols, 1.0, T, ldt, B,
                    ldb);
}

void trsm_f32(bool left, bool trans, int rows, int cols, const float* T, int ldt, float* B,
              int ldb) {
  if (rows == 0 || cols == 0) return;
  scipy_cblas_strsm(CblasColMajor, left ? CblasLeft : CblasRight, CblasUpper,
                    trans ? CblasTrans : CblasNoTrans, CblasNonUnit, rows, cols, 1.0f, T, ldt, B,
                    ldb);
}

void trsm_upper_left(int n, int cols, const double* T, int ldt, double* B, int ldb) {
  if (n == 0 || cols == 0) return;
  scipy_cblas_dtrsm(CblasColMajor, CblasLeft, CblasUpper, CblasNoTrans, CblasNonUnit, n, cols,
                    1.0, T, ldt, B, ldb);
}

void top_eigenpairs(std::vector<double>& G, int n, int k, std::vector<double>& lam,
                    std::vector<double>& V) {
  k = std::min(k, n);
  lam.assign(n, 0.0);
  V.assign(static_cast<size_t>(n) * std::max(k, 1), 0.0);
  if (k <= 0) return;
  // dsytrd + dstemr (MRRR on the wanted index range) + dormtr on k vectors. dsyevr with
  // RANGE='I' would use bisection and inverse iteration instead (dstebz/dstein), which on
  // 588 x 588, k = 200 took longer than the tridiagonal reduction.
  std::vector<double> d(n), e(std::max(1, n - 1)), tau(std::max(1, n - 1));
  lapack_int info = scipy_LAPACKE_dsytrd(LAPACK_COL_MAJOR, 'U', n, G.data(), n, d.data(),
                                         e.data(), tau.data());
  if (info != 0) throw std::runtime_error("dsytrd failed, info=" + std::to_string(info));
  e.resize(n);  // dstemr needs n entries of workspace in e
  std::vector<lapack_int> isuppz(2 * static_cast<size_t>(n));
  lapack_int found = 0, tryrac = 1;
  info = scipy_LAPACKE_dstemr(LAPACK_COL_MAJOR, 'V', 'I', n, d.data(), e.data(), 0.0, 0.0,
                              n - k + 1, n, &found, lam.data(), V.data(), n, k, isuppz.data(),
                              &tryrac);
  if (info != 0 || found != k) throw std::runtime_error("dstemr failed, info=" + std::to_string(info));
  info = scipy_LAPACKE_dormtr(LAPACK_COL_MAJOR, 'L', 'U', 'N', n, k, G.data(), n, tau.data(),
                              V.data(), n);
  if (info != 0) throw std::runtime_error("dormtr failed, info=" + std::to_string(info));
  // ascending -> descending
  lam.resize(k);
  std::reverse(lam.begin(), lam.end());
  for (int j = 0; j < k / 2; ++j)
    std::swap_ranges(V.begin() + static_cast<size_t>(j) * n, V.begin() + static_cast<size_t>(j + 1) * n,
                     V.begin() + static_cast<size_t>(k - 1 - j) * n);
}

double top_eigen_sum(std::vector<double>& G, int n, int k) {
  std::vector<double> w(n);
  if (scipy_LAPACKE_dsyevd(LAPACK_COL_MAJOR, 'N', 'U', n, G.data(), n, w.data()) != 0)
    throw std::runtime_error("dsyevd failed");
  double s = 0.0;  // ascending order
  for (int i = std::max(0, n - k); i < n; ++i) s += std::max(0.0, w[i]);
  return s;
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
