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
  // out (rows x r, column-major, ld rows) += G X^T for X (r x cols) row-major: G applied to
  // each row of X (each contiguous; the writes land in one column of out, which stays in cache).
  void apply_rows(const float* X, int r, float* out) const;
  // out (rows x r, row-major) += G X for X (cols x r) row-major: whole rows of X added to
  // rows of out, both contiguous.
  void apply_cols(const float* X, int r, float* out) const;
};

void sketch_update_one(const SketchTests& t, SketchState& st, const FactorSet& f);
void sketch_finalize_one(const SketchFinalize& task, SvdOutput& out);

}  // namespace flexlora::detail
