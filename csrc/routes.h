// Internal: the three routes to a truncated SVD, written against a column-major operator.
#pragma once

#include "blas.h"
#include "flexlora/core.h"

namespace flexlora::detail {

// The factored operator M = Bc * At^T (d_out x d_in) where Bc = [B_1 .. B_K] (d_out x R)
// and At = [w_1 A_1; ..; w_K A_K]^T (d_in x R). Both are stored as the row-major
// concatenations of the inputs (row copies, no transposes): BcT is Bc^T column-major
// (R x d_out), At is column-major (d_in x R).
struct Factored {
  int m = 0, n = 0, R = 0;
  Mat BcT, At;
};
Factored concat_factors(const FactorSet& f);

// Dense W = M^T (d_in x d_out column-major, which is M row-major) from the factors.
Mat form_dense(const Factored& F);

// Exact route: the Gram route (BLAS-3, see routes.cpp) when both concatenated factors are
// well conditioned, else Householder QR of both. kGramMinPivot bounds the squared pivots of
// the unit-diagonal scaled Grams (cond(X D) <~ 1/sqrt(kGramMinPivot) = 300).
constexpr double kGramMinPivot = 1e-5;
bool exact_gram(const Factored& F, const SvdOptions& opt, SvdOutput& out);
void exact_factored(const Factored& F, const SvdOptions& opt, SvdOutput& out);
// Randomized routes; adaptive: auto's accuracy-driven power iterations (see routes.cpp).
// Return the number of power iterations run.
int randomized_factored(const Factored& F, const SvdOptions& opt, SvdOutput& out,
                        bool adaptive);
// W is M^T column-major (d_in x d_out), i.e. M row-major; scale multiplies M.
int randomized_dense(const float* W, int m, int n, float scale, const SvdOptions& opt,
                     SvdOutput& out, bool adaptive);
// ||M||_F^2 in double.
double frobenius2(const Factored& F);
double frobenius2(const float* W, size_t count);
void exact_dense(const float* W, int m, int n, float scale, const SvdOptions& opt,
                 SvdOutput& out);

}  // namespace flexlora::detail
