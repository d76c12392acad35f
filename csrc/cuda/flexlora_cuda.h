// FlexLoRA CUDA backend: the entry points of flexlora/core.h on device memory.
//
// Built only with -DFLEXLORA_CUDA=ON (cmake/FlexLoRACuda.cmake). No Python, pybind11 or torch
// header here; streams cross this interface as opaque handles (a cudaStream_t cast to void*,
// nullptr = the legacy default stream) so callers need no CUDA header either.
//
// Memory: the same params structs as the CPU core (FactorSet, SvdOptions, SvdOutput,
// BatchTask) with the same row-major float32 layouts, except that every matrix pointer
// (FactorSet::B[k], FactorSet::A[k], BatchTask::dense, SvdOutput::U/S/Vt, weighted_sum's
// out) is a DEVICE pointer on the current device. The pointer arrays themselves
// (FactorSet::B, FactorSet::A) and FactorSet::ranks / FactorSet::weights are HOST arrays.
//
// Ordering: work is ordered after everything already queued on `stream` and everything
// queued on `stream` afterwards is ordered after it; the host returns once the work is
// queued, except lowrank_svd_batched, which waits for its solver status (one sync at the end)
// so that a failed factorisation raises here instead of leaving garbage behind.
#pragma once

#include <string>
#include <vector>

#include "flexlora/core.h"

namespace flexlora::cuda {

struct DeviceOptions {
  bool tf32 = false;        // GEMMs in TF32 tensor-core math (faster, ~1e-3 relative error);
                            // default is full fp32 (cuBLAS default math, no TF32)
  int streams = 4;          // worker streams a batched call spreads its modules over (>= 1)
};

// Many modules in one call, spread over DeviceOptions::streams worker streams (largest
// first). Each task takes the route of its SvdOptions (Auto: flexlora::plan_route) and
// sets out.route. Throws std::invalid_argument on bad params, std::runtime_error on a CUDA,
// cuBLAS or cuSOLVER failure.
void lowrank_svd_batched(std::vector<BatchTask>& tasks, const DeviceOptions& dev, void* stream);

// out (d_out x d_in row-major, device) = beta * out + sum_k weights[k] B[k] A[k] by one GEMM
// over the concatenated factors (one GEMM per client when there is one client). Asynchronous.
void weighted_sum(const FactorSet& f, float* out, float beta, const DeviceOptions& dev,
                  void* stream);

// One client's contribution to many dense accumulators, queued on `stream` without a sync:
// out[i] += weights[i] * B[i] @ A[i] (each a single-client FactorSet). The streaming
// aggregator calls this once per client.
struct Accumulate {
  FactorSet factors;        // num_clients >= 1, device pointers
  float* out = nullptr;     // (factors.d_out x factors.d_in) row-major, device
};
void accumulate(const std::vector<Accumulate>& items, const DeviceOptions& dev, void* stream);

// "NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79.1 GiB; cuBLAS 130002, cuSOLVER 12009, runtime 13000"
std::string device_info();
// Number of visible devices (0 when there is no driver or no GPU; never throws).
int device_count();
// What the CUDA runtime linked into the backend sees, for a caller that must say why there is
// no device: the device count, the runtime version it was built with (13000 = 13.0), the
// installed driver's CUDA version (0 without a driver), and the runtime's message when the
// count is 0 ("no CUDA-capable device is detected", "CUDA driver version is insufficient
// for CUDA runtime version", ...; empty otherwise). Never throws.
struct DeviceProbe {
  int count = 0;
  int runtime_version = 0;
  int driver_version = 0;
  std::string error;
};
DeviceProbe probe_devices();
// Frees the cached cuBLAS/cuSOLVER handles and worker streams (tests; process exit).
void release_resources();

}  // namespace flexlora::cuda
