// The few kernels the routes need beyond cuBLAS and cuSOLVER.
#include "device.h"

namespace flexlora::cuda::detail {
namespace {

constexpr int kThreads = 256;

__device__ inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Counter-based: element i depends on (seed, i) only, so the test matrix is the same for
// any launch shape and any stream.
__global__ void gaussian_kernel(float* x, size_t n, uint64_t seed) {
  const uint64_t key = splitmix64(seed ^ 0x5DEECE66Dull);
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint64_t bits = splitmix64(key + i);
    const float u1 = (float((bits >> 40) & 0xFFFFFF) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
    const float u2 = float((bits >> 8) & 0xFFFFFF) * (1.0f / 16777216.0f);           // [0, 1)
    x[i] = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  }
}

// r (k x n, ld k) = upper trapezoid of a (lda), zeros below the diagonal.
__global__ void copy_upper_kernel(const float* a, int lda, float* r, int k, int n) {
  const size_t total = size_t(k) * n;
  for (size_t idx = blockIdx.x * size_t(blockDim.x) + threadIdx.x; idx < total;
       idx += size_t(gridDim.x) * blockDim.x) {
    const int i = int(idx % k), j = int(idx / k);
    r[idx] = i <= j ? a[i + size_t(j) * lda] : 0.0f;
  }
}

__global__ void scale_kernel(const float* src, float* dst, int n, float scale) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = scale * src[i];
}

__global__ void note_info_kernel(int* status, const int* info, int code) {
  if (*info != 0 && status[0] == 0) {
    status[0] = code;
    status[1] = *info;
  }
}

int blocks_for(size_t n) {
  const size_t b = (n + kThreads - 1) / kThreads;
  return int(b < 4096 ? (b == 0 ? 1 : b) : 4096);
}

}  // namespace

void gaussian_fill(float* x, size_t n, uint64_t seed, cudaStream_t s) {
  gaussian_kernel<<<blocks_for(n), kThreads, 0, s>>>(x, n, seed);
  FLEXLORA_CUDA_CHECK(cudaGetLastError());
}

void copy_upper(const float* a, int lda, float* r, int k, int n, cudaStream_t s) {
  copy_upper_kernel<<<blocks_for(size_t(k) * n), kThreads, 0, s>>>(a, lda, r, k, n);
  FLEXLORA_CUDA_CHECK(cudaGetLastError());
}

void scale_vector(const float* src, float* dst, int n, float scale, cudaStream_t s) {
  if (n <= 0) return;
  scale_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, s>>>(src, dst, n, scale);
  FLEXLORA_CUDA_CHECK(cudaGetLastError());
}

void note_info(int* status, const int* info, int code, cudaStream_t s) {
  note_info_kernel<<<1, 1, 0, s>>>(status, info, code);
  FLEXLORA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flexlora::cuda::detail
