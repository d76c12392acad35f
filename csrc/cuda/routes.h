// Internal to the CUDA backend: the routes of csrc/routes.h on device memory.
#pragma once

#include "device.h"
#include "flexlora/core.h"

namespace flexlora::cuda::detail {

// M = Bc At^T with Bc = [B_1 .. B_K] (m x R) and At = [w_1 A_1; ..; w_K A_K]^T (n x R),
// both column-major device copies of the inputs.
struct Factored {
  int m = 0, n = 0, R = 0;
  Buffer Bc, At;
};
Factored concat_factors(const Ctx& c, const FactorSet& f);
// W (n x m col-major, i.e. M row-major) = beta W + At Bc^T.
void form_dense(const Ctx& c, const Factored& F, float beta, float* W);

// exact_factored destroys F (its QR runs in place).
void exact_factored(const Ctx& c, Factored& F, const SvdOptions& opt, SvdOutput& out);
void randomized_factored(const Ctx& c, const Factored& F, const SvdOptions& opt,
                         SvdOutput& out);
// W is M^T column-major (n x m), i.e. M row-major; scale multiplies M.
void randomized_dense(const Ctx& c, const float* W, int m, int n, float scale,
                      const SvdOptions& opt, SvdOutput& out);
void exact_dense(const Ctx& c, const float* W, int m, int n, float scale, const SvdOptions& opt,
                 SvdOutput& out);

}  // namespace flexlora::cuda::detail
