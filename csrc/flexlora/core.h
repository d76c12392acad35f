// FlexLoRA native aggregation core: public entry points and their params structs.
//
// No Python, pybind11 or torch header may be included here or anywhere in csrc/; the
// bindings/ layer validates and converts Python objects into these structs. The CUDA
// backend (csrc/cuda/, built with -DFLEXLORA_CUDA=ON) takes the same structs.
//
// Layout: every matrix crossing this interface is float32, row-major (C-contiguous), dense,
// with the leading dimension equal to its number of columns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace flexlora {

enum class Method : int { Auto = 0, Exact = 1, Randomized = 2, Dense = 3 };

// Parses "auto" | "exact" | "randomized" | "dense"; throws std::invalid_argument otherwise.
Method parse_method(const std::string& name);
const char* method_name(Method m);

// One module's client factors: dW = sum_k weights[k] * B[k] @ A[k].
struct FactorSet {
  int d_out = 0;                       // rows of every B[k] and of dW
  int d_in = 0;                        // columns of every A[k] and of dW
  int num_clients = 0;                 // K >= 1
  const float* const* B = nullptr;     // K pointers; B[k] is (d_out x ranks[k]) row-major
  const float* const* A = nullptr;     // K pointers; A[k] is (ranks[k] x d_in) row-major
  const int* ranks = nullptr;          // K ranks, each >= 1
  const float* weights = nullptr;      // K finite weights >= 0 (p_k * s_k folded in)
  int64_t total_rank() const;
};

// Options of one truncated SVD.
struct SvdOptions {
  Method method = Method::Auto;
  int rank = 1;                        // requested rank >= 1; output padded with zeros above
                                       // the operator's rank (min(d_out, d_in, R))
  int oversample = 10;                 // randomized: extra test vectors, l = rank + oversample
  int power_iters = 2;                 // randomized: power iterations, QR between them
  uint64_t seed = 0;                   // randomized: Gaussian test matrix seed
  bool dense_exact = false;            // dense route: full SVD (gesdd) instead of randomized
};

// Caller-allocated outputs of one truncated SVD (rank = SvdOptions::rank).
struct SvdOutput {
  float* U = nullptr;                  // (d_out x rank) row-major, orthonormal columns
  float* S = nullptr;                  // (rank) descending, >= 0
  float* Vt = nullptr;                 // (rank x d_in) row-major, orthonormal rows
  Method route = Method::Auto;         // set to the route actually taken
};

// method="auto" on a randomized route treats power_iters as a minimum and keeps iterating
// until one iteration lowers the residual energy ||M||_F^2 - sum_{i<rank} sigma_i^2 of the
// current subspace by at most kAutoEnergyTol of itself, or until
// max(power_iters, kAutoMaxPowerIters) iterations, with at least rank / kAutoOversampleDiv
// extra test vectors (auto_oversample; rationale in csrc/routes.cpp). The planner prices
// auto's randomized routes at power_iters + kAutoPlanExtraIters iterations. Explicit
// "randomized" / "dense" run exactly power_iters iterations at exactly `oversample`.
constexpr double kAutoEnergyTol = 5e-2;
constexpr int kAutoMaxPowerIters = 10;
constexpr int kAutoPlanExtraIters = 1;
constexpr int kAutoOversampleDiv = 5;
inline int auto_oversample(int rank, int oversample) {
  return std::max(oversample, (rank + kAutoOversampleDiv - 1) / kAutoOversampleDiv);
}
// Width l of the randomized routes' block for a (m x n) operator: rank + oversample (auto:
// auto_oversample), at most min(m, n).
inline int block_width(int rank, int oversample, int m, int n, bool adaptive) {
  const int p = adaptive ? auto_oversample(rank, std::max(0, oversample)) : std::max(0, oversample);
  return std::min({rank + p, m, n});
}
// auto's stopping rule needs ||M||_F^2. On the factored operator the exact value,
// <Bc^T Bc, At^T At>, costs R^2 (d_out + d_in), one pass of width l costs 2 l R (d_out + d_in):
// above R = 2 l it is estimated from the first pass instead (routes.cpp).
inline bool factored_norm_exact(double total_rank, double l) { return total_rank <= 2.0 * l; }

// Cost model (floating-point operations, weighted by how efficiently each kind of kernel
// runs: GEMM x1, float64 BLAS-3 and QR x2, SVD and tridiagonal reduction x4) behind the
// auto planner. The exact route is priced as its Gram form when R <= min(d_out, d_in) (the
// Householder fallback for ill-conditioned factors is not predictable from shapes).
struct RoutePlan {
  Method method = Method::Exact;       // route auto takes
  double cost_exact = 0, cost_randomized = 0, cost_dense = 0;
  double flops_exact = 0, flops_randomized = 0, flops_dense = 0;   // raw FLOP counts
  double flops_exact_f64 = 0;          // part of flops_exact done in float64 (Gram route)
  std::string reason;
};
// Exact is preferred unless an approximate route is more than this factor cheaper.
constexpr double kExactPreference = 2.0;
RoutePlan plan_route(int d_out, int d_in, int64_t total_rank, const SvdOptions& opt);

// One module. Throws std::invalid_argument on inconsistent params, std::runtime_error on a
// LAPACK failure.
void lowrank_svd(const FactorSet& f, const SvdOptions& opt, SvdOutput& out, int threads);

// Dense input M (d_out x d_in row-major). opt.method must be Exact (full SVD) or
// Randomized.
void dense_svd(const float* M, int d_out, int d_in, const SvdOptions& opt, SvdOutput& out,
               int threads);

// One task of the batched entry point: either factors or a dense matrix.
struct BatchTask {
  FactorSet factors;                   // used when dense == nullptr
  const float* dense = nullptr;        // optional (factors.d_out x factors.d_in) row-major
  float dense_scale = 1.0f;            // dense input is multiplied by this
  SvdOptions opt;
  SvdOutput out;
};
// Runs the tasks in parallel over modules (OpenMP, BLAS single-threaded inside) when there
// are several and threads > 1; large single tasks use BLAS threads instead.
void lowrank_svd_batched(std::vector<BatchTask>& tasks, int threads);

// out (d_out x d_in row-major) = beta * out + sum_k weights[k] B[k] A[k]: one GEMM over the
// concatenated factors (beta = 0 overwrites; beta = 1 accumulates in place).
void weighted_sum(const FactorSet& f, float* out, float beta, int threads);

// ---------------------------------------------------------------- streaming sketch
// One-pass sketch of dW (Tropp, Yurtsever, Udell, Cevher, "Practical sketching algorithms
// for low-rank matrix approximation", SIMAX 2017, and "Streaming low-rank matrix
// approximation with an application to scientific simulation", SISC 2019): range sketch
// Y = dW Omega, co-range sketch W = Psi dW, core sketch Z = Phi dW Xi^T, each updated from
// one client's factors as it arrives (never forming dW); memory k (d_out + d_in) + s^2
// floats per module, flat in the number of clients.
//
// The four test matrices are sparse sign maps (SISC 2019, sec. 3.3): column j of an
// (l x d) map has zeta = min(l, kSketchZeta) nonzeros, +1 or -1, in distinct rows, drawn by a
// counter-based generator from (seed, map, shape, j). They are regenerated where they are
// applied and never stored, so a sketch's memory is its state only, and applying one costs
// zeta flops per entry of the other operand instead of l.
constexpr int kSketchZeta = 8;
struct SketchTests {
  int d_out = 0, d_in = 0;
  int k = 0;                           // range and co-range sketch size (k <= min(d_out, d_in))
  int s = 0;                           // core sketch size (k <= s)
  uint64_t seed = 0;                   // the maps: Omega^T (k x d_in), Psi (k x d_out),
                                       // Phi (s x d_out), Xi (s x d_in)
};

// The sketch state of one module (caller-owned buffers, zeroed before the first update).
struct SketchState {
  float* Y = nullptr;                  // (k x d_out) column-major: (dW Omega)^T
  float* W = nullptr;                  // (d_in x k) column-major: (Psi dW)^T
  float* Z = nullptr;                  // (s x s) column-major: Phi dW Xi^T
};

// Adds sum_k weights[k] B[k] A[k] (factors.d_out/d_in must match tests) to state.
struct SketchUpdate {
  SketchTests tests;
  SketchState state;
  FactorSet factors;
};
// Many modules' updates in one call, modules in parallel (as lowrank_svd_batched).
void sketch_update_batched(std::vector<SketchUpdate>& tasks, int threads);

// Rank-opt.rank approximation from the sketch: Q = orth(Y), P = orth(W^T),
// C = (Phi Q)^+ Z ((Xi P)^+)^T, SVD of C; out as for lowrank_svd (rank <= k; positions
// above k are zero). scale multiplies dW (the aggregator's 1 / total weight).
struct SketchFinalize {
  SketchTests tests;
  const float* Y = nullptr;            // as SketchState, read-only
  const float* W = nullptr;
  const float* Z = nullptr;
  float scale = 1.0f;
  int rank = 1;
  SvdOutput out;
};
void sketch_finalize_batched(std::vector<SketchFinalize>& tasks, int threads);

// Thread control. threads <= 0 means the default (set_num_threads or the core count).
void set_num_threads(int n);
int get_num_threads();
int hardware_threads();
int resolve_threads(int requested);
std::string blas_config();

}  // namespace flexlora
