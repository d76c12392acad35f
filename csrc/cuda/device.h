// Internal to the CUDA backend: error checks, stream-ordered buffers, per-stream library
// handles and the small kernels the routes need. Never included outside csrc/cuda/.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace flexlora::cuda::detail {

[[noreturn]] void fail(const char* what, const std::string& detail, const char* file, int line);

#define FLEXLORA_CUDA_CHECK(expr)                                                       \
  do {                                                                                   \
    cudaError_t e_ = (expr);                                                             \
    if (e_ != cudaSuccess)                                                               \
      ::flexlora::cuda::detail::fail(#expr, cudaGetErrorString(e_), __FILE__, __LINE__); \
  } while (0)
#define FLEXLORA_CUBLAS_CHECK(expr)                                                      \
  do {                                                                                   \
    cublasStatus_t s_ = (expr);                                                          \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                     \
      ::flexlora::cuda::detail::fail(#expr, cublasGetStatusString(s_), __FILE__, __LINE__); \
  } while (0)
#define FLEXLORA_CUSOLVER_CHECK(expr)                                                    \
  do {                                                                                   \
    cusolverStatus_t s_ = (expr);                                                        \
    if (s_ != CUSOLVER_STATUS_SUCCESS)                                                   \
      ::flexlora::cuda::detail::fail(#expr, "cusolverStatus " + std::to_string(int(s_)), \
                                     __FILE__, __LINE__);                                \
  } while (0)

// Device memory allocated and freed in stream order (cudaMallocAsync / cudaFreeAsync), so a
// buffer freed on a stream is only reused by work queued after it.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t count, cudaStream_t stream);  // count floats (or bytes via bytes())
  static Buffer bytes(size_t n, cudaStream_t stream);
  ~Buffer();
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* f() const { return static_cast<float*>(ptr_); }
  int* i() const { return static_cast<int*>(ptr_); }
  void* raw() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

// Everything one worker stream needs: its stream, a cuBLAS and a cuSOLVER handle bound to
// it, and the Jacobi SVD parameters.
struct Slot {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  gesvdjInfo_t jacobi = nullptr;
  cudaEvent_t done = nullptr;
};

// Context of one task: the slot it runs on, the math mode, and where solver failures go
// (status[0] = failing call code, status[1] = its info; left 0 when all succeed).
struct Ctx {
  Slot* slot;
  bool tf32;
  int* status;
  cudaStream_t s() const { return slot->stream; }
};

// The cached slots of the current device (created on first use), at least `count` of them.
// Callers hold a ResourceLock while they use them (one computation at a time).
std::vector<Slot>& slots(int count);
struct ResourceLock {
  ResourceLock();
  ~ResourceLock();
  ResourceLock(const ResourceLock&) = delete;
  ResourceLock& operator=(const ResourceLock&) = delete;
};
void drop_all_slots();

// ---- column-major BLAS / LAPACK on a Ctx (all asynchronous on ctx.s()).
void gemm(const Ctx& c, bool ta, bool tb, int m, int n, int k, float alpha, const float* A,
          int lda, const float* B, int ldb, float beta, float* C, int ldc);
// C (m x n, ldc) = alpha * op(A); op(A) is A (lda) or A^T.
void scaled_copy(const Ctx& c, bool ta, int m, int n, float alpha, const float* A, int lda,
                 float* C, int ldc);
// Thin QR in place: a (m x n, ld m) becomes Q (m x min(m, n)); R (min(m,n) x n, ld
// min(m,n)) receives the upper-trapezoidal factor when not null.
void thin_qr(const Ctx& c, float* a, int m, int n, float* R);
// Thin SVD of a (m x n, ld m, destroyed) by Jacobi: U (m x k, ld m), S (k) descending,
// V (n x k, ld n), k = min(m, n).
void thin_svd(const Ctx& c, float* a, int m, int n, float* U, float* S, float* V);

// ---- kernels (kernels.cu)
void gaussian_fill(float* x, size_t n, uint64_t seed, cudaStream_t s);
void copy_upper(const float* a, int lda, float* r, int k, int n, cudaStream_t s);
void scale_vector(const float* src, float* dst, int n, float scale, cudaStream_t s);
void note_info(int* status, const int* info, int code, cudaStream_t s);

}  // namespace flexlora::cuda::detail
