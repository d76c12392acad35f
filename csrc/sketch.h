// Internal: the streaming sketch route (entry points in core.cpp).
#pragma once

#include <vector>

#include "blas.h"
#include "flexlora/core.h"

namespace flexlora::detail {

void check_sketch_tests(const SketchTests& t);

// One sparse sign test map (rows x cols) of a sketch, regenerated from SketchTests::seed:
// column j has zeta nonzeros sign[j zeta + z] in rows row[j zeta + z].
struct SparseSign {
  int rows, cols, zeta;
  std::vector<int> row;
  std::vector<float> sign;
  SparseSign(const SketchTests& t, int which, int rows, int cols);
  static SparseSign omega(const SketchTests& t);  // Omega^T (k x d_in)
  static SparseSign psi(const SketchTests& t);    // Psi (k x d_out)
  static SparseSign phi(const SketchTests& t);    // Phi (s x d_out)
  static SparseSign xi(const SketchTests& t);     // Xi (s x d_in)
  // out (rows x ncols) += G X for X (cols x ncols); element (i, q) of X at X[i xr + q xc],
  // of out at out[i orow + q ocol].
  void apply(const float* X, int ncols, size_t xr, size_t xc, float* out, size_t orow,
             size_t ocol) const;
};

void sketch_update_one(const SketchTests& t, SketchState& st, const FactorSet& f);
void sketch_finalize_one(const SketchFinalize& task, SvdOutput& out);

}  // namespace flexlora::detail
