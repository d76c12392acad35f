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

namespace {

uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

enum Map : uint64_t { kOmega = 1, kPsi = 2, kPhi = 3, kXi = 4 };

}  // namespace

SparseSign::SparseSign(const SketchTests& t, int which, int rows_, int cols_)
    : rows(rows_), cols(cols_), zeta(std::min(rows_, kSketchZeta)) {
  row.resize(static_cast<size_t>(cols) * zeta);
  sign.resize(row.size());
  // The shape is part of the key so that sketches of different shapes or sizes never share
  // numbers by accident; modules of one shape and seed share the same maps.
  const uint64_t key = mix64(mix64(t.seed ^ (static_cast<uint64_t>(which) << 56)) ^
                             (static_cast<uint64_t>(t.d_out) << 32 | static_cast<uint64_t>(t.d_in)) ^
                             mix64(static_cast<uint64_t>(t.k) << 32 | static_cast<uint64_t>(t.s)));
  for (int j = 0; j < cols; ++j) {
    uint64_t state = mix64(key + static_cast<uint64_t>(j) * 0xD1B54A32D192ED03ULL);
    int* r = row.data() + static_cast<size_t>(j) * zeta;
    float* g = sign.data() + static_cast<size_t>(j) * zeta;
    for (int z = 0; z < zeta;) {  // zeta distinct rows (zeta <= rows; rejection is cheap at 8)
      state = mix64(state);
      const int candidate = static_cast<int>((state >> 33) % static_cast<uint64_t>(rows));
      if (std::find(r, r + z, candidate) != r + z) continue;
      r[z] = candidate;
      g[z] = (state & 1) ? 1.0f : -1.0f;
      ++z;
    }
  }
}

SparseSign SparseSign::omega(const SketchTests& t) { return SparseSign(t, kOmega, t.k, t.d_in); }
SparseSign SparseSign::psi(const SketchTests& t) { return SparseSign(t, kPsi, t.k, t.d_out); }
SparseSign SparseSign::phi(const SketchTests& t) { return SparseSign(t, kPhi, t.s, t.d_out); }
SparseSign SparseSign::xi(const SketchTests& t) { return SparseSign(t, kXi, t.s, t.d_in); }

void SparseSign::apply_rows(const float* X, int r, float* out) const {
  for (int q = 0; q < r; ++q) {
    const float* x = X + static_cast<size_t>(q) * cols;
    float* o = out + static_cast<size_t>(q) * rows;
    for (int j = 0; j < cols; ++j) {
      const float v = x[j];
      const int* rj = row.data() + static_cast<size_t>(j) * zeta;
      const float* gj = sign.data() + static_cast<size_t>(j) * zeta;
      for (int z = 0; z < zeta; ++z) o[rj[z]] += gj[z] * v;
    }
  }
}

void SparseSign::apply_cols(const float* X, int r, float* out) const {
  for (int i = 0; i < cols; ++i) {
    const float* x = X + static_cast<size_t>(i) * r;
    for (int z = 0; z < zeta; ++z) {
      const size_t zi = static_cast<size_t>(i) * zeta + z;
      float* o = out + static_cast<size_t>(row[zi]) * r;
      const float g = sign[zi];
      for (int q = 0; q < r; ++q) o[q] += g * x[q];
    }
  }
}

// Per client c (weight w): Y^T += w (G_Omega A^T) B^T; W^T += w A^T (G_Psi B)^T;
// Z += w (G_Phi B)(G_Xi A^T)^T. Column-major views: B[c] (row-major m x r) is Bt (r x m, ld r);
// A[c] (row-major r x n) is At (n x r, ld n).
void sketch_update_one(const SketchTests& t, SketchState& st, const FactorSet& f) {
  check_sketch_tests(t);
  if (f.d_out != t.d_out || f.d_in != t.d_in)
    throw std::invalid_argument("sketch: factor shapes differ from the sketch's");
  const int m = t.d_out, n = t.d_in, k = t.k, s = t.s;
  const SparseSign omega = SparseSign::omega(t), psi = SparseSign::psi(t), phi = SparseSign::phi(t),
                   xi = SparseSign::xi(t);
  int rmax = 0;
  for (int c = 0; c < f.num_clients; ++c) rmax = std::max(rmax, f.ranks[c]);
  std::vector<float> AO(static_cast<size_t>(k) * rmax), PBt(static_cast<size_t>(k) * rmax),
      FBt(static_cast<size_t>(s) * rmax), XA(static_cast<size_t>(s) * rmax);
  for (int c = 0; c < f.num_clients; ++c) {
    const int r = f.ranks[c];
    const float w = f.weights[c];
    if (w == 0.0f) continue;
    const float* Bt = f.B[c];
    const float* At = f.A[c];
    std::fill(AO.begin(), AO.begin() + static_cast<size_t>(k) * r, 0.0f);
    std::fill(PBt.begin(), PBt.begin() + static_cast<size_t>(k) * r, 0.0f);
    std::fill(FBt.begin(), FBt.begin() + static_cast<size_t>(s) * r, 0.0f);
    std::fill(XA.begin(), XA.begin() + static_cast<size_t>(s) * r, 0.0f);
    omega.apply_rows(At, r, AO.data());   // AO = G_Omega A^T = (A Omega)^T, (k x r) col-major
    xi.apply_rows(At, r, XA.data());      // XA = G_Xi A^T = (A Xi^T)^T,     (s x r) col-major
    psi.apply_cols(Bt, r, PBt.data());    // Psi B row-major = PBt (r x k) col-major, ld r
    phi.apply_cols(Bt, r, FBt.data());    // Phi B row-major = FBt (r x s) col-major, ld r
    gemm(false, false, k, m, r, w, AO.data(), k, Bt, r, 1.0f, st.Y, k);
    gemm(false, false, n, k, r, w, At, n, PBt.data(), r, 1.0f, st.W, n);
    gemm(true, true, s, s, r, w, FBt.data(), r, XA.data(), s, 1.0f, st.Z, s);
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
  Mat PhiQ(s, k), XiP(s, k), R1, R2;
  SparseSign::phi(t).apply_rows(Q.p(), k, PhiQ.p());  // Q col-major (m x k) = Q^T row-major
  SparseSign::xi(t).apply_rows(P.p(), k, XiP.p());
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
