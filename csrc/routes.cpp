#include "routes.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace flexlora::detail {

Factored concat_factors(const FactorSet& f) {
  Factored F;
  F.m = f.d_out;
  F.n = f.d_in;
  F.R = static_cast<int>(f.total_rank());
  F.Bc = Mat(F.m, F.R);
  F.At = Mat(F.n, F.R);
  int off = 0;
  for (int k = 0; k < f.num_clients; ++k) {
    const int r = f.ranks[k];
    const float w = f.weights[k];
    const float* B = f.B[k];
    const float* A = f.A[k];
    for (int i = 0; i < F.m; ++i)          // B[k] row-major -> columns off.. of Bc
      for (int j = 0; j < r; ++j)
        F.Bc.data[i + static_cast<size_t>(off + j) * F.m] = B[static_cast<size_t>(i) * r + j];
    for (int j = 0; j < r; ++j) {          // row j of A[k] is column off+j of At
      float* dst = F.At.p() + static_cast<size_t>(off + j) * F.n;
      const float* src = A + static_cast<size_t>(j) * F.n;
      for (int c = 0; c < F.n; ++c) dst[c] = w * src[c];
    }
    off += r;
  }
  return F;
}

Mat form_dense(const Factored& F) {
  Mat W(F.n, F.m);
  gemm(false, true, F.n, F.m, F.R, 1.0f, F.At.p(), F.n, F.Bc.p(), F.m, 0.0f, W.p(), F.n);
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
    Mat T(F.R, l);
    gemm(true, false, F.R, l, F.n, 1.0f, F.At.p(), F.n, X.p(), F.n, 0.0f, T.p(), F.R);
    Y = Mat(F.m, l);
    gemm(false, false, F.m, l, F.R, 1.0f, F.Bc.p(), F.m, T.p(), F.R, 0.0f, Y.p(), F.m);
  }
  void apply_t(const Mat& X, Mat& Y) const {  // X (m x l) -> Y (n x l)
    const int l = X.cols;
    Mat T(F.R, l);
    gemm(true, false, F.R, l, F.m, 1.0f, F.Bc.p(), F.m, X.p(), F.m, 0.0f, T.p(), F.R);
    Y = Mat(F.n, l);
    gemm(false, false, F.n, l, F.R, 1.0f, F.At.p(), F.n, T.p(), F.R, 0.0f, Y.p(), F.n);
  }
};

struct DenseOp {  // W = M^T, column-major (n x m)
  const float* W;
  int m, n;
  int rows() const { return m; }
  int cols() const { return n; }
  void apply(const Mat& X, Mat& Y) const {
    Y = Mat(m, X.cols);
    gemm(true, false, m, X.cols, n, 1.0f, W, n, X.p(), n, 0.0f, Y.p(), m);
  }
  void apply_t(const Mat& X, Mat& Y) const {
    Y = Mat(n, X.cols);
    gemm(false, false, n, X.cols, m, 1.0f, W, n, X.p(), m, 0.0f, Y.p(), n);
  }
};

// Halko-Martinsson-Tropp range finder with power iterations, QR between every product.
template <class Op>
void randomized(const Op& op, float scale, const SvdOptions& opt, SvdOutput& out) {
  const int m = op.rows(), n = op.cols(), rank = opt.rank;
  zero_output(out, m, n, rank);
  const int l = std::min({rank + std::max(0, opt.oversample), m, n});
  if (l <= 0) return;
  Mat Omega(n, l);
  gaussian_fill(Omega.p(), Omega.data.size(), opt.seed);
  Mat Q, Z;
  op.apply(Omega, Q);
  thin_qr(Q, nullptr);
  for (int it = 0; it < opt.power_iters; ++it) {
    op.apply_t(Q, Z);
    thin_qr(Z, nullptr);
    op.apply(Z, Q);
    thin_qr(Q, nullptr);
  }
  Mat H;  // H = M^T Q = (Q^T M)^T, (n x l)
  op.apply_t(Q, H);
  Mat Uh, Vht;
  std::vector<float> S;
  thin_svd(H, Uh, S, Vht);  // H = Uh S Vht, so M ~ (Q Vht^T) S Uh^T
  const int k = static_cast<int>(S.size());
  const int r_eff = std::min(rank, k);
  gemm(false, true, r_eff, m, k, 1.0f, Vht.p(), k, Q.p(), m, 0.0f, out.U, rank);
  copy_V_columns(Uh, r_eff, out);
  for (int i = 0; i < r_eff; ++i) out.S[i] = scale * S[i];
}

}  // namespace

void exact_factored(const Factored& F, const SvdOptions& opt, SvdOutput& out) {
  const int m = F.m, n = F.n, rank = opt.rank;
  zero_output(out, m, n, rank);
  Mat Qb = F.Bc, Rb, Qa = F.At, Ra;
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

void randomized_factored(const Factored& F, const SvdOptions& opt, SvdOutput& out) {
  randomized(FactoredOp{F}, 1.0f, opt, out);
}

void randomized_dense(const float* W, int m, int n, float scale, const SvdOptions& opt,
                      SvdOutput& out) {
  randomized(DenseOp{W, m, n}, scale, opt, out);
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
