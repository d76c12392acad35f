// Internal: column-major matrix views and thin wrappers over the scipy_-prefixed CBLAS and
// LAPACKE symbols of scipy-openblas32 (32-bit integers).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace flexlora::detail {

// Large buffers (the concatenated factors, dW) come from 2 MiB-aligned memory advised for
// transparent huge pages: fewer page faults when a fresh buffer is first written, fewer TLB
// misses in the GEMMs. Small ones use the ordinary heap.
void* big_alloc(size_t bytes);
void big_free(void* p, size_t bytes) noexcept;

// Allocator that leaves new floats uninitialised (buffers a GEMM overwrites anyway).
template <class T>
struct NoInitAllocator : std::allocator<T> {
  template <class U> struct rebind { using other = NoInitAllocator<U>; };
  NoInitAllocator() = default;
  template <class U> NoInitAllocator(const NoInitAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(big_alloc(n * sizeof(T))); }
  void deallocate(T* p, size_t n) noexcept { big_free(p, n * sizeof(T)); }
  template <class U> void construct(U* p) { ::new (static_cast<void*>(p)) U; }
  template <class U, class... Args> void construct(U* p, Args&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(a)...);
  }
};

// Column-major owned matrix: element (i, j) at data[i + j * rows].
struct Mat {
  int rows = 0, cols = 0;
  std::vector<float, NoInitAllocator<float>> data;
  Mat() = default;
  Mat(int r, int c) : rows(r), cols(c), data(static_cast<size_t>(r) * c, 0.0f) {}
  // Uninitialised contents: for outputs that a kernel writes completely.
  static Mat uninit(int r, int c) {
    Mat a;
    a.rows = r;
    a.cols = c;
    a.data.resize(static_cast<size_t>(r) * c);
    return a;
  }
  float* p() { return data.data(); }
  const float* p() const { return data.data(); }
};

// C = alpha * op(A) * op(B) + beta * C, all column-major with explicit leading dimensions.
void gemm(bool transA, bool transB, int m, int n, int k, float alpha, const float* A,
          int lda, const float* B, int ldb, float beta, float* C, int ldc);

// Thin QR of a (m x n) in place: on return a holds Q (m x min(m, n)) and, if R is not
// null, R receives the (min(m, n) x n) upper-trapezoidal factor.
void thin_qr(Mat& a, Mat* R);

// G (n x n, column-major, full symmetric, double) = X^T X for X (m x n) (or X X^T, n = m,
// with rows = true): one ssyrk in float32, symmetrised in double for the Cholesky and
// eigenvalue steps.
std::vector<double> gram(const Mat& X, bool rows = false);

// Orthonormalises the columns of X (m x n, m >= n) in place by Cholesky QR twice
// (CholQR2): G = X^T X = R^T R, X <- X R^{-1}, repeated once for orthogonality to float32
// rounding. Costs two syrk + two trsm (GEMM-speed BLAS-3) instead of Householder panels.
// Falls back to Householder QR (thin_qr) when X is too ill-conditioned for the Gram
// (Cholesky breakdown or cond(X)^2 beyond float32 range). G0, if given, is X's Gram.
void orthonormalize(Mat& X, const std::vector<double>* G0 = nullptr);

// Double-precision Gram of a float32 column-major X (rows x cols, leading dimension ld):
// X X^T (rows x rows) when of_rows, else X^T X (cols x cols); full symmetric, column-major.
// Products of floats are exact in double, so the Gram is accurate to double rounding (the
// Gram route of the exact SVD squares the condition number). Converted in column blocks
// and accumulated with dsyrk, so the extra memory is one block.
std::vector<double> gram_f64(const float* X, int rows, int cols, int ld, bool of_rows);

// Column-scaled Cholesky of the symmetric positive (semi)definite G (n x n, column-major,
// double), in place: on success G holds the upper-triangular Rf with G = Rf^T Rf (strict
// lower triangle zeroed). Fails (returns false, G clobbered) when a diagonal entry is not
// positive or a pivot of the unit-diagonal scaled Gram D G D falls below min_pivot, i.e.
// when the columns behind G are numerically dependent at that level.
bool scaled_cholesky(std::vector<double>& G, int n, double min_pivot);

// B <- op(T) B (left) or B op(T) (right), T upper triangular (double, column-major).
void trmm_upper(bool left, bool trans, int rows, int cols, const double* T, int ldt, double* B,
                int ldb);
// B <- T^{-1} B for T upper triangular (n x n) and B (n x cols), double, column-major.
void trsm_upper_left(int n, int cols, const double* T, int ldt, double* B, int ldb);

// The k largest eigenpairs of the symmetric G (n x n, double, destroyed): lam (k)
// descending, V (n x k, column-major) orthonormal (dsyevr, only the wanted pairs).
void top_eigenpairs(std::vector<double>& G, int n, int k, std::vector<double>& lam,
                    std::vector<double>& V);

// Sum of the k largest eigenvalues of the symmetric (n x n) G (destroyed).
double top_eigen_sum(std::vector<double>& G, int n, int k);

// B <- op(T)^{-1} B (left) or B op(T)^{-1} (right), T upper triangular float32, col-major.
void trsm_f32(bool left, bool trans, int rows, int cols, const float* T, int ldt, float* B,
              int ldb);

// Thin SVD of a (m x n) (destroyed): U (m x k), S (k), Vt (k x n), k = min(m, n).
void thin_svd(Mat& a, Mat& U, std::vector<float>& S, Mat& Vt);

// Fills (n) floats with standard normal samples from a counter-based generator; the
// same seed gives the same numbers on every platform.
void gaussian_fill(float* x, size_t n, uint64_t seed);

void blas_set_threads(int n);
int blas_get_threads();

// Sets the BLAS thread count for a scope (no call when it already matches, so it is a
// no-op inside the batched OpenMP region where BLAS runs single-threaded).
class BlasThreadsScope {
 public:
  explicit BlasThreadsScope(int n) : prev_(blas_get_threads()) {
    if (n != prev_) blas_set_threads(n);
  }
  ~BlasThreadsScope() {
    if (blas_get_threads() != prev_) blas_set_threads(prev_);
  }
  BlasThreadsScope(const BlasThreadsScope&) = delete;
  BlasThreadsScope& operator=(const BlasThreadsScope&) = delete;

 private:
  int prev_;
};

}  // namespace flexlora::detail
