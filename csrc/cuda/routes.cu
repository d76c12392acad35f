// The three routes of DESIGN.md on the GPU, column-major throughout (cuBLAS/cuSOLVER),
// each queued on one task context's stream. Mirrors csrc/routes.cpp step for step.
#include <algorithm>

#include "routes.h"

namespace flexlora::cuda::detail {

Factored concat_factors(const Ctx& c, const FactorSet& f) {
  Factored F;
  F.m = f.d_out;
  F.n = f.d_in;
  F.R = static_cast<int>(f.total_rank());
  F.Bc = Buffer(size_t(F.m) * F.R, c.s());
  F.At = Buffer(size_t(F.n) * F.R, c.s());
  int off = 0;
  for (int k = 0; k < f.num_clients; ++k) {
    const int r = f.ranks[k];
    // B[k] row-major (m x r) is column-major B^T (r x m, ld r): transpose it into Bc.
    scaled_copy(c, true, F.m, r, 1.0f, f.B[k], r, F.Bc.f() + size_t(off) * F.m, F.m);
    // A[k] row-major (r x n) is column-major A^T (n x r, ld n): weighted copy into At.
    scaled_copy(c, false, F.n, r, f.weights[k], f.A[k], F.n, F.At.f() + size_t(off) * F.n, F.n);
    off += r;
  }
  return F;
}

void form_dense(const Ctx& c, const Factored& F, float beta, float* W) {
  // W = M^T (n x m col-major) = At Bc^T.
  gemm(c, false, true, F.n, F.m, F.R, 1.0f, F.At.f(), F.n, F.Bc.f(), F.m, beta, W, F.n);
}

namespace {

void zero_output(const Ctx& c, SvdOutput& out, int m, int n, int rank) {
  FLEXLORA_CUDA_CHECK(cudaMemsetAsync(out.U, 0, sizeof(float) * size_t(m) * rank, c.s()));
  FLEXLORA_CUDA_CHECK(cudaMemsetAsync(out.S, 0, sizeof(float) * rank, c.s()));
  FLEXLORA_CUDA_CHECK(cudaMemsetAsync(out.Vt, 0, sizeof(float) * size_t(n) * rank, c.s()));
}

// Y = M X and Y = M^T X through the factors; T is an (R x l) scratch.
struct FactoredOp {
  const Factored& F;
  int rows() const { return F.m; }
  int cols() const { return F.n; }
  void apply(const Ctx& c, const float* X, int l, float* T, float* Y) const {  // X n x l
    gemm(c, true, false, F.R, l, F.n, 1.0f, F.At.f(), F.n, X, F.n, 0.0f, T, F.R);
    gemm(c, false, false, F.m, l, F.R, 1.0f, F.Bc.f(), F.m, T, F.R, 0.0f, Y, F.m);
  }
  void apply_t(const Ctx& c, const float* X, int l, float* T, float* Y) const {  // X m x l
    gemm(c, true, false, F.R, l, F.m, 1.0f, F.Bc.f(), F.m, X, F.m, 0.0f, T, F.R);
    gemm(c, false, false, F.n, l, F.R, 1.0f, F.At.f(), F.n, T, F.R, 0.0f, Y, F.n);
  }
  size_t scratch(int l) const { return size_t(F.R) * l; }
};

struct DenseOp {  // W = M^T column-major (n x m, ld n), i.e. M row-major
  const float* W;
  int m, n;
  int rows() const { return m; }
  int cols() const { return n; }
  void apply(const Ctx& c, const float* X, int l, float*, float* Y) const {
    gemm(c, true, false, m, l, n, 1.0f, W, n, X, n, 0.0f, Y, m);
  }
  void apply_t(const Ctx& c, const float* X, int l, float*, float* Y) const {
    gemm(c, false, false, n, l, m, 1.0f, W, n, X, m, 0.0f, Y, n);
  }
  size_t scratch(int) const { return 0; }
};

// Halko-Martinsson-Tropp range finder with power iterations and a QR after every product;
// the final (n x l) H = M^T Q is factored as H = Qh Rh and only the small Rh goes through
// the Jacobi SVD: M ~ Q H^T = (Q Vr) S (Qh Ur)^T with Rh = Ur S Vr^T.
template <class Op>
void randomized(const Ctx& c, const Op& op, float scale, const SvdOptions& opt,
                SvdOutput& out) {
  const int m = op.rows(), n = op.cols(), rank = opt.rank;
  zero_output(c, out, m, n, rank);
  const int l = std::min({rank + std::max(0, opt.oversample), m, n});
  if (l <= 0) return;
  Buffer Omega(size_t(n) * l, c.s()), Q(size_t(m) * l, c.s()), Z(size_t(n) * l, c.s());
  Buffer T(std::max<size_t>(op.scratch(l), 1), c.s());
  gaussian_fill(Omega.f(), size_t(n) * l, opt.seed, c.s());
  op.apply(c, Omega.f(), l, T.f(), Q.f());
  thin_qr(c, Q.f(), m, l, nullptr);
  for (int it = 0; it < opt.power_iters; ++it) {
    op.apply_t(c, Q.f(), l, T.f(), Z.f());
    thin_qr(c, Z.f(), n, l, nullptr);
    op.apply(c, Z.f(), l, T.f(), Q.f());
    thin_qr(c, Q.f(), m, l, nullptr);
  }
  op.apply_t(c, Q.f(), l, T.f(), Z.f());  // Z = H = M^T Q (n x l)
  Buffer Rh(size_t(l) * l, c.s()), Ur(size_t(l) * l, c.s()), Vr(size_t(l) * l, c.s()),
      S(l, c.s());
  thin_qr(c, Z.f(), n, l, Rh.f());        // Z = Qh
  thin_svd(c, Rh.f(), l, l, Ur.f(), S.f(), Vr.f());
  const int r_eff = std::min(rank, l);
  // U row-major (m x rank) is column-major U^T (rank x m, ld rank): (Q Vr)^T = Vr^T Q^T.
  gemm(c, true, true, r_eff, m, l, 1.0f, Vr.f(), l, Q.f(), m, 0.0f, out.U, rank);
  // Vt row-major (rank x n) is column-major V (n x rank, ld n): Qh Ur.
  gemm(c, false, false, n, r_eff, l, 1.0f, Z.f(), n, Ur.f(), l, 0.0f, out.Vt, n);
  scale_vector(S.f(), out.S, r_eff, scale, c.s());
}

}  // namespace

void exact_factored(const Ctx& c, Factored& F, const SvdOptions& opt, SvdOutput& out) {
  const int m = F.m, n = F.n, R = F.R, rank = opt.rank;
  zero_output(c, out, m, n, rank);
  const int kb = std::min(m, R), ka = std::min(n, R);
  Buffer Rb(size_t(kb) * R, c.s()), Ra(size_t(ka) * R, c.s());
  thin_qr(c, F.Bc.f(), m, R, Rb.f());  // Bc = Qb Rb, Qb (m x kb) in place
  thin_qr(c, F.At.f(), n, R, Ra.f());  // At = Qa Ra, Qa (n x ka) in place
  Buffer C(size_t(kb) * ka, c.s());    // M = Qb (Rb Ra^T) Qa^T
  gemm(c, false, true, kb, ka, R, 1.0f, Rb.f(), kb, Ra.f(), ka, 0.0f, C.f(), kb);
  const int k = std::min(kb, ka);
  Buffer Uc(size_t(kb) * k, c.s()), Vc(size_t(ka) * k, c.s()), S(k, c.s());
  thin_svd(c, C.f(), kb, ka, Uc.f(), S.f(), Vc.f());
  const int r_eff = std::min(rank, k);
  gemm(c, true, true, r_eff, m, kb, 1.0f, Uc.f(), kb, F.Bc.f(), m, 0.0f, out.U, rank);
  gemm(c, false, false, n, r_eff, ka, 1.0f, F.At.f(), n, Vc.f(), ka, 0.0f, out.Vt, n);
  scale_vector(S.f(), out.S, r_eff, 1.0f, c.s());
}

void randomized_factored(const Ctx& c, const Factored& F, const SvdOptions& opt,
                         SvdOutput& out) {
  randomized(c, FactoredOp{F}, 1.0f, opt, out);
}

void randomized_dense(const Ctx& c, const float* W, int m, int n, float scale,
                      const SvdOptions& opt, SvdOutput& out) {
  randomized(c, DenseOp{W, m, n}, scale, opt, out);
}

void exact_dense(const Ctx& c, const float* W, int m, int n, float scale, const SvdOptions& opt,
                 SvdOutput& out) {
  const int rank = opt.rank;
  zero_output(c, out, m, n, rank);
  const int k = std::min(m, n);
  Buffer a(size_t(n) * m, c.s());  // M^T, destroyed by the SVD
  FLEXLORA_CUDA_CHECK(cudaMemcpyAsync(a.f(), W, sizeof(float) * size_t(n) * m,
                                      cudaMemcpyDeviceToDevice, c.s()));
  Buffer Uw(size_t(n) * k, c.s()), Vw(size_t(m) * k, c.s()), S(k, c.s());
  thin_svd(c, a.f(), n, m, Uw.f(), S.f(), Vw.f());  // M^T = Uw S Vw^T: U_M = Vw, V_M = Uw
  const int r_eff = std::min(rank, k);
  scaled_copy(c, true, r_eff, m, 1.0f, Vw.f(), m, out.U, rank);
  FLEXLORA_CUDA_CHECK(cudaMemcpyAsync(out.Vt, Uw.f(), sizeof(float) * size_t(n) * r_eff,
                                      cudaMemcpyDeviceToDevice, c.s()));
  scale_vector(S.f(), out.S, r_eff, scale, c.s());
}

}  // namespace flexlora::cuda::detail
