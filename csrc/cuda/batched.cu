// Entry points of flexlora_cuda.h: validation, route choice, spreading modules over worker
// streams, and the one synchronisation that checks the solvers' status.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

#include "flexlora_cuda.h"
#include "routes.h"

namespace flexlora::cuda {

using namespace detail;

namespace {

std::string task_name(size_t i) { return "tasks[" + std::to_string(i) + "]"; }

void check_factors(const FactorSet& f, const std::string& who) {
  if (f.d_out < 1 || f.d_in < 1)
    throw std::invalid_argument(who + ": d_out and d_in must be >= 1, got " +
                                std::to_string(f.d_out) + " x " + std::to_string(f.d_in));
  if (f.num_clients < 1) throw std::invalid_argument(who + ": at least one client is needed");
  if (!f.B || !f.A || !f.ranks || !f.weights)
    throw std::invalid_argument(who + ": B, A, ranks and weights must not be null");
  for (int k = 0; k < f.num_clients; ++k) {
    const std::string idx = who + " client " + std::to_string(k);
    if (f.ranks[k] < 1) throw std::invalid_argument(idx + ": rank must be >= 1");
    if (!(f.weights[k] >= 0.0f) || !std::isfinite(f.weights[k]))
      throw std::invalid_argument(idx + ": weight must be finite and >= 0");
    if (!f.B[k] || !f.A[k]) throw std::invalid_argument(idx + ": null factor pointer");
  }
  if (f.total_rank() > (int64_t{1} << 30))
    throw std::invalid_argument(who + ": total rank too large");
}

void check_task(const BatchTask& t, const std::string& who) {
  if (t.opt.rank < 1) throw std::invalid_argument(who + ": rank must be >= 1");
  if (t.opt.oversample < 0) throw std::invalid_argument(who + ": oversample must be >= 0");
  if (t.opt.power_iters < 0) throw std::invalid_argument(who + ": power_iters must be >= 0");
  if (!t.out.U || !t.out.S || !t.out.Vt)
    throw std::invalid_argument(who + ": output pointers must not be null");
  if (t.dense) {
    if (t.factors.d_out < 1 || t.factors.d_in < 1)
      throw std::invalid_argument(who + ": dense input needs d_out, d_in >= 1");
  } else {
    check_factors(t.factors, who);
  }
}

Method choose_route(const BatchTask& t) {
  if (t.dense) return (t.opt.method == Method::Exact || t.opt.dense_exact) ? Method::Exact
                                                                          : Method::Dense;
  if (t.opt.method != Method::Auto) return t.opt.method;
  return plan_route(t.factors.d_out, t.factors.d_in, t.factors.total_rank(), t.opt).method;
}

double task_cost(const BatchTask& t) {
  const auto& f = t.factors;
  const int64_t R = t.dense ? std::min(f.d_out, f.d_in) : f.total_rank();
  const RoutePlan p = plan_route(f.d_out, f.d_in, R, t.opt);
  return std::min({p.cost_exact, p.cost_randomized, p.cost_dense});
}

void run_task(const Ctx& c, BatchTask& t, Method route) {
  const int m = t.factors.d_out, n = t.factors.d_in;
  if (t.dense) {
    if (route == Method::Exact) exact_dense(c, t.dense, m, n, t.dense_scale, t.opt, t.out);
    else randomized_dense(c, t.dense, m, n, t.dense_scale, t.opt, t.out);
    t.out.route = route;
    return;
  }
  Factored F = concat_factors(c, t.factors);
  switch (route) {
    case Method::Exact: exact_factored(c, F, t.opt, t.out); break;
    case Method::Randomized: randomized_factored(c, F, t.opt, t.out); break;
    default: {
      Buffer W(size_t(m) * n, c.s());
      form_dense(c, F, 0.0f, W.f());
      F = Factored{};  // release the factors (stream-ordered) before the SVD
      if (t.opt.dense_exact) exact_dense(c, W.f(), m, n, 1.0f, t.opt, t.out);
      else randomized_dense(c, W.f(), m, n, 1.0f, t.opt, t.out);
      route = Method::Dense;
    }
  }
  t.out.route = route;
}

const char* call_name(int code) {
  switch (code) {
    case 1: return "geqrf (QR)";
    case 2: return "orgqr (QR)";
    case 3: return "gesvdj (Jacobi SVD, did not converge)";
  }
  return "solver";
}

}  // namespace

void lowrank_svd_batched(std::vector<BatchTask>& tasks, const DeviceOptions& dev, void* stream) {
  if (dev.streams < 1) throw std::invalid_argument("streams must be >= 1");
  const size_t ntasks = tasks.size();
  if (ntasks == 0) return;
  std::vector<Method> routes(ntasks);
  std::vector<double> cost(ntasks);
  for (size_t i = 0; i < ntasks; ++i) {
    check_task(tasks[i], task_name(i));
    routes[i] = choose_route(tasks[i]);
    cost[i] = task_cost(tasks[i]);
  }
  auto main = static_cast<cudaStream_t>(stream);
  ResourceLock lock;
  const int nslots = static_cast<int>(std::min<size_t>(dev.streams, ntasks));
  std::vector<Slot>& pool = slots(nslots);

  Buffer status(2 * ntasks, main);
  FLEXLORA_CUDA_CHECK(cudaMemsetAsync(status.raw(), 0, sizeof(int) * 2 * ntasks, main));
  cudaEvent_t start;
  FLEXLORA_CUDA_CHECK(cudaEventCreateWithFlags(&start, cudaEventDisableTiming));
  std::vector<int> order(ntasks);
  std::iota(order.begin(), order.end(), 0);
  // Largest first onto the least loaded stream: modules differ in cost by orders of magnitude.
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return cost[a] > cost[b]; });
  std::vector<double> load(nslots, 0.0);
  std::string error;
  try {
    FLEXLORA_CUDA_CHECK(cudaEventRecord(start, main));
    for (int s = 0; s < nslots; ++s)
      FLEXLORA_CUDA_CHECK(cudaStreamWaitEvent(pool[s].stream, start, 0));
    for (int i : order) {
      const int s = int(std::min_element(load.begin(), load.end()) - load.begin());
      load[s] += cost[i];
      Ctx c{&pool[s], dev.tf32, status.i() + 2 * i};
      run_task(c, tasks[i], routes[i]);
    }
  } catch (const std::exception& e) {
    error = e.what();
  }
  // Join the worker streams back into the caller's stream whatever happened.
  for (int s = 0; s < nslots; ++s) {
    cudaEventRecord(pool[s].done, pool[s].stream);
    cudaStreamWaitEvent(main, pool[s].done, 0);
  }
  cudaEventDestroy(start);
  if (!error.empty()) throw std::runtime_error(error);
  std::vector<int> host(2 * ntasks);
  FLEXLORA_CUDA_CHECK(cudaMemcpyAsync(host.data(), status.raw(), sizeof(int) * 2 * ntasks,
                                      cudaMemcpyDeviceToHost, main));
  FLEXLORA_CUDA_CHECK(cudaStreamSynchronize(main));
  for (size_t i = 0; i < ntasks; ++i)
    if (host[2 * i] != 0)
      throw std::runtime_error(task_name(i) + ": cuSOLVER " + call_name(host[2 * i]) +
                               " returned info " + std::to_string(host[2 * i + 1]));
}

void weighted_sum(const FactorSet& f, float* out, float beta, const DeviceOptions& dev,
                  void* stream) {
  check_factors(f, "factors");
  if (!out) throw std::invalid_argument("out must not be null");
  ResourceLock lock;
  Slot slot = slots(1)[0];  // its handles, bound to the caller's stream for this call
  slot.stream = static_cast<cudaStream_t>(stream);
  FLEXLORA_CUBLAS_CHECK(cublasSetStream(slot.blas, slot.stream));
  Ctx c{&slot, dev.tf32, nullptr};
  try {
    const int m = f.d_out, n = f.d_in;
    if (f.num_clients == 1) {
      // out^T (n x m col-major) = beta out^T + w A^T B^T; A row-major is A^T col-major.
      gemm(c, false, false, n, m, f.ranks[0], f.weights[0], f.A[0], n, f.B[0], f.ranks[0], beta,
           out, n);
    } else {
      Factored F = concat_factors(c, f);
      form_dense(c, F, beta, out);
    }
  } catch (...) {
    cublasSetStream(slot.blas, slots(1)[0].stream);
    throw;
  }
  FLEXLORA_CUBLAS_CHECK(cublasSetStream(slot.blas, slots(1)[0].stream));
}

void accumulate(const std::vector<Accumulate>& items, const DeviceOptions& dev, void* stream) {
  for (size_t i = 0; i < items.size(); ++i) {
    check_factors(items[i].factors, "items[" + std::to_string(i) + "]");
    if (!items[i].out)
      throw std::invalid_argument("items[" + std::to_string(i) + "]: out must not be null");
  }
  for (const auto& it : items) weighted_sum(it.factors, it.out, 1.0f, dev, stream);
}

}  // namespace flexlora::cuda
