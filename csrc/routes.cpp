#include "routes.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace flexlora::detail {

namespace {
// dst (column-major, ld ldd) <- src^T for src (rows x cols) row-major: 64x64 tiles so both
// sides stream through cache (a naive strided loop costs more than the GEMM it feeds).
void transpose_into(const float* src, int rows, int cols, float* dst, int ldd) {
  constexpr int kTile = 64;
  for (int i0 = 0; i0 < rows; i0 += kTile)
    for (int j0 = 0; j0 < cols; j0 += kTile) {
      const int i1 = std::min(rows, i0 + kTile), j1 = std::min(cols, j0 + kTile);
      for (int j = j0; j < j1; ++j)
        for (int i = i0; i < i1; ++i)
          dst[i + static_cast<size_t>(j) * ldd] = src[static_cast<size_t>(i) * cols + j];
    }
}
}  // namespace

Factored concat_factors(const FactorSet& f) {
  Factored F;
  F.m = f.d_out;
  F.n = f.d_in;
  F.R = static_cast<int>(f.total_rank());
  F.BcT = Mat::uninit(F.R, F.m);
  F.At = Mat::uninit(F.n, F.R);
  int off = 0;
  for (int k = 0; k < f.num_clients; ++k) {
    const int r = f.ranks[k];
    const float w = f.weights[k];
    // row i of B[k] (row-major m x r) -> rows off.. of column i of BcT (R x m)
    for (int i = 0; i < F.m; ++i)
      std::memcpy(F.BcT.p() + static_cast<size_t>(i) * F.R + off,
                  f.B[k] + static_cast<size_t>(i) * r, sizeof(float) * r);
    for (int j = 0; j < r; ++j) {          // row j of A[k] is column off+j of At
      float* dst = F.At.p() + static_cast<size_t>(off + j) * F.n;
      const float* src = f.A[k] + static_cast<size_t>(j) * F.n;
      for (int c = 0; c < F.n; ++c) dst[c] = w * src[c];
    }
    off += r;
  }
  return F;
}

Mat form_dense(const Factored& F) {
  Mat W = Mat::uninit(F.n, F.m);
  gemm(false, false, F.n, F.m, F.R, 1.0f, F.At.p(), F.n, F.BcT.p(), F.R, 0.0f, W.p(), F.n);
  return W;
}

namespace {

void zero_output(SvdOutput& out, int m, int n, int rank) {
  std::memset(out.U, 0, sizeof(float) * static_cast<size_t>(m) * rank);
  std::memset(out.S, 0, sizeof(float) * rank);
  std::memset(out.Vt, 0, sizeof(float) * static_cast<size_t>(n) * rank);
}

// The output U row-major (m x rank) is column-major U^T (rank x m, ld rank); Vt row-major
// (rank x n) is column-major V (n x rank, ld n).
void copy_V_columns(const Mat& V, int r_eff, SvdOutput& out) {
  std::memcpy(out.Vt, V.p(), sizeof(float) * static_cast<size_t>(V.rows) * r_eff);
}

// Operators: Y = M X and Y = M^T X for column-major X.
struct FactoredOp {
  const Factored& F;
  int rows() const { return F.m; }
  int cols() const { return F.n; }
  void apply(const Mat& X, Mat& Y) const {  // X (n x l) -> Y (m x l)
    const int l = X.cols;
    Mat T = Mat::uninit(F.R, l);
    gemm(true, false, F.R, l, F.n, 1.0f, F.At.p(), F.n, X.p(), F.n, 0.0f, T.p(), F.R);
    Y = Mat::uninit(F.m, l);
    gemm(true, false, F.m, l, F.R, 1.0f, F.BcT.p(), F.R, T.p(), F.R, 0.0f, Y.p(), F.m);
  }
  void apply_t(const Mat& X, Mat& Y) const {  // X (m x l) -> Y (n x l)
    const int l = X.cols;
    Mat T = Mat::uninit(F.R, l);
    gemm(false, false, F.R, l, F.m, 1.0f, F.BcT.p(), F.R, X.p(), F.m, 0.0f, T.p(), F.R);
    Y = Mat::uninit(F.n, l);
    gemm(false, false, F.n, l, F.R, 1.0f, F.At.p(), F.n, T.p(), F.R, 0.0f, Y.p(), F.n);
  }
};

struct DenseOp {  // W = M^T, column-major (n x m)
  const float* W;
  int m, n;
  int rows() const { return m; }
  int cols() const { return n; }
  void apply(const Mat& X, Mat& Y) const {
    Y = Mat::uninit(m, X.cols);
    gemm(true, false, m, X.cols, n, 1.0f, W, n, X.p(), n, 0.0f, Y.p(), m);
  }
  void apply_t(const Mat& X, Mat& Y) const {
    Y = Mat::uninit(n, X.cols);
    gemm(false, false, n, X.cols, m, 1.0f, W, n, X.p(), m, 0.0f, Y.p(), n);
  }
};

// Halko-Martinsson-Tropp range finder with subspace (power) iterations and a
// re-orthonormalisation after every product: CholQR2 (BLAS-3, see orthonormalize) with a
// Householder fallback, so the passes dominate. Each iteration computes Z = M^T Q, whose
// Gram G = Z^T Z is also the first CholQR Gram; its top-`rank` eigenvalues are the energy
// the current subspace captures, T = sum of the top-rank sigma_i(Q^T M)^2, and
// E = ||M||_F^2 - T is exactly the squared Frobenius error the result would have if it
// stopped here (Rayleigh-Ritz on span(Q)).
//
// adaptive (method="auto" only; normF2 = ||M||_F^2 >= 0, or kEstimateNorm): power_iters is
// a minimum, and l = rank + auto_oversample(rank, oversample) (at least rank/5 extra
// vectors). After the minimum, iteration stops once an iteration lowers E by at most
// kAutoEnergyTol * E (5%), or at max(power_iters, kAutoMaxPowerIters) iterations.
// Measured on the workloads' heavy-tail mixes (1 layer of cpu_small, rank 200; NumPy replay
// of this loop, err/opt = ||M - USVt||_F / optimum after k iterations, and the relative
// decrease that led to it):
//   strong mix, 2048x2048:  l = 210: k=2 1.0152 (dec 0.058), k=3 1.0072 (0.016), k=4 1.0039
//                           l = 240: k=2 1.0074 (dec 0.042), k=3 1.0027 (0.009), k=4 1.0011
//   strong mix, 5504x2048:  l = 240: k=2 1.0084 (dec 0.042), k=3 1.0032
//   light mix (R < d, where auto takes the exact route anyway): l = 240: k=2 1.00000
// The wider block buys more than an extra iteration on these flat spectra (the gap
// sigma_{l+1}/sigma_rank is what the power iterations raise to their power) at 14% more
// per pass, so auto runs the minimum 2 iterations at l = 240 (err/opt ~1.008, better than
// torch.svd_lowrank's q = rank + 10, niter = 2 at ~1.015) where the former rule (l = 210,
// 1%) ran 4 (1.0034) at 1.7x the passes. Measured alternative: a two-block Rayleigh-Ritz
// on span[Q_prev, Q] reached 1.001-1.003 after 2 iterations, but its 2l-wide final SVD
// costs about as much as two extra iterations on CPU.
//
// kEstimateNorm (factored operator with R > 2 l, where the exact norm would cost more than a
// pass): ||M||_F^2 ~ ||M Omega||_F^2 / l from the first pass (E||M w||^2 = ||M||_F^2 for a
// standard Gaussian w). Its relative error is sqrt(2 sum sigma^4) / (sum sigma^2 sqrt(l)):
// under 0.5% for the spread spectra of R > 2 l client directions; it enters the rule only
// through the size of E (the decrease itself is a difference of captured energies).
constexpr double kEstimateNorm = -2.0;

template <class Op>
int randomized(const Op& op, float scale, const SvdOptions& opt, SvdOutput& out,
               double normF2) {
  const int m = op.rows(), n = op.cols(), rank = opt.rank;
  zero_output(out, m, n, rank);
  const bool adaptive = normF2 >= 0.0 || normF2 == kEstimateNorm;
  const int l = block_width(rank, opt.oversample, m, n, adaptive);
  if (l <= 0) return 0;
  // The passes are large GEMMs and use every BLAS thread; the O(d l^2) steps between them
  // (CholQR, Gram eigenvalues, the final gesdd) are many small BLAS/LAPACK calls whose
  // thread synchronisation costs more than it saves, and on an oversubscribed machine each
  // sync can wait a whole scheduler time slice (seen: 1-2 s per call at 2 threads under
  // load). They run single-threaded.
  const int T = blas_get_threads();
  BlasThreadsScope small_steps(1);
  auto apply = [&](const Mat& X, Mat& Y) { BlasThreadsScope big(T); op.apply(X, Y); };
  auto apply_t = [&](const Mat& X, Mat& Y) { BlasThreadsScope big(T); op.apply_t(X, Y); };
  const int q_min = std::max(0, opt.power_iters);
  const int q_max = adaptive ? std::max(q_min, kAutoMaxPowerIters) : q_min;
  Mat Omega(n, l);
  gaussian_fill(Omega.p(), Omega.data.size(), opt.seed);
  Mat Q, Z;
  apply(Omega, Q);
  Omega = Mat();
  if (normF2 == kEstimateNorm) normF2 = frobenius2(Q.p(), Q.data.size()) / l;
  orthonormalize(Q);
  double prev_E = -1.0;
  int it = 0;
  for (;; ++it) {
    apply_t(Q, Z);  // Z = M^T Q (n x l)
    if (it >= q_max) break;
    std::vector<double> G = gram(Z);
    if (adaptive) {
      std::vector<double> work = G;
      const double E = std::max(0.0, normF2 - top_eigen_sum(work, l, rank));
      if (it >= q_min && (E <= 1e-12 * normF2 ||
                          (prev_E >= 0.0 && prev_E - E <= kAutoEnergyTol * E)))
        break;
      prev_E = E;
    }
    orthonormalize(Z, &G);  // P = orth(Z)
    apply(Z, Q);             // Q = orth(M P)
    orthonormalize(Q);
  }
  Mat Uh, Vht;  // Z = M^T Q = Uh S Vht, so M ~ (Q Vht^T) S Uh^T
  std::vector<float> S;
  thin_svd(Z, Uh, S, Vht);
  const int k = static_cast<int>(S.size());
  const int r_eff = std::min(rank, k);
  gemm(false, true, r_eff, m, k, 1.0f, Vht.p(), k, Q.p(), m, 0.0f, out.U, rank);
  copy_V_columns(Uh, r_eff, out);
  for (int i = 0; i < r_eff; ++i) out.S[i] = scale * S[i];
  return it;
}

}  // namespace

namespace {
// Householder route: thin QR of both concatenated factors, SVD of the small core. Always
// stable (rank-deficient or duplicated factors, R above d); about 45 GFLOP/s on 2 cores.
void exact_householder(const Factored& F, const SvdOptions& opt, SvdOutput& out) {
  const int m = F.m, n = F.n, rank = opt.rank;
  zero_output(out, m, n, rank);
  Mat Qb = Mat::uninit(m, F.R), Rb, Qa = F.At, Ra;
  transpose_into(F.BcT.p(), m, F.R, Qb.p(), m);  // BcT col-major = Bc row-major
  thin_qr(Qb, &Rb);  // Bc = Qb Rb, Qb (m x kb)
  thin_qr(Qa, &Ra);  // At = Qa Ra, Qa (n x ka)
  const int kb = Qb.cols, ka = Qa.cols;
  Mat C(kb, ka);     // M = Qb (Rb Ra^T) Qa^T
  gemm(false, true, kb, ka, F.R, 1.0f, Rb.p(), kb, Ra.p(), ka, 0.0f, C.p(), kb);
  Mat Uc, Vct;
  std::vector<float> S;
  thin_svd(C, Uc, S, Vct);
  const int k = static_cast<int>(S.size());
  const int r_eff = std::min(rank, k);
  gemm(true, true, r_eff, m, kb, 1.0f, Uc.p(), kb, Qb.p(), m, 0.0f, out.U, rank);
  gemm(false, true, n, r_eff, ka, 1.0f, Qa.p(), n, Vct.p(), k, 0.0f, out.Vt, n);
  for (int i = 0; i < r_eff; ++i) out.S[i] = S[i];
}
}  // namespace

// Gram route (BLAS-3 only on the big factors). With Gb = Bc^T Bc = Rb^T Rb (Cholesky) and
// Ga = At^T At, M = Bc At^T = Qb (Rb At^T) with Qb = Bc Rb^{-1} orthonormal, so
// M M^T = Qb K Qb^T with K = Rb Ga Rb^T (R x R, symmetric). The top-k eigenpairs
// (Uc, S^2) of K give U = Bc (Rb^{-1} Uc) and V = M^T U S^{-1} = At (Rb^T Uc S^{-1}).
// The Grams are accumulated in double from the float32 factors (products of floats are
// exact in double), and everything R x R runs in double, so squaring the condition number
// costs nothing that float32 output can see; the only float32 rounding left is in the two
// final GEMMs, whose error grows with cond(Bc D), cond(At D) (D: column scaling). Those
// are checked by the pivots of the column-scaled Cholesky factors; a side that is
// ill-conditioned (duplicated clients, rank-deficient factors, R above d, zero weights)
// sends the module to the Householder route.
bool exact_gram(const Factored& F, const SvdOptions& opt, SvdOutput& out) {
  const int m = F.m, n = F.n, R = F.R, rank = opt.rank;
  if (R > std::min(m, n)) return false;  // a Gram of R > d columns is singular
  const std::vector<double> Gb = gram_f64(F.BcT.p(), R, m, R, true);
  std::vector<double> Ga = gram_f64(F.At.p(), n, R, n, false);
  std::vector<double> Rb = Gb;
  if (!scaled_cholesky(Rb, R, kGramMinPivot)) return false;
  {  // At's conditioning (its factor itself is not needed)
    std::vector<double> Ra = Ga;
    if (!scaled_cholesky(Ra, R, kGramMinPivot)) return false;
  }
  // K = Rb Ga Rb^T
  trmm_upper(true, false, R, R, Rb.data(), R, Ga.data(), R);
  trmm_upper(false, true, R, R, Rb.data(), R, Ga.data(), R);
  const int k = std::min(rank, R);
  std::vector<double> lam, Uc;
  top_eigenpairs(Ga, R, k, lam, Uc);  // descending, Uc (R x k)
  zero_output(out, m, n, rank);
  // Directions below ~1e-7 sigma_1 are under the float32 resolution of the product and
  // their double eigenvectors are noise: report them as zero.
  const double s1 = std::sqrt(std::max(0.0, lam[0]));
  int r_eff = 0;
  while (r_eff < k && std::sqrt(std::max(0.0, lam[r_eff])) > 1e-7 * s1) ++r_eff;
  if (r_eff == 0) return true;
  std::vector<double> Xb(Uc.begin(), Uc.begin() + static_cast<size_t>(R) * r_eff), Y = Xb;
  trsm_upper_left(R, r_eff, Rb.data(), R, Xb.data(), R);
  trmm_upper(true, true, R, r_eff, Rb.data(), R, Y.data(), R);
  std::vector<float> Xf(Xb.size()), Yf(Y.size());
  for (int j = 0; j < r_eff; ++j) {
    const double s = std::sqrt(lam[j]);
    out.S[j] = static_cast<float>(s);
    for (int i = 0; i < R; ++i) {
      const size_t o = i + static_cast<size_t>(j) * R;
      Xf[o] = static_cast<float>(Xb[o]);
      Yf[o] = static_cast<float>(Y[o] / s);
    }
  }
  // U^T (r_eff x m, ld rank) = Xb^T Bc^T; V (n x r_eff, ld n) = At Y
  gemm(true, false, r_eff, m, R, 1.0f, Xf.data(), R, F.BcT.p(), R, 0.0f, out.U, rank);
  gemm(false, false, n, r_eff, R, 1.0f, F.At.p(), n, Yf.data(), R, 0.0f, out.Vt, n);
  return true;
}

void exact_factored(const Factored& F, const SvdOptions& opt, SvdOutput& out) {
  if (!exact_gram(F, opt, out)) exact_householder(F, opt, out);
}

double frobenius2(const Factored& F) {
  // ||Bc At^T||_F^2 = <Bc^T Bc, At^T At>: two R x R Grams (only auto's factored route).
  const std::vector<double> Gb = gram(F.BcT, true), Ga = gram(F.At);
  double s = 0.0;
  for (size_t i = 0; i < Gb.size(); ++i) s += Gb[i] * Ga[i];
  return std::max(0.0, s);
}

double frobenius2(const float* W, size_t count) {
  double s = 0.0;
  for (size_t i = 0; i < count; ++i) s += static_cast<double>(W[i]) * W[i];
  return s;
}

int randomized_factored(const Factored& F, const SvdOptions& opt, SvdOutput& out,
                        bool adaptive) {
  if (!adaptive) return randomized(FactoredOp{F}, 1.0f, opt, out, -1.0);
  const int l = block_width(opt.rank, opt.oversample, F.m, F.n, true);
  return randomized(FactoredOp{F}, 1.0f, opt, out,
                    factored_norm_exact(F.R, l) ? frobenius2(F) : kEstimateNorm);
}

int randomized_dense(const float* W, int m, int n, float scale, const SvdOptions& opt,
                     SvdOutput& out, bool adaptive) {
  const double normF2 = adaptive ? frobenius2(W, static_cast<size_t>(m) * n) : -1.0;
  return randomized(DenseOp{W, m, n}, scale, opt, out, normF2);
}

void exact_dense(const float* W, int m, int n, float scale, const SvdOptions& opt,
                 SvdOutput& out) {
  const int rank = opt.rank;
  zero_output(out, m, n, rank);
  Mat a(n, m);  // M^T, destroyed by the SVD
  std::memcpy(a.p(), W, sizeof(float) * a.data.size());
  Mat Uw, Vwt;
  std::vector<float> S;
  thin_svd(a, Uw, S, Vwt);  // M^T = Uw S Vwt, so U_M = Vwt^T, V_M = Uw
  const int k = static_cast<int>(S.size());
  const int r_eff = std::min(rank, k);
  for (int j = 0; j < m; ++j)
    for (int i = 0; i < r_eff; ++i)
      out.U[i + static_cast<size_t>(j) * rank] = Vwt.data[i + static_cast<size_t>(j) * k];
  copy_V_columns(Uw, r_eff, out);
  for (int i = 0; i < r_eff; ++i) out.S[i] = scale * S[i];
}

}  // namespace flexlora::detail
