// Streaming sketch route (one pass, bounded memory): see SketchTests in flexlora/core.h.
#include "sketch.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace flexlora::detail {

void check_sketch_tests(const SketchTests& t) {
  if (t.d_out < 1 || t.d_in < 1) throw std::invalid_argument("sketch: d_out and d_in must be >= 1");
  if (t.k < 1 || t.k > std::min(t.d_out, t.d_in))
    throw std::invalid_argument("sketch: k must be in [1, min(d_out, d_in)]");
  if (t.s < t.k) throw std::invalid_argument("sketch: core size s must be >= k");
}

// Y^T += w (A Omega)^T B^T; W^T += w A^T (Psi B)^T; Z += w (Phi B)(A Xi^T), per client.
// Column-major views: B[c] (row-major m x r) is Bt (r x m, ld r); A[c] (row-major r x n)
// is At (n x r, ld n).
void sketch_update_one(const SketchTests& t, SketchState& st, const FactorSet& f) {
  check_sketch_tests(t);
  if (f.d_out != t.d_out || f.d_in != t.d_in)
    throw std::invalid_argument("sketch: factor shapes differ from the sketch's");
  const int m = t.d_out, n = t.d_in, k = t.k, s = t.s;
  int rmax = 0;
  for (int c = 0; c < f.num_clients; ++c) rmax = std::max(rmax, f.ranks[c]);
  std::vector<float> AO(static_cast<size_t>(k) * rmax), PB(static_cast<size_t>(k) * rmax),
      FB(static_cast<size_t>(s) * rmax), AX(static_cast<size_t>(rmax) * s);
  for (int c = 0; c < f.num_clients; ++c) {
    const int r = f.ranks[c];
    const float w = f.weights[c];
    if (w == 0.0f) continue;
    const float* Bt = f.B[c];
    const float* At = f.A[c];
    // (A Omega)^T = Omega^T A^T: (k x r)
    gemm(false, false, k, r, n, 1.0f, t.Omega, k, At, n, 0.0f, AO.data(), k);
    gemm(false, false, k, m, r, w, AO.data(), k, Bt, r, 1.0f, st.Y, k);
    // Psi B (k x r) = Psi^T^T Bt^T
    gemm(true, true, k, r, m, 1.0f, t.Psi, m, Bt, r, 0.0f, PB.data(), k);
    gemm(false, true, n, k, r, w, At, n, PB.data(), k, 1.0f, st.W, n);
    // Phi B (s x r), A Xi^T (r x s)
    gemm(true, true, s, r, m, 1.0f, t.Phi, m, Bt, r, 0.0f, FB.data(), s);
    gemm(true, false, r, s, n, 1.0f, At, n, t.Xi, n, 0.0f, AX.data(), r);
    gemm(false, false, s, s, r, w, FB.data(), s, AX.data(), r, 1.0f, st.Z, s);
  }
}

void sketch_finalize_one(const SketchFinalize& task, SvdOutput& out) {
  const SketchTests& t = task.tests;
  check_sketch_tests(t);
  const int m = t.d_out, n = t.d_in, k = t.k, s = t.s, rank = task.rank;
  std::memset(out.U, 0, sizeof(float) * static_cast<size_t>(m) * rank);
  std::memset(out.S, 0, sizeof(float) * rank);
  std::memset(out.Vt, 0, sizeof(float) * static_cast<size_t>(n) * rank);
  // Q = orth(Y) (m x k), P = orth(W^T) (n x k): Householder (Y may be rank-deficient when
  // dW's rank is below k; orthonormal columns either way)
  Mat Q = Mat::uninit(m, k), P = Mat::uninit(n, k);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < k; ++j) Q.data[i + static_cast<size_t>(j) * m] = task.Y[j + static_cast<size_t>(i) * k];
  std::memcpy(P.p(), task.W, sizeof(float) * static_cast<size_t>(n) * k);
  thin_qr(Q, nullptr);
  thin_qr(P, nullptr);
  // Phi Q (s x k) = QR1 R1, Xi P (s x k) = QR2 R2; C = R1^{-1} QR1^T Z QR2 R2^{-T}
  Mat PhiQ = Mat::uninit(s, k), XiP = Mat::uninit(s, k), R1, R2;
  gemm(true, false, s, k, m, 1.0f, t.Phi, m, Q.p(), m, 0.0f, PhiQ.p(), s);
  gemm(true, false, s, k, n, 1.0f, t.Xi, n, P.p(), n, 0.0f, XiP.p(), s);
  thin_qr(PhiQ, &R1);
  thin_qr(XiP, &R2);
  Mat T = Mat::uninit(k, s), C = Mat::uninit(k, k);
  gemm(true, false, k, s, s, 1.0f, PhiQ.p(), s, task.Z, s, 0.0f, T.p(), k);
  gemm(false, false, k, k, s, task.scale, T.p(), k, XiP.p(), s, 0.0f, C.p(), k);
  trsm_f32(true, false, k, k, R1.p(), k, C.p(), k);   // R1^{-1} C
  trsm_f32(false, true, k, k, R2.p(), k, C.p(), k);   // C R2^{-T}
  Mat Uc, Vct;
  std::vector<float> S;
  thin_svd(C, Uc, S, Vct);
  const int r_eff = std::min(rank, static_cast<int>(S.size()));
  gemm(true, true, r_eff, m, k, 1.0f, Uc.p(), k, Q.p(), m, 0.0f, out.U, rank);
  gemm(false, true, n, r_eff, k, 1.0f, P.p(), n, Vct.p(), k, 0.0f, out.Vt, n);
  for (int i = 0; i < r_eff; ++i) out.S[i] = std::max(0.0f, S[i]);
}

}  // namespace flexlora::detail
