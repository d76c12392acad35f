// Entry points: validation of params structs, route planning, threading, batching.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <numeric>
#include <sstream>
#include <stdexcept>

#include "blas.h"
#include "flexlora/core.h"
#include "routes.h"
#include "sketch.h"

namespace flexlora {

using namespace detail;

Method parse_method(const std::string& name) {
  if (name == "auto") return Method::Auto;
  if (name == "exact") return Method::Exact;
  if (name == "randomized") return Method::Randomized;
  if (name == "dense") return Method::Dense;
  throw std::invalid_argument("method must be one of 'auto', 'exact', 'randomized', 'dense', got '" +
                              name + "'");
}

const char* method_name(Method m) {
  switch (m) {
    case Method::Auto: return "auto";
    case Method::Exact: return "exact";
    case Method::Randomized: return "randomized";
    case Method::Dense: return "dense";
  }
  return "?";
}

int64_t FactorSet::total_rank() const {
  int64_t R = 0;
  for (int k = 0; k < num_clients; ++k) R += ranks[k];
  return R;
}

// ---------------------------------------------------------------- cost model
namespace {
constexpr double kQrWeight = 2.0, kSvdWeight = 4.0;  // relative to GEMM efficiency
constexpr double kFactoredPassWeight = 1.0;

double qr_flops(double m, double n) {  // sgeqrf + sorgqr of the thin Q
  const double k = std::min(m, n), big = std::max(m, n);
  return 2.0 * big * k * k - 2.0 * k * k * k / 3.0 + 2.0 * m * k * k - 2.0 * k * k * k / 3.0;
}
double svd_flops(double m, double n) {  // sgesdd, thin vectors
  const double big = std::max(m, n), small = std::min(m, n);
  return 4.0 * big * small * small + 8.0 * small * small * small;
}
}  // namespace

RoutePlan plan_route(int d_out, int d_in, int64_t total_rank, const SvdOptions& opt) {
  const double m = d_out, n = d_in, R = static_cast<double>(total_rank), r = opt.rank;
  const bool adaptive = opt.method == Method::Auto;
  const double l = block_width(opt.rank, opt.oversample, d_out, d_in, adaptive);
  // auto iterates adaptively: price it at the typical count, not the minimum
  const double q = std::max(0, opt.power_iters) + (adaptive ? kAutoPlanExtraIters : 0);
  RoutePlan p;
  const double kb = std::min(m, R), ka = std::min(n, R);
  if (R <= std::min(m, n)) {
    // Gram route (routes.cpp exact_gram), taken when both factors are well conditioned:
    // float64 Grams (m + n) R^2 (dsyrk), two scaled Cholesky R^3/3 each, K = Rb Ga Rb^T
    // (2 dtrmm, R^3 each), dsytrd 4/3 R^3 + dormtr 2 R^2 k, trsm + trmm 2 R^2 k, then two
    // float32 GEMMs 2 (m + n) R k. Double BLAS-3 runs at about half the sgemm rate (weight
    // 2), the tridiagonal reduction is half BLAS-2 (weight 4).
    const double k = std::min(r, R);
    const double f64_blas3 = (m + n) * R * R + 2.0 / 3.0 * R * R * R + 2 * R * R * R + 4 * R * R * k;
    const double f64_eig = 4.0 / 3.0 * R * R * R;
    const double f32 = 2 * (m + n) * R * k;
    p.flops_exact_f64 = f64_blas3 + f64_eig;
    p.flops_exact = f32 + p.flops_exact_f64;
    p.cost_exact = f32 + 2 * f64_blas3 + kSvdWeight * f64_eig;
  } else {  // Householder route
    const double ex_gemm = 2 * kb * ka * R + 2 * m * kb * r + 2 * n * ka * r;
    const double ex_qr = qr_flops(m, R) + qr_flops(n, R), ex_svd = svd_flops(kb, ka);
    p.flops_exact = ex_gemm + ex_qr + ex_svd;
    p.cost_exact = ex_gemm + kQrWeight * ex_qr + kSvdWeight * ex_svd;
  }

  // Randomized routes: 2q+2 operator passes of width l; CholQR2 after each of the 2q+1
  // products but the last (2 syrk + 2 trsm, BLAS-3 speed: 4 d l^2); the final SVD of the
  // (n x l) projection; auto adds a Gram eigenvalue problem per iteration (~4 l^3 x SVD).
  const double orth = (q + 1) * 4 * m * l * l + q * 4 * n * l * l;
  const double rq_svd = svd_flops(n, l) + (adaptive ? q * 4 * l * l * l : 0.0);
  const double rq_tail = 2 * m * l * r;
  // Passes through the factors run as two thin GEMMs (inner size R) at about GEMM speed
  // (kFactoredPassWeight = 1) but cost 2 l R (m + n) each against 2 l m n for a pass over
  // dW, so above R ~ mn/(m+n) forming dW once wins. auto's factored route also needs
  // ||M||_F^2 for its stopping rule: exactly as <Bc^T Bc, At^T At> (two R x R syrk, priced
  // here) while that costs at most one pass, else estimated from the first pass for free
  // (routes.cpp randomized_factored).
  const double rf_pass = (2 * q + 2) * 2 * l * R * (m + n);
  const double rf_norm = adaptive && factored_norm_exact(R, l) ? R * R * (m + n) : 0.0;
  p.flops_randomized = rf_pass + rf_norm + orth + rq_svd + rq_tail;
  p.cost_randomized = kFactoredPassWeight * rf_pass + rf_norm + orth + kSvdWeight * rq_svd +
                      rq_tail;

  const double form = 2 * m * n * R;
  if (opt.dense_exact) {
    p.flops_dense = form + svd_flops(m, n);
    p.cost_dense = form + kSvdWeight * svd_flops(m, n);
  } else {
    const double dn_pass = (2 * q + 2) * 2 * m * n * l;
    p.flops_dense = form + dn_pass + orth + rq_svd + rq_tail;
    p.cost_dense = form + dn_pass + orth + kSvdWeight * rq_svd + rq_tail;
  }
  const double best_approx = std::min(p.cost_randomized, p.cost_dense);
  std::ostringstream why;
  if (p.cost_exact <= kExactPreference * best_approx) {
    p.method = Method::Exact;
    why << "exact costs " << p.cost_exact / best_approx
        << "x the cheapest approximate route (<= " << kExactPreference << "x): exact wins";
  } else if (p.cost_randomized <= p.cost_dense) {
    p.method = Method::Randomized;
    why << "randomized on the factors is " << p.cost_dense / p.cost_randomized
        << "x cheaper than dense and " << p.cost_exact / p.cost_randomized
        << "x cheaper than exact";
  } else {
    p.method = Method::Dense;
    why << "dense is " << p.cost_randomized / p.cost_dense
        << "x cheaper than randomized on the factors and " << p.cost_exact / p.cost_dense
        << "x cheaper than exact";
  }
  p.reason = why.str();
  return p;
}

// ---------------------------------------------------------------- threads
namespace {
std::atomic<int> g_threads{0};
std::mutex g_compute;  // BLAS thread settings are process-global: one computation at a time

void check_options(const SvdOptions& opt) {
  if (opt.rank < 1) throw std::invalid_argument("rank must be >= 1");
  if (opt.oversample < 0) throw std::invalid_argument("oversample must be >= 0");
  if (opt.power_iters < 0) throw std::invalid_argument("power_iters must be >= 0");
}

void check_factors(const FactorSet& f) {
  if (f.d_out < 1 || f.d_in < 1) throw std::invalid_argument("d_out and d_in must be >= 1");
  if (f.num_clients < 1) throw std::invalid_argument("at least one client is needed");
  for (int k = 0; k < f.num_clients; ++k) {
    if (f.ranks[k] < 1) throw std::invalid_argument("ranks must be >= 1");
    if (!(f.weights[k] >= 0.0f)) throw std::invalid_argument("weights must be >= 0");
  }
  if (f.total_rank() > (int64_t{1} << 30)) throw std::invalid_argument("total rank too large");
}

void run_task(BatchTask& t) {
  check_options(t.opt);
  if (t.dense) {
    const int m = t.factors.d_out, n = t.factors.d_in;
    // A row-major (m x n) matrix is its transpose in column-major order: W = M^T.
    if (t.opt.method == Method::Exact || t.opt.dense_exact) {
      exact_dense(t.dense, m, n, t.dense_scale, t.opt, t.out);
      t.out.route = Method::Exact;
    } else {
      // a dense task under auto (the aggregator's folded accumulators) iterates adaptively
      randomized_dense(t.dense, m, n, t.dense_scale, t.opt, t.out,
                       t.opt.method == Method::Auto);
      t.out.route = Method::Dense;
    }
    return;
  }
  check_factors(t.factors);
  Method route = t.opt.method;
  const bool adaptive = route == Method::Auto;
  if (route == Method::Auto)
    route = plan_route(t.factors.d_out, t.factors.d_in, t.factors.total_rank(), t.opt).method;
  Factored F = concat_factors(t.factors);
  switch (route) {
    case Method::Exact: exact_factored(F, t.opt, t.out); break;
    case Method::Randomized: randomized_factored(F, t.opt, t.out, adaptive); break;
    default: {
      Mat W = form_dense(F);
      F = Factored{};  // release the factors before the SVD
      if (t.opt.dense_exact) exact_dense(W.p(), W.cols, W.rows, 1.0f, t.opt, t.out);
      else randomized_dense(W.p(), W.cols, W.rows, 1.0f, t.opt, t.out, adaptive);
      route = Method::Dense;
    }
  }
  t.out.route = route;
}

double task_cost(const BatchTask& t) {
  const auto& f = t.factors;
  const int64_t R = t.dense ? std::min(f.d_out, f.d_in) : f.total_rank();
  const RoutePlan p = plan_route(f.d_out, f.d_in, R, t.opt);
  return std::min({p.cost_exact, p.cost_randomized, p.cost_dense});
}
}  // namespace

int hardware_threads() { return std::max(1, omp_get_num_procs()); }
void set_num_threads(int n) { g_threads = n <= 0 ? 0 : n; }
int get_num_threads() { return resolve_threads(0); }
int resolve_threads(int requested) {
  int t = requested > 0 ? requested : g_threads.load();
  if (t <= 0) t = hardware_threads();
  return std::min(t, hardware_threads());
}

std::string blas_config() {
  std::ostringstream s;
  s << "scipy-openblas32 (BLAS threads now " << blas_get_threads() << "), OpenMP "
    << _OPENMP << ", hardware threads " << hardware_threads();
  return s.str();
}

namespace {
// Runs fn(i) for i in [0, n): serially with T BLAS threads when there is one task or one
// thread, else in parallel over tasks (largest cost first, dynamic scheduling: modules
// differ in size by orders of magnitude) with BLAS single-threaded. Rethrows the first error.
template <class Fn, class Cost>
void run_tasks(int n, int threads, Cost cost_of, Fn fn) {
  const int T = resolve_threads(threads);
  std::lock_guard<std::mutex> lock(g_compute);
  if (n <= 1 || T <= 1) {
    blas_set_threads(T);
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<double> cost(n);
  for (int i = 0; i < n; ++i) cost[i] = cost_of(i);
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return cost[a] > cost[b]; });
  blas_set_threads(1);  // OpenMP threads x BLAS threads <= T
  std::exception_ptr error;
  std::mutex error_lock;
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::min(T, n))
  for (int i = 0; i < n; ++i) {
    try {
      fn(order[i]);
    } catch (...) {
      std::lock_guard<std::mutex> g(error_lock);
      if (!error) error = std::current_exception();
    }
  }
  blas_set_threads(T);
  if (error) std::rethrow_exception(error);
}
}  // namespace

void lowrank_svd_batched(std::vector<BatchTask>& tasks, int threads) {
  run_tasks(static_cast<int>(tasks.size()), threads,
            [&](int i) { return task_cost(tasks[i]); }, [&](int i) { run_task(tasks[i]); });
}

void sketch_update_batched(std::vector<SketchUpdate>& tasks, int threads) {
  for (auto& t : tasks) check_factors(t.factors);
  run_tasks(
      static_cast<int>(tasks.size()), threads,
      [&](int i) {
        const auto& t = tasks[i];
        // two GEMMs of width k over (d_out + d_in), the core GEMM, the sparse maps
        return static_cast<double>(t.factors.total_rank()) *
               ((t.tests.d_out + t.tests.d_in) * (t.tests.k + 4.0 * kSketchZeta) +
                double(t.tests.s) * t.tests.s);
      },
      [&](int i) { sketch_update_one(tasks[i].tests, tasks[i].state, tasks[i].factors); });
}

void sketch_finalize_batched(std::vector<SketchFinalize>& tasks, int threads) {
  run_tasks(
      static_cast<int>(tasks.size()), threads,
      [&](int i) {
        const auto& t = tasks[i].tests;
        return static_cast<double>(t.k) * t.k * (t.d_out + t.d_in + t.s) +
               double(t.s) * t.s * t.k;
      },
      [&](int i) {
        if (tasks[i].rank < 1) throw std::invalid_argument("rank must be >= 1");
        sketch_finalize_one(tasks[i], tasks[i].out);
      });
}

void lowrank_svd(const FactorSet& f, const SvdOptions& opt, SvdOutput& out, int threads) {
  std::vector<BatchTask> tasks(1);
  tasks[0].factors = f;
  tasks[0].opt = opt;
  tasks[0].out = out;
  lowrank_svd_batched(tasks, threads);
  out.route = tasks[0].out.route;
}

void dense_svd(const float* M, int d_out, int d_in, const SvdOptions& opt, SvdOutput& out,
               int threads) {
  std::vector<BatchTask> tasks(1);
  tasks[0].factors.d_out = d_out;
  tasks[0].factors.d_in = d_in;
  tasks[0].dense = M;
  tasks[0].opt = opt;
  tasks[0].out = out;
  lowrank_svd_batched(tasks, threads);
  out.route = tasks[0].out.route;
}

void weighted_sum(const FactorSet& f, float* out, float beta, int threads) {
  check_factors(f);
  const int T = resolve_threads(threads);
  std::lock_guard<std::mutex> lock(g_compute);
  blas_set_threads(T);
  const int m = f.d_out, n = f.d_in;
  if (f.num_clients == 1) {
    // out^T (n x m col-major) += w A^T B^T: A row-major is A^T col-major, B likewise.
    gemm(false, false, n, m, f.ranks[0], f.weights[0], f.A[0], n, f.B[0], f.ranks[0], beta,
         out, n);
    return;
  }
  Factored F = concat_factors(f);  // one GEMM over the concatenated factors
  gemm(false, false, n, m, F.R, 1.0f, F.At.p(), n, F.BcT.p(), F.R, beta, out, n);
}

}  // namespace flexlora
