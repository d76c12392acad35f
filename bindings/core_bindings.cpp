// The one pybind11 file: validate and convert Python objects into csrc params structs,
// release the GIL, call the core. No math here; the friendly validation (NaN, dtypes,
// conversions) lives in server/linalg.py, these checks only keep the interpreter safe.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "flexlora/core.h"

namespace py = pybind11;
using flexlora::BatchTask;
using flexlora::FactorSet;
using flexlora::SvdOptions;

namespace {

using FArray = py::array_t<float, py::array::c_style>;

FArray checked_matrix(const py::handle& obj, const std::string& what) {
  if (!py::isinstance<py::array>(obj))
    throw py::value_error(what + " must be a numpy array");
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<float>()))
    throw py::value_error(what + " must be float32, got " + std::string(py::str(arr.dtype())));
  if (arr.ndim() != 2) throw py::value_error(what + " must be 2-D");
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(what + " must be C-contiguous");
  return py::reinterpret_borrow<FArray>(arr);
}

// Owns the Python arrays (kept alive while the GIL is released) behind one FactorSet.
struct FactorHolder {
  std::vector<FArray> Bs, As;
  std::vector<const float*> Bp, Ap;
  std::vector<int> ranks;
  std::vector<float> weights;
  FactorSet set;

  FactorHolder(const py::sequence& Bseq, const py::sequence& Aseq,
               const std::vector<float>& w, const std::string& prefix) {
    const size_t K = py::len(Bseq);
    if (K == 0) throw py::value_error(prefix + "Bs is empty: at least one client is needed");
    if (py::len(Aseq) != K || w.size() != K)
      throw py::value_error(prefix + "Bs, As and weights must have the same length, got " +
                            std::to_string(K) + ", " + std::to_string(py::len(Aseq)) + ", " +
                            std::to_string(w.size()));
    weights = w;
    for (size_t k = 0; k < K; ++k) {
      const std::string idx = "[" + std::to_string(k) + "]";
      Bs.push_back(checked_matrix(Bseq[k], prefix + "Bs" + idx));
      As.push_back(checked_matrix(Aseq[k], prefix + "As" + idx));
      const auto& B = Bs.back();
      const auto& A = As.back();
      if (B.shape(0) != Bs[0].shape(0))
        throw py::value_error(prefix + "Bs" + idx + " has " + std::to_string(B.shape(0)) +
                              " rows, expected " + std::to_string(Bs[0].shape(0)) + " (d_out)");
      if (A.shape(1) != As[0].shape(1))
        throw py::value_error(prefix + "As" + idx + " has " + std::to_string(A.shape(1)) +
                              " columns, expected " + std::to_string(As[0].shape(1)) + " (d_in)");
      if (B.shape(1) != A.shape(0) || B.shape(1) < 1)
        throw py::value_error(prefix + "Bs" + idx + " has " + std::to_string(B.shape(1)) +
                              " columns but As" + idx + " has " + std::to_string(A.shape(0)) +
                              " rows (the client's rank, >= 1)");
      Bp.push_back(B.data());
      Ap.push_back(A.data());
      ranks.push_back(static_cast<int>(B.shape(1)));
    }
    set.d_out = static_cast<int>(Bs[0].shape(0));
    set.d_in = static_cast<int>(As[0].shape(1));
    set.num_clients = static_cast<int>(K);
    set.B = Bp.data();
    set.A = Ap.data();
    set.ranks = ranks.data();
    set.weights = weights.data();
  }
};

struct Outputs {
  FArray U, S, Vt;
  Outputs(int m, int n, int rank)
      : U({m, rank}), S(std::vector<py::ssize_t>{rank}), Vt({rank, n}) {}
  flexlora::SvdOutput view() {
    flexlora::SvdOutput o;
    o.U = U.mutable_data();
    o.S = S.mutable_data();
    o.Vt = Vt.mutable_data();
    return o;
  }
  py::tuple result(flexlora::Method route) {
    return py::make_tuple(U, S, Vt, flexlora::method_name(route));
  }
};

SvdOptions make_options(int rank, const std::string& method, int oversample, int power_iters,
                        uint64_t seed, bool dense_exact) {
  if (rank < 1) throw py::value_error("rank must be >= 1, got " + std::to_string(rank));
  SvdOptions o;
  o.method = flexlora::parse_method(method);
  o.rank = rank;
  o.oversample = oversample;
  o.power_iters = power_iters;
  o.seed = seed;
  o.dense_exact = dense_exact;
  return o;
}

py::list svd_batched(const py::list& tasks, const std::vector<int>& ranks,
                     const std::string& method, int oversample, int power_iters,
                     uint64_t seed, bool dense_exact, int threads) {
  if (ranks.size() != py::len(tasks))
    throw py::value_error("ranks must have one entry per task");
  std::vector<std::unique_ptr<FactorHolder>> holders;
  std::vector<FArray> dense;
  std::vector<Outputs> outs;
  std::vector<BatchTask> batch(py::len(tasks));
  outs.reserve(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    const std::string prefix = "layers[" + std::to_string(i) + "].";
    auto item = py::reinterpret_borrow<py::tuple>(tasks[i]);
    BatchTask& t = batch[i];
    t.opt = make_options(ranks[i], method, oversample, power_iters, seed, dense_exact);
    if (item.size() == 3) {
      holders.push_back(std::make_unique<FactorHolder>(
          item[0].cast<py::sequence>(), item[1].cast<py::sequence>(),
          item[2].cast<std::vector<float>>(), prefix));
      t.factors = holders.back()->set;
    } else if (item.size() == 2) {
      dense.push_back(checked_matrix(item[0], prefix + "M"));
      t.dense = dense.back().data();
      t.dense_scale = item[1].cast<float>();
      t.factors.d_out = static_cast<int>(dense.back().shape(0));
      t.factors.d_in = static_cast<int>(dense.back().shape(1));
    } else {
      throw py::value_error(prefix + " must be (Bs, As, weights) or (M, scale)");
    }
    outs.emplace_back(t.factors.d_out, t.factors.d_in, t.opt.rank);
    t.out = outs.back().view();
  }
  {
    py::gil_scoped_release release;
    flexlora::lowrank_svd_batched(batch, threads);
  }
  py::list result;
  for (size_t i = 0; i < batch.size(); ++i) result.append(outs[i].result(batch[i].out.route));
  return result;
}

FArray weighted_sum(const py::sequence& Bs, const py::sequence& As,
                    const std::vector<float>& weights, py::object out, int threads) {
  FactorHolder h(Bs, As, weights, "");
  FArray target;
  float beta = 0.0f;
  if (out.is_none()) {
    target = FArray({h.set.d_out, h.set.d_in});
  } else {
    target = checked_matrix(out, "out");
    if (!target.writeable()) throw py::value_error("out must be writeable");
    if (target.shape(0) != h.set.d_out || target.shape(1) != h.set.d_in)
      throw py::value_error("out has shape (" + std::to_string(target.shape(0)) + ", " +
                            std::to_string(target.shape(1)) + "), expected (" +
                            std::to_string(h.set.d_out) + ", " + std::to_string(h.set.d_in) + ")");
    beta = 1.0f;
  }
  float* dst = target.mutable_data();
  {
    py::gil_scoped_release release;
    flexlora::weighted_sum(h.set, dst, beta, threads);
  }
  return target;
}

// ---------------------------------------------------------------- streaming sketch
// numpy (row-major) shapes of the csrc column-major buffers (see SketchTests/SketchState):
// Y (d_out, k) = dW Omega, W (k, d_in) = Psi dW, Z (s, s) = (Phi dW Xi^T)^T. The test maps
// are not passed: the core regenerates them from (d_out, d_in, k, s, seed).
FArray shaped(const py::handle& obj, const std::string& what, py::ssize_t r, py::ssize_t c,
              bool writeable) {
  FArray a = checked_matrix(obj, what);
  if (a.shape(0) != r || a.shape(1) != c)
    throw py::value_error(what + " has shape (" + std::to_string(a.shape(0)) + ", " +
                          std::to_string(a.shape(1)) + "), expected (" + std::to_string(r) +
                          ", " + std::to_string(c) + ")");
  if (writeable && !a.writeable()) throw py::value_error(what + " must be writeable");
  return a;
}

struct SketchHolder {
  std::vector<FArray> keep;
  flexlora::SketchTests tests;
  float* Y = nullptr;
  float* W = nullptr;
  float* Z = nullptr;
  // dims = (d_out, d_in, k, s, seed): the sparse sign test maps are regenerated from them
  SketchHolder(const py::tuple& dims, const py::tuple& st, bool writeable, const std::string& prefix) {
    if (dims.size() != 5 || st.size() != 3)
      throw py::value_error(prefix + "dims must be (d_out, d_in, k, s, seed), state (Y, W, Z)");
    tests.d_out = dims[0].cast<int>();
    tests.d_in = dims[1].cast<int>();
    tests.k = dims[2].cast<int>();
    tests.s = dims[3].cast<int>();
    tests.seed = dims[4].cast<uint64_t>();
    const int m = tests.d_out, n = tests.d_in, k = tests.k, s = tests.s;
    if (m < 1 || n < 1 || k < 1 || k > std::min(m, n) || s < k)
      throw py::value_error(prefix + "sketch sizes need 1 <= k <= min(d_out, d_in) and s >= k");
    keep = {shaped(st[0], prefix + "Y", m, k, writeable), shaped(st[1], prefix + "W", k, n, writeable),
            shaped(st[2], prefix + "Z", s, s, writeable)};
    Y = keep[0].mutable_data();
    W = keep[1].mutable_data();
    Z = keep[2].mutable_data();
  }
};

// tasks: list of (dims (d_out, d_in, k, s, seed), state, Bs, As, weights)
void sketch_update(const py::list& tasks, int threads) {
  std::vector<std::unique_ptr<SketchHolder>> sk;
  std::vector<std::unique_ptr<FactorHolder>> fh;
  std::vector<flexlora::SketchUpdate> batch(py::len(tasks));
  for (size_t i = 0; i < batch.size(); ++i) {
    const std::string prefix = "layers[" + std::to_string(i) + "].";
    auto item = py::reinterpret_borrow<py::tuple>(tasks[i]);
    if (item.size() != 5) throw py::value_error(prefix + " must be (dims, state, Bs, As, weights)");
    sk.push_back(std::make_unique<SketchHolder>(item[0].cast<py::tuple>(), item[1].cast<py::tuple>(),
                                                true, prefix));
    fh.push_back(std::make_unique<FactorHolder>(item[2].cast<py::sequence>(), item[3].cast<py::sequence>(),
                                                item[4].cast<std::vector<float>>(), prefix));
    if (fh.back()->set.d_out != sk.back()->tests.d_out || fh.back()->set.d_in != sk.back()->tests.d_in)
      throw py::value_error(prefix + "factors are " + std::to_string(fh.back()->set.d_out) + "x" +
                            std::to_string(fh.back()->set.d_in) + ", the sketch is " +
                            std::to_string(sk.back()->tests.d_out) + "x" + std::to_string(sk.back()->tests.d_in));
    batch[i].tests = sk.back()->tests;
    batch[i].state.Y = sk.back()->Y;
    batch[i].state.W = sk.back()->W;
    batch[i].state.Z = sk.back()->Z;
    batch[i].factors = fh.back()->set;
  }
  py::gil_scoped_release release;
  flexlora::sketch_update_batched(batch, threads);
}

// tasks: list of (dims, state, scale, rank) -> list of (U, S, Vt, "sketch")
py::list sketch_finalize(const py::list& tasks, int threads) {
  std::vector<std::unique_ptr<SketchHolder>> sk;
  std::vector<Outputs> outs;
  std::vector<flexlora::SketchFinalize> batch(py::len(tasks));
  outs.reserve(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    const std::string prefix = "layers[" + std::to_string(i) + "].";
    auto item = py::reinterpret_borrow<py::tuple>(tasks[i]);
    if (item.size() != 4) throw py::value_error(prefix + " must be (dims, state, scale, rank)");
    sk.push_back(std::make_unique<SketchHolder>(item[0].cast<py::tuple>(), item[1].cast<py::tuple>(),
                                                false, prefix));
    auto& t = batch[i];
    t.tests = sk.back()->tests;
    t.Y = sk.back()->Y;
    t.W = sk.back()->W;
    t.Z = sk.back()->Z;
    t.scale = item[2].cast<float>();
    t.rank = item[3].cast<int>();
    if (t.rank < 1) throw py::value_error(prefix + "rank must be >= 1");
    outs.emplace_back(t.tests.d_out, t.tests.d_in, t.rank);
    t.out = outs.back().view();
  }
  {
    py::gil_scoped_release release;
    flexlora::sketch_finalize_batched(batch, threads);
  }
  py::list result;
  for (auto& o : outs) result.append(py::make_tuple(o.U, o.S, o.Vt, "sketch"));
  return result;
}

py::dict plan(int d_out, int d_in, long long total_rank, int rank, int oversample,
              int power_iters, bool dense_exact, const std::string& method) {
  // method prices the randomized routes: "auto" at its typical adaptive iteration count,
  // an explicit method at exactly power_iters. The route chosen is always auto's.
  SvdOptions o = make_options(rank, method, oversample, power_iters, 0, dense_exact);
  const auto p = flexlora::plan_route(d_out, d_in, total_rank, o);
  py::dict d;
  d["method"] = flexlora::method_name(p.method);
  d["reason"] = p.reason;
  d["cost"] = py::dict(py::arg("exact") = p.cost_exact, py::arg("randomized") = p.cost_randomized,
                       py::arg("dense") = p.cost_dense);
  d["flops"] = py::dict(py::arg("exact") = p.flops_exact,
                        py::arg("randomized") = p.flops_randomized,
                        py::arg("dense") = p.flops_dense);
  d["flops_f64"] = py::dict(py::arg("exact") = p.flops_exact_f64, py::arg("randomized") = 0.0,
                            py::arg("dense") = 0.0);
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "FlexLoRA native aggregation core (private; use server.linalg)";
  m.def("svd_batched", &svd_batched, py::arg("tasks"), py::arg("ranks"), py::arg("method"),
        py::arg("oversample"), py::arg("power_iters"), py::arg("seed"), py::arg("dense_exact"),
        py::arg("threads"),
        "Truncated SVDs of many modules; each task is (Bs, As, weights) or (M, scale). "
        "Returns [(U, S, Vt, route)].");
  m.def("weighted_sum", &weighted_sum, py::arg("Bs"), py::arg("As"), py::arg("weights"),
        py::arg("out") = py::none(), py::arg("threads") = 0,
        "sum_k weights[k] Bs[k] @ As[k] in one GEMM; accumulates into out when given.");
  m.def("plan", &plan, py::arg("d_out"), py::arg("d_in"), py::arg("total_rank"), py::arg("rank"),
        py::arg("oversample") = 10, py::arg("power_iters") = 2, py::arg("dense_exact") = false,
        py::arg("method") = "auto");
  m.def("sketch_update", &sketch_update, py::arg("tasks"), py::arg("threads"),
        "Adds clients to sketches in place; task = ((d_out, d_in, k, s, seed), (Y, W, Z), Bs, As, weights).");
  m.def("sketch_finalize", &sketch_finalize, py::arg("tasks"), py::arg("threads"),
        "Truncated SVDs from sketches; task = ((d_out, d_in, k, s, seed), (Y, W, Z), scale, rank). Returns [(U, S, Vt, 'sketch')].");
  m.attr("kSketchZeta") = flexlora::kSketchZeta;
  m.def("set_num_threads", &flexlora::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &flexlora::get_num_threads);
  m.def("hardware_threads", &flexlora::hardware_threads);
  m.def("blas_config", &flexlora::blas_config);
  m.attr("kExactPreference") = flexlora::kExactPreference;
  m.attr("kAutoEnergyTol") = flexlora::kAutoEnergyTol;
  m.attr("kAutoMaxPowerIters") = flexlora::kAutoMaxPowerIters;
}
