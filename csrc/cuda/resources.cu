// Handles, streams, stream-ordered buffers and the column-major BLAS/LAPACK wrappers.
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "device.h"
#include "flexlora_cuda.h"

namespace flexlora::cuda::detail {

void fail(const char* what, const std::string& detail, const char* file, int line) {
  std::ostringstream s;
  s << "CUDA backend: " << what << " failed: " << detail << " (" << file << ":" << line << ")";
  throw std::runtime_error(s.str());
}

// ------------------------------------------------------------------ buffers
Buffer::Buffer(size_t count, cudaStream_t stream) : stream_(stream) {
  if (count) FLEXLORA_CUDA_CHECK(cudaMallocAsync(&ptr_, count * sizeof(float), stream));
}

Buffer Buffer::bytes(size_t n, cudaStream_t stream) {
  Buffer b;
  b.stream_ = stream;
  if (n) FLEXLORA_CUDA_CHECK(cudaMallocAsync(&b.ptr_, n, stream));
  return b;
}

Buffer::~Buffer() {
  if (ptr_) cudaFreeAsync(ptr_, stream_);  // no throw from a destructor
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
    ptr_ = o.ptr_;
    stream_ = o.stream_;
    o.ptr_ = nullptr;
  }
  return *this;
}

// ------------------------------------------------------------------ slots
namespace {
std::mutex g_lock;                         // one computation at a time, like the CPU core
std::map<int, std::vector<Slot>> g_slots;  // per device

void destroy(Slot& s) {
  if (s.jacobi) cusolverDnDestroyGesvdjInfo(s.jacobi);
  if (s.solver) cusolverDnDestroy(s.solver);
  if (s.blas) cublasDestroy(s.blas);
  if (s.done) cudaEventDestroy(s.done);
  if (s.stream) cudaStreamDestroy(s.stream);
  s = Slot{};
}

void configure_pool(int device) {
  // Keep up to 2 GiB of freed workspace in the stream-ordered pool between calls instead of
  // returning it to the driver at every synchronisation.
  cudaMemPool_t pool;
  if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess) {
    uint64_t keep = uint64_t{2} << 30;
    cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
  }
}
}  // namespace

ResourceLock::ResourceLock() { g_lock.lock(); }
ResourceLock::~ResourceLock() { g_lock.unlock(); }

std::vector<Slot>& slots(int count) {
  int device = 0;
  FLEXLORA_CUDA_CHECK(cudaGetDevice(&device));
  auto& v = g_slots[device];
  if (v.empty()) configure_pool(device);
  while (static_cast<int>(v.size()) < count) {
    Slot s;
    try {
      FLEXLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
      FLEXLORA_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
      FLEXLORA_CUBLAS_CHECK(cublasCreate(&s.blas));
      FLEXLORA_CUBLAS_CHECK(cublasSetStream(s.blas, s.stream));
      FLEXLORA_CUSOLVER_CHECK(cusolverDnCreate(&s.solver));
      FLEXLORA_CUSOLVER_CHECK(cusolverDnSetStream(s.solver, s.stream));
      FLEXLORA_CUSOLVER_CHECK(cusolverDnCreateGesvdjInfo(&s.jacobi));
    } catch (...) {
      destroy(s);
      throw;
    }
    v.push_back(s);
  }
  return v;
}

void drop_all_slots() {
  for (auto& [device, v] : g_slots) {
    int current = 0;
    cudaGetDevice(&current);
    cudaSetDevice(device);
    for (auto& s : v) {
      cudaStreamSynchronize(s.stream);
      destroy(s);
    }
    cudaSetDevice(current);
  }
  g_slots.clear();
}

// ------------------------------------------------------------------ BLAS / LAPACK
namespace {
void set_math(const Ctx& c) {
  FLEXLORA_CUBLAS_CHECK(
      cublasSetMathMode(c.slot->blas, c.tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
}
cublasOperation_t op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }
}  // namespace

void gemm(const Ctx& c, bool ta, bool tb, int m, int n, int k, float alpha, const float* A,
          int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  if (m <= 0 || n <= 0) return;
  set_math(c);
  FLEXLORA_CUBLAS_CHECK(cublasSgemm(c.slot->blas, op(ta), op(tb), m, n, k, &alpha, A, lda, B,
                                    ldb, &beta, C, ldc));
}

void scaled_copy(const Ctx& c, bool ta, int m, int n, float alpha, const float* A, int lda,
                 float* C, int ldc) {
  if (m <= 0 || n <= 0) return;
  // C is zeroed first so that beta = 0 never multiplies uninitialised memory; geam then runs
  // in its documented in-place form (B == C, transb = N).
  FLEXLORA_CUDA_CHECK(cudaMemset2DAsync(C, sizeof(float) * ldc, 0, sizeof(float) * m, n, c.s()));
  const float beta = 0.0f;
  FLEXLORA_CUBLAS_CHECK(cublasSgeam(c.slot->blas, op(ta), CUBLAS_OP_N, m, n, &alpha, A, lda,
                                    &beta, C, ldc, C, ldc));
}

void thin_qr(const Ctx& c, float* a, int m, int n, float* R) {
  const int k = std::min(m, n);
  auto* h = c.slot->solver;
  int lw_geqrf = 0, lw_orgqr = 0;
  Buffer tau(k, c.s());
  FLEXLORA_CUSOLVER_CHECK(cusolverDnSgeqrf_bufferSize(h, m, n, a, m, &lw_geqrf));
  FLEXLORA_CUSOLVER_CHECK(cusolverDnSorgqr_bufferSize(h, m, k, k, a, m, tau.f(), &lw_orgqr));
  Buffer work(std::max(lw_geqrf, lw_orgqr), c.s());
  Buffer info = Buffer::bytes(sizeof(int), c.s());
  FLEXLORA_CUSOLVER_CHECK(
      cusolverDnSgeqrf(h, m, n, a, m, tau.f(), work.f(), lw_geqrf, info.i()));
  note_info(c.status, info.i(), 1, c.s());
  if (R) copy_upper(a, m, R, k, n, c.s());
  FLEXLORA_CUSOLVER_CHECK(
      cusolverDnSorgqr(h, m, k, k, a, m, tau.f(), work.f(), lw_orgqr, info.i()));
  note_info(c.status, info.i(), 2, c.s());
}

void thin_svd(const Ctx& c, float* a, int m, int n, float* U, float* S, float* V) {
  auto* h = c.slot->solver;
  int lwork = 0;
  const auto jobz = CUSOLVER_EIG_MODE_VECTOR;
  FLEXLORA_CUSOLVER_CHECK(cusolverDnSgesvdj_bufferSize(h, jobz, 1, m, n, a, m, S, U, m, V, n,
                                                       &lwork, c.slot->jacobi));
  Buffer work(lwork, c.s());
  Buffer info = Buffer::bytes(sizeof(int), c.s());
  FLEXLORA_CUSOLVER_CHECK(cusolverDnSgesvdj(h, jobz, 1, m, n, a, m, S, U, m, V, n, work.f(),
                                            lwork, info.i(), c.slot->jacobi));
  note_info(c.status, info.i(), 3, c.s());
}

}  // namespace flexlora::cuda::detail

namespace flexlora::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

DeviceProbe probe_devices() {
  DeviceProbe p;
  cudaRuntimeGetVersion(&p.runtime_version);
  cudaDriverGetVersion(&p.driver_version);  // 0 when no driver is installed
  const cudaError_t e = cudaGetDeviceCount(&p.count);
  if (e != cudaSuccess) {
    p.count = 0;
    p.error = cudaGetErrorString(e);
    cudaGetLastError();  // leave no error behind for later calls
  } else if (p.count == 0) {
    p.error = "the CUDA runtime reports 0 devices";
  }
  return p;
}

std::string device_info() {
  int device = 0;
  FLEXLORA_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp p{};
  FLEXLORA_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  int smaj = 0, smin = 0, spat = 0;
  cusolverGetProperty(MAJOR_VERSION, &smaj);
  cusolverGetProperty(MINOR_VERSION, &smin);
  cusolverGetProperty(PATCH_LEVEL, &spat);
  std::ostringstream s;
  s << p.name << ", sm_" << p.major << p.minor << ", " << p.multiProcessorCount << " SMs, "
    << (double(p.totalGlobalMem) / double(1ull << 30)) << " GiB; cuBLAS "
    << CUBLAS_VERSION << " (built against), cuSOLVER " << smaj << "." << smin << "." << spat
    << ", runtime " << runtime << ", driver " << driver;
  return s.str();
}

void release_resources() {
  detail::ResourceLock lock;
  detail::drop_all_slots();
}

}  // namespace flexlora::cuda
