// pybind11 module server._cuda (built only with FLEXLORA_CUDA=ON): the CUDA backend on raw
// device pointers. server/cuda.py turns torch CUDA tensors, DLPack and
// __cuda_array_interface__ arrays into (pointer, shape) after checking dtype, layout and
// device; here we only convert, keep the interpreter safe, release the GIL and call csrc.
// No CUDA or torch header is needed: pointers and streams travel as Python ints.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "flexlora_cuda.h"

namespace py = pybind11;
using flexlora::BatchTask;
using flexlora::FactorSet;

namespace {

template <class T>
T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Host-side arrays behind one FactorSet.
struct Factors {
  std::vector<const float*> B, A;
  std::vector<int> ranks;
  std::vector<float> weights;
  FactorSet set;
  Factors(int d_out, int d_in, const std::vector<uintptr_t>& Bp, const std::vector<uintptr_t>& Ap,
          std::vector<int> r, std::vector<float> w, const std::string& who)
      : ranks(std::move(r)), weights(std::move(w)) {
    const size_t K = Bp.size();
    if (K == 0) throw py::value_error(who + ": Bs is empty: at least one client is needed");
    if (Ap.size() != K || ranks.size() != K || weights.size() != K)
      throw py::value_error(who + ": Bs, As, ranks and weights must have the same length, got " +
                            std::to_string(K) + ", " + std::to_string(Ap.size()) + ", " +
                            std::to_string(ranks.size()) + ", " + std::to_string(weights.size()));
    for (size_t k = 0; k < K; ++k) {
      B.push_back(as_ptr<const float>(Bp[k]));
      A.push_back(as_ptr<const float>(Ap[k]));
    }
    set.d_out = d_out;
    set.d_in = d_in;
    set.num_clients = static_cast<int>(K);
    set.B = B.data();
    set.A = A.data();
    set.ranks = ranks.data();
    set.weights = weights.data();
  }
};

flexlora::cuda::DeviceOptions device_options(bool tf32, int streams) {
  if (streams < 1) throw py::value_error("streams must be >= 1, got " + std::to_string(streams));
  flexlora::cuda::DeviceOptions d;
  d.tf32 = tf32;
  d.streams = streams;
  return d;
}

// tasks[i] is ("factors", d_out, d_in, B_ptrs, A_ptrs, ranks, weights, U, S, Vt) or
// ("dense", d_out, d_in, M_ptr, scale, U, S, Vt); outputs are caller-allocated device arrays.
py::list svd_batched(const py::list& tasks, const std::vector<int>& ranks,
                     const std::string& method, int oversample, int power_iters, uint64_t seed,
                     bool dense_exact, bool tf32, int streams, uintptr_t stream) {
  if (ranks.size() != py::len(tasks))
    throw py::value_error("ranks must have one entry per task");
  const auto dev = device_options(tf32, streams);
  std::vector<std::unique_ptr<Factors>> holders;
  std::vector<BatchTask> batch(py::len(tasks));
  for (size_t i = 0; i < batch.size(); ++i) {
    const std::string who = "tasks[" + std::to_string(i) + "]";
    auto item = py::reinterpret_borrow<py::tuple>(tasks[i]);
    BatchTask& t = batch[i];
    if (ranks[i] < 1) throw py::value_error(who + ": rank must be >= 1");
    t.opt.method = flexlora::parse_method(method);
    t.opt.rank = ranks[i];
    t.opt.oversample = oversample;
    t.opt.power_iters = power_iters;
    t.opt.seed = seed;
    t.opt.dense_exact = dense_exact;
    const auto kind = item[0].cast<std::string>();
    size_t o = 0;
    if (kind == "factors" && item.size() == 10) {
      holders.push_back(std::make_unique<Factors>(
          item[1].cast<int>(), item[2].cast<int>(), item[3].cast<std::vector<uintptr_t>>(),
          item[4].cast<std::vector<uintptr_t>>(), item[5].cast<std::vector<int>>(),
          item[6].cast<std::vector<float>>(), who));
      t.factors = holders.back()->set;
      o = 7;
    } else if (kind == "dense" && item.size() == 8) {
      t.factors.d_out = item[1].cast<int>();
      t.factors.d_in = item[2].cast<int>();
      t.dense = as_ptr<const float>(item[3].cast<uintptr_t>());
      t.dense_scale = item[4].cast<float>();
      o = 5;
    } else {
      throw py::value_error(who + " must be ('factors', d_out, d_in, Bs, As, ranks, weights, U, "
                                  "S, Vt) or ('dense', d_out, d_in, M, scale, U, S, Vt)");
    }
    t.out.U = as_ptr<float>(item[o].cast<uintptr_t>());
    t.out.S = as_ptr<float>(item[o + 1].cast<uintptr_t>());
    t.out.Vt = as_ptr<float>(item[o + 2].cast<uintptr_t>());
  }
  {
    py::gil_scoped_release release;
    flexlora::cuda::lowrank_svd_batched(batch, dev, reinterpret_cast<void*>(stream));
  }
  py::list routes;
  for (const auto& t : batch) routes.append(flexlora::method_name(t.out.route));
  return routes;
}

void weighted_sum(int d_out, int d_in, const std::vector<uintptr_t>& Bs,
                  const std::vector<uintptr_t>& As, std::vector<int> ranks,
                  std::vector<float> weights, uintptr_t out, float beta, bool tf32,
                  uintptr_t stream) {
  Factors f(d_out, d_in, Bs, As, std::move(ranks), std::move(weights), "weighted_sum");
  const auto dev = device_options(tf32, 1);
  py::gil_scoped_release release;
  flexlora::cuda::weighted_sum(f.set, as_ptr<float>(out), beta, dev,
                               reinterpret_cast<void*>(stream));
}

// items[i] = (d_out, d_in, B_ptr, A_ptr, rank, weight, out_ptr): out += weight * B @ A.
void accumulate(const py::list& items, bool tf32, uintptr_t stream) {
  std::vector<std::unique_ptr<Factors>> holders;
  std::vector<flexlora::cuda::Accumulate> work(py::len(items));
  for (size_t i = 0; i < work.size(); ++i) {
    auto it = py::reinterpret_borrow<py::tuple>(items[i]);
    if (it.size() != 7)
      throw py::value_error("items[" + std::to_string(i) +
                            "] must be (d_out, d_in, B, A, rank, weight, out)");
    holders.push_back(std::make_unique<Factors>(
        it[0].cast<int>(), it[1].cast<int>(), std::vector<uintptr_t>{it[2].cast<uintptr_t>()},
        std::vector<uintptr_t>{it[3].cast<uintptr_t>()}, std::vector<int>{it[4].cast<int>()},
        std::vector<float>{it[5].cast<float>()}, "items[" + std::to_string(i) + "]"));
    work[i].factors = holders.back()->set;
    work[i].out = as_ptr<float>(it[6].cast<uintptr_t>());
  }
  const auto dev = device_options(tf32, 1);
  py::gil_scoped_release release;
  flexlora::cuda::accumulate(work, dev, reinterpret_cast<void*>(stream));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "FlexLoRA CUDA backend (private; use server.cuda)";
  m.def("device_count", &flexlora::cuda::device_count);
  m.def("probe", [] {
    const auto p = flexlora::cuda::probe_devices();
    return py::make_tuple(p.count, p.runtime_version, p.driver_version, p.error);
  }, "(device count, CUDA runtime version built with, driver's CUDA version or 0, the "
     "runtime's error when the count is 0); never raises.");
  m.def("device_info", [] {
    py::gil_scoped_release release;
    return flexlora::cuda::device_info();
  });
  m.def("svd_batched", &svd_batched, py::arg("tasks"), py::arg("ranks"), py::arg("method"),
        py::arg("oversample"), py::arg("power_iters"), py::arg("seed"), py::arg("dense_exact"),
        py::arg("tf32"), py::arg("streams"), py::arg("stream"),
        "Truncated SVDs of many modules on device pointers; returns the route of each.");
  m.def("weighted_sum", &weighted_sum, py::arg("d_out"), py::arg("d_in"), py::arg("Bs"),
        py::arg("As"), py::arg("ranks"), py::arg("weights"), py::arg("out"), py::arg("beta"),
        py::arg("tf32"), py::arg("stream"));
  m.def("accumulate", &accumulate, py::arg("items"), py::arg("tf32"), py::arg("stream"));
  m.def("release", &flexlora::cuda::release_resources);
}
