// Internal: column-major matrix views and thin wrappers over the scipy_-prefixed CBLAS and
// LAPACKE symbols of scipy-openblas32 (32-bit integers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace flexlora::detail {

// Column-major owned matrix: element (i, j) at data[i + j * rows].
struct Mat {
  int rows = 0, cols = 0;
  std::vector<float> data;
  Mat() = default;
  Mat(int r, int c) : rows(r), cols(c), data(static_cast<size_t>(r) * c, 0.0f) {}
  float* p() { return data.data(); }
  const float* p() const { return data.data(); }
};

// C = alpha * op(A) * op(B) + beta * C, all column-major with explicit leading dimensions.
void gemm(bool transA, bool transB, int m, int n, int k, float alpha, const float* A,
          int lda, const float* B, int ldb, float beta, float* C, int ldc);

// Thin QR of a (m x n) in place: on return a holds Q (m x min(m, n)) and, if R is not
// null, R receives the (min(m, n) x n) upper-trapezoidal factor.
void thin_qr(Mat& a, Mat* R);

// Thin SVD of a (m x n) (destroyed): U (m x k), S (k), Vt (k x n), k = min(m, n).
void thin_svd(Mat& a, Mat& U, std::vector<float>& S, Mat& Vt);

// Fills (n) floats with standard normal samples from a counter-based generator; the
// same seed gives the same numbers on every platform.
void gaussian_fill(float* x, size_t n, uint64_t seed);

void blas_set_threads(int n);
int blas_get_threads();

}  // namespace flexlora::detail
