// Host stand-in for the part of the CUDA runtime that csrc/ uses. NOT CUDA: this is the CPU
// emulator of tests/cuda_emu, compiled with g++. A kernel launch runs its blocks one after
// another; each CUDA thread of a block is an OS thread, and __syncthreads is a real barrier
// that also checks every thread of the block reached the same one.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>  // rintf, fabsf: CUDA's runtime header brings in the math functions too
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static  // see emu::shared_memory
#define __syncthreads() ::emu::sync_threads(__LINE__)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {  // 16-byte aligned like CUDA's: UBSan flags misaligned vector accesses
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(8) uint2 {  // 8-byte aligned like CUDA's
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }
inline float __int_as_float(int b) { float f; std::memcpy(&f, &b, 4); return f; }
inline int __float_as_int(float f) { int b; std::memcpy(&b, &f, 4); return b; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }
inline unsigned atomicMin(unsigned* p, unsigned v) {
  std::atomic_ref<unsigned> a(*p);
  unsigned old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {}
  return old;
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  std::atomic_ref<unsigned> a(*p);
  unsigned old = a.load();
  while (v > old && !a.compare_exchange_weak(old, v)) {}
  return old;
}
// IEEE round-to-nearest division and reciprocal (host fp32 arithmetic is IEEE, like these intrinsics)
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmul_rn(float a, float b) { return a * b; }  // one IEEE rounding (the emulator is built without FMA)
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

// ---- runtime API: one device (device 0) with the H200's 132 SMs (the split-K heuristic reads it)

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorNoDevice = 100, cudaErrorInvalidDevice = 101 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace emu {
inline cudaError_t last_error = cudaSuccess;  // sticky launch error, as cudaGetLastError reports it
constexpr int kSmCount = 132;
}  // namespace emu

inline cudaError_t cudaGetLastError() { cudaError_t e = emu::last_error; emu::last_error = cudaSuccess; return e; }
inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : e == cudaErrorInvalidConfiguration ? "cudaErrorInvalidConfiguration"
                                                                                : "cudaErrorEmulated";
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 0; return cudaErrorNoDevice; }
#define CUDART_VERSION 13000
inline cudaError_t cudaDriverGetVersion(int* v) { *v = 0; return cudaSuccess; }  // no driver
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  if (device != 0 || attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *v = emu::kSmCount;
  return cudaSuccess;
}

// ---- launches: the build rewrites  kernel<<<grid, block, smem, stream>>>(args)  into
//      ::emu::launch(::emu::Config(grid, block, smem, stream), kernel, args)

namespace emu {

// Reports a fault of the running CUDA thread and ends the device process.
[[noreturn]] inline void fault(const std::string& what) {
  std::fprintf(stderr, "emulator: thread (%u,%u,%u) of block (%u,%u,%u): %s\n", threadIdx.x, threadIdx.y, threadIdx.z,
               blockIdx.x, blockIdx.y, blockIdx.z, what.c_str());
  std::fflush(stderr);
  std::_Exit(70);
}

// A reusable barrier for the threads of one block. Every arrival names its site (the line of the
// __syncthreads, or kExit when the thread finished the kernel): threads meeting at different sites
// are a barrier divergence, which is undefined behaviour on the GPU and an error here.
class Barrier {
 public:
  static constexpr int kExit = -1;
  explicit Barrier(unsigned n, std::function<void()> on_block_end) : n_(n), on_block_end_(std::move(on_block_end)) {}

  void arrive(int site) {
    const unsigned phase = phase_.load(std::memory_order_acquire);
    int first = kNone;
    if (!site_.compare_exchange_strong(first, site, std::memory_order_acq_rel) && first != site) {
      auto where = [](int s) { return s == kExit ? std::string("the kernel's end") : "line " + std::to_string(s); };
      fault("barrier divergence: at " + where(site) + " while another thread of the block is at " + where(first) +
            " (lines of the file with the __syncthreads)");
    }
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      site_.store(kNone, std::memory_order_relaxed);
      if (site == kExit) on_block_end_();
      phase_.store(phase + 1, std::memory_order_release);
      phase_.notify_all();
    } else {
      for (unsigned p = phase; p == phase; p = phase_.load(std::memory_order_acquire)) phase_.wait(p);
    }
  }

 private:
  static constexpr int kNone = -2;
  const unsigned n_;
  std::function<void()> on_block_end_;
  std::atomic<unsigned> count_{0}, phase_{0};
  std::atomic<int> site_{kNone};
};

// FASTPEFT_CUDA_EMU_FAULT=<name> injects a fault, to check the checks (tests/test_cuda_emu.py)
inline bool injected(const char* name) {
  const char* f = std::getenv("FASTPEFT_CUDA_EMU_FAULT");
  return f != nullptr && std::strcmp(f, name) == 0;
}

inline Barrier* block_barrier = nullptr;  // of the running launch (launches are serialized)
inline const bool no_barriers = injected("no_barriers");  // __syncthreads does nothing
inline void sync_threads(int line) {
  if (!no_barriers) block_barrier->arrive(line);
}

// Block-shared memory. The build declares each __shared__ array under another name (its
// "prototype", never used) and binds the real name to shared_memory(prototype): one heap
// allocation of the array's exact size per declaration, so AddressSanitizer reports overflows.
// It is filled with 0xFF bytes, a NaN in every float type, before every block: a read of shared
// memory the block did not write yields NaN.
inline std::mutex shared_mutex;
inline std::map<const void*, std::pair<void*, size_t>> shared_arrays;  // by prototype

template <typename A> A& shared_memory(A& prototype, size_t align) {
  std::lock_guard<std::mutex> lock(shared_mutex);
  auto& [p, bytes] = shared_arrays[&prototype];
  if (p == nullptr) {
    bytes = sizeof(A);
    if (posix_memalign(&p, std::max<size_t>({align, alignof(A), sizeof(void*)}), bytes) != 0) std::abort();
    std::memset(p, 0xFF, bytes);
  }
  return *static_cast<A*>(p);
}

inline void fill_shared_memory() {
  std::lock_guard<std::mutex> lock(shared_mutex);
  for (auto& [prototype, array] : shared_arrays) std::memset(array.first, 0xFF, array.second);
}

struct Config {
  dim3 grid, block;
  Config(dim3 g, dim3 b, size_t dynamic_smem = 0, cudaStream_t = nullptr) : grid(g), block(b) {
    if (dynamic_smem != 0) last_error = cudaErrorInvalidConfiguration;  // csrc uses static shared memory only
  }
};

// Runs the grid: every block in turn, with one OS thread per CUDA thread.
inline void run_grid(const Config& c, const std::function<void()>& kernel) {
  static std::mutex serial;
  std::lock_guard<std::mutex> lock(serial);
  const unsigned long long threads = 1ull * c.block.x * c.block.y * c.block.z;
  const bool ok = threads >= 1 && threads <= 1024 && c.block.z <= 64 && c.grid.x >= 1 && c.grid.y >= 1 &&
                  c.grid.z >= 1 && c.grid.x <= 0x7FFFFFFFu && c.grid.y <= 65535 && c.grid.z <= 65535;
  if (!ok) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  blockDim = c.block;
  gridDim = c.grid;
  if (std::getenv("FASTPEFT_CUDA_EMU_TRACE")) {
    std::fprintf(stderr, "emulator: launch grid (%u,%u,%u) block (%u,%u,%u)\n", c.grid.x, c.grid.y, c.grid.z, c.block.x,
                 c.block.y, c.block.z);
  }
  fill_shared_memory();
  Barrier barrier(static_cast<unsigned>(threads), fill_shared_memory);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = dim3(t % c.block.x, t / c.block.x % c.block.y, t / (c.block.x * c.block.y));
      for (unsigned z = 0; z < c.grid.z; ++z)
        for (unsigned y = 0; y < c.grid.y; ++y)
          for (unsigned x = 0; x < c.grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            kernel();
            barrier.arrive(Barrier::kExit);
          }
    });
  }
  for (auto& th : pool) th.join();
  block_barrier = nullptr;
}

template <typename... P, typename... A> void launch(const Config& c, void (*kernel)(P...), A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // converted as a real launch does
  run_grid(c, [&] { std::apply(kernel, params); });
}

}  // namespace emu
