// CUDA on CPU threads: just enough of the CUDA language and runtime to
// compile csrc/cuda/kernels.cu, unmodified, with a host C++20 compiler and run
// its kernels (see README.md).
//
//   * The threads of a block are OS threads (a pool of std::thread reused from
//     block to block); __syncthreads is a std::barrier of the block's threads.
//   * Warp shuffles: each lane writes its value to a per-warp slot, waits on
//     the warp's barrier (FutexBarrier: std::barrier's interface, one futex
//     each) and reads its partner's slot (two slot buffers used alternately,
//     so one barrier per shuffle is enough).
//   * __shared__ is `static`: one instance per kernel instantiation, which all
//     threads of the running block share. Blocks run one after another (a
//     barrier of all the block's threads separates them), so one instance at a
//     time is in use, as one block's shared memory on a GPU.
//   * A thread that returns leaves its block's and warp's barriers
//     (arrive_and_drop), as exited threads no longer count on a GPU.
//   * Misuse that a GPU would not forgive is counted by emu::error(): launch
//     configurations out of range, a shuffle whose mask names an exited lane
//     or a lane that is not at the same shuffle, a mask that omits the caller.
//   * Streams are ignored: every launch runs to completion before returning.
//
// The shims include/cuda_runtime.h, include/cuda_fp16.h and
// include/cuda_bf16.h include this header, so the kernels' own #includes
// find it first on the include path.
#pragma once

#include <math.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <atomic>
#include <barrier>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------- keywords --

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static const
#define __managed__
#define __CUDACC_EMULATION__ 1

// ------------------------------------------------------------------- types --

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
};

// Built-in variables: per thread.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace emu {

// ------------------------------------------------------------------ errors --

struct ErrorLog {
  std::atomic<long> count{0};
  std::mutex mu;
  std::vector<std::string> first;
};

inline ErrorLog& error_log() {
  static ErrorLog log;
  return log;
}

// Records a misuse (the first 20 messages are kept, all are counted).
inline void error(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  ErrorLog& log = error_log();
  log.count.fetch_add(1);
  std::lock_guard<std::mutex> lock(log.mu);
  if (log.first.size() < 20) log.first.emplace_back(buf);
}

inline long error_count() { return error_log().count.load(); }

inline void reset_errors() {
  ErrorLog& log = error_log();
  std::lock_guard<std::mutex> lock(log.mu);
  log.count.store(0);
  log.first.clear();
}

inline std::vector<std::string> error_messages() {
  ErrorLog& log = error_log();
  std::lock_guard<std::mutex> lock(log.mu);
  return log.first;
}

inline thread_local cudaError_t last_error = cudaSuccess;

// Multiprocessor count the emulated device reports (set before the first
// launch: kernels.cu caches it).
inline std::atomic<int>& sm_count() {
  static std::atomic<int> v{1};
  return v;
}

// Counters of what ran.
inline std::atomic<long>& launches() {
  static std::atomic<long> v{0};
  return v;
}
inline std::atomic<long>& blocks_run() {
  static std::atomic<long> v{0};
  return v;
}

// ----------------------------------------------------------------- runtime --

constexpr int kWarp = 32;

// A barrier with std::barrier's arrive_and_wait / arrive_and_drop, for the
// warps and the pool's hand-offs: one futex per object (libstdc++ 12's
// std::barrier waits on a shared, hashed waiter pool, so that barriers wake
// each other's waiters; fine for __syncthreads, too slow for 10 shuffles a
// warp). Happens-before comes from the acquire / release atomics.
class FutexBarrier {
 public:
  // on_complete(ctx) runs on the last arriving thread, before the others go
  // on (as std::barrier's completion function).
  explicit FutexBarrier(int n, void (*on_complete)(void*) = nullptr, void* ctx = nullptr)
      : remaining_(n), expected_(n), on_complete_(on_complete), ctx_(ctx) {}
  void arrive_and_wait() {
    const int g = gen_.load(std::memory_order_acquire);
    if (arrive(1)) return;
    while (gen_.load(std::memory_order_acquire) == g) wait(g);
  }
  void arrive_and_drop() { arrive(1, /*drop=*/true); }

 private:
  // Returns true when this arrival completed the phase.
  bool arrive(int, bool drop = false) {
    if (drop) expected_.fetch_sub(1, std::memory_order_relaxed);
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) != 1) return false;
    if (on_complete_ != nullptr) on_complete_(ctx_);
    remaining_.store(expected_.load(std::memory_order_relaxed), std::memory_order_relaxed);
    gen_.fetch_add(1, std::memory_order_acq_rel);
    wake();
    return true;
  }
#if defined(__linux__)
  void wait(int g) {
    syscall(SYS_futex, reinterpret_cast<int*>(&gen_), FUTEX_WAIT_PRIVATE, g, nullptr, nullptr, 0);
  }
  void wake() {
    syscall(SYS_futex, reinterpret_cast<int*>(&gen_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
  }
#else
  void wait(int g) { gen_.wait(g, std::memory_order_acquire); }
  void wake() { gen_.notify_all(); }
#endif
  std::atomic<int> gen_{0};
  std::atomic<int> remaining_;
  std::atomic<int> expected_;
  void (*on_complete_)(void*);
  void* ctx_;
};
static_assert(sizeof(std::atomic<int>) == sizeof(int), "futex word");

struct alignas(64) Warp {
  std::unique_ptr<FutexBarrier> bar;
  std::atomic<uint32_t> exited{0};  // lanes that returned
  std::atomic<uint64_t> exit_at[kWarp];  // shuffles a lane had done when it returned
  int lanes = 0;                    // lanes in this warp (the last may be partial)
  uint64_t slot[2][kWarp] = {};     // shuffle values (bit copies)
  uint64_t seq[2][kWarp] = {};      // the shuffle number each lane wrote
};

// Per thread: position in the warp and the number of shuffles so far.
struct ThreadState {
  int tid = 0;  // linear thread index in the block
  int warp = 0;
  int lane = 0;
  uint64_t shuffles = 0;
};
inline thread_local ThreadState tstate;

class Runtime {
 public:
  static Runtime& get() {
    static Runtime rt;
    return rt;
  }

  // Runs body() on every thread of every block of the grid; returns when all
  // are done.
  void run(dim3 grid, dim3 block, const std::function<void()>& body) {
    std::lock_guard<std::mutex> lock(launch_mu_);
    const int nthreads = int(block.x * block.y * block.z);
    ensure_pool(nthreads);
    grid_ = grid;
    block_ = block;
    body_ = &body;
    reset_block();
    start_->arrive_and_wait();  // workers run every block
    done_->arrive_and_wait();
    body_ = nullptr;
  }

  void syncthreads() { sync_->arrive_and_wait(); }

  Warp& warp(int w) { return warps_[size_t(w)]; }

  ~Runtime() {
    if (!workers_.empty()) {
      quit_ = true;
      start_->arrive_and_wait();
      for (auto& t : workers_) t.join();
    }
  }

 private:
  Runtime() = default;

  void ensure_pool(int n) {
    if (n == nthreads_) return;
    if (!workers_.empty()) {
      quit_ = true;
      start_->arrive_and_wait();
      for (auto& t : workers_) t.join();
      workers_.clear();
      quit_ = false;
    }
    nthreads_ = n;
    nwarps_ = (n + kWarp - 1) / kWarp;
    warps_ = std::vector<Warp>(size_t(nwarps_));
    for (int w = 0; w < nwarps_; ++w) {
      warps_[size_t(w)].lanes = std::min(kWarp, n - w * kWarp);
    }
    start_ = std::make_unique<FutexBarrier>(n + 1);
    done_ = std::make_unique<FutexBarrier>(n + 1);
    block_end_ = std::make_unique<FutexBarrier>(
        n, [](void* rt) { static_cast<Runtime*>(rt)->reset_block(); }, this);
    workers_.reserve(size_t(n));
    for (int t = 0; t < n; ++t) workers_.emplace_back([this, t] { worker(t); });
  }

  // Fresh barriers for the next block (a thread that returned has left them).
  void reset_block() {
    sync_ = std::make_unique<std::barrier<>>(nthreads_);
    for (auto& w : warps_) {
      w.bar = std::make_unique<FutexBarrier>(w.lanes);
      w.exited.store(0, std::memory_order_relaxed);
      for (auto& e : w.exit_at) e.store(UINT64_MAX, std::memory_order_relaxed);
      std::memset(w.seq, 0, sizeof(w.seq));
    }
  }

  void worker(int t) {
    for (;;) {
      start_->arrive_and_wait();
      if (quit_) return;
      const dim3 b = block_, g = grid_;
      threadIdx = uint3{unsigned(t) % b.x, (unsigned(t) / b.x) % b.y, unsigned(t) / (b.x * b.y)};
      blockDim = b;
      gridDim = g;
      const uint64_t nblocks = uint64_t(g.x) * g.y * g.z;
      for (uint64_t i = 0; i < nblocks; ++i) {
        blockIdx = uint3{unsigned(i % g.x), unsigned((i / g.x) % g.y), unsigned(i / (uint64_t(g.x) * g.y))};
        tstate = ThreadState{t, t / kWarp, t % kWarp, 0};
        (*body_)();
        // The thread has exited: it no longer counts at the barriers.
        Warp& w = warps_[size_t(tstate.warp)];
        w.exit_at[tstate.lane].store(tstate.shuffles);
        w.exited.fetch_or(1u << tstate.lane);
        w.bar->arrive_and_drop();
        sync_->arrive_and_drop();
        if (t == 0) blocks_run().fetch_add(1, std::memory_order_relaxed);
        block_end_->arrive_and_wait();
      }
      done_->arrive_and_wait();
    }
  }

  std::mutex launch_mu_;
  int nthreads_ = 0, nwarps_ = 0;
  std::vector<std::thread> workers_;
  std::vector<Warp> warps_;
  std::unique_ptr<FutexBarrier> start_, done_, block_end_;
  std::unique_ptr<std::barrier<>> sync_;  // __syncthreads
  dim3 grid_, block_;
  const std::function<void()>* body_ = nullptr;
  bool quit_ = false;
};

// ------------------------------------------------------------------ launch --

struct LaunchConfig {
  dim3 grid, block;
  size_t shmem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr)
      : grid(g), block(b), shmem(s), stream(st) {}
};

inline bool valid(const LaunchConfig& c) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  return c.grid.x >= 1 && c.grid.x <= 0x7fffffffu && c.grid.y >= 1 && c.grid.y <= 65535 &&
         c.grid.z >= 1 && c.grid.z <= 65535 && c.block.x >= 1 && c.block.y >= 1 &&
         c.block.z >= 1 && c.block.x <= 1024 && c.block.y <= 1024 && c.block.z <= 64 &&
         threads <= 1024 && c.shmem == 0;  // no kernel here uses dynamic shared memory
}

// kernel<<<grid, block, shmem, stream>>>(args...) is rewritten (at build
// time, in a copy of kernels.cu) into launch(kernel, LaunchConfig(grid,
// block, shmem, stream), args...).
template <class... P, class... A>
void launch(void (*kernel)(P...), LaunchConfig cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  if (!valid(cfg)) {
    error("invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u) shmem %zu", cfg.grid.x,
          cfg.grid.y, cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z, cfg.shmem);
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  launches().fetch_add(1, std::memory_order_relaxed);
  // The arguments as the kernel takes them (by value), read by every thread.
  std::tuple<std::remove_cv_t<std::remove_reference_t<P>>...> params(std::forward<A>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  Runtime::get().run(cfg.grid, cfg.block, body);
}

// ----------------------------------------------------------------- shuffles --

template <class T>
T shuffle(unsigned mask, T v, int src_lane, int width, const char* what) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  ThreadState& ts = tstate;
  Warp& w = Runtime::get().warp(ts.warp);
  const int buf = int(ts.shuffles & 1);
  ++ts.shuffles;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[buf][ts.lane] = bits;
  w.seq[buf][ts.lane] = ts.shuffles;
  w.bar->arrive_and_wait();
  if (((mask >> ts.lane) & 1u) == 0) error("%s: lane %d calls with a mask 0x%08x without it", what, ts.lane, mask);
  // Lanes of the mask that returned before this shuffle (a lane that
  // returns after it, while this one still runs, took part).
  if (const uint32_t exited = w.exited.load() & mask) {
    uint32_t early = 0;
    for (int l = 0; l < kWarp; ++l)
      if (((exited >> l) & 1u) && w.exit_at[l].load() < ts.shuffles) early |= 1u << l;
    if (early) error("%s: mask 0x%08x names exited lanes 0x%08x", what, mask, early);
  }
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) error("%s: width %d", what, width);
  // Lanes outside [segment start, segment start + width) read their own value.
  const int seg = ts.lane / width * width;
  if (src_lane < seg || src_lane >= seg + width || src_lane >= w.lanes) return v;
  if (((mask >> src_lane) & 1u) == 0) {
    error("%s: lane %d reads lane %d outside the mask 0x%08x", what, ts.lane, src_lane, mask);
    return v;
  }
  if (w.seq[buf][src_lane] != ts.shuffles) {
    error("%s: lane %d (shuffle %llu) reads lane %d at shuffle %llu", what, ts.lane,
          (unsigned long long)ts.shuffles, src_lane, (unsigned long long)w.seq[buf][src_lane]);
  }
  T out;
  std::memcpy(&out, &w.slot[buf][src_lane], sizeof(T));
  return out;
}

}  // namespace emu

// ------------------------------------------------------------- intrinsics --

inline void __syncthreads() { emu::Runtime::get().syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  (void)mask;
  emu::Runtime::get().warp(emu::tstate.warp).bar->arrive_and_wait();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  const int lane = emu::tstate.lane;
  return emu::shuffle(mask, v, lane / width * width + (src % width), width, "__shfl_sync");
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return emu::shuffle(mask, v, emu::tstate.lane + int(delta), width, "__shfl_down_sync");
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return emu::shuffle(mask, v, emu::tstate.lane - int(delta), width, "__shfl_up_sync");
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return emu::shuffle(mask, v, emu::tstate.lane ^ lane_mask, width, "__shfl_xor_sync");
}

template <class T>
T __ldg(const T* p) {
  return *p;
}

inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline double rsqrt(double v) { return 1.0 / sqrt(v); }
inline float __expf(float v) { return expf(v); }
inline float __fdividef(float a, float b) { return a / b; }

template <class T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <class T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> r(*p);
  T old = r.load();
  while (old < v && !r.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T>
T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}

inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof(d));
  return d;
}
inline long long __double_as_longlong(double d) {
  long long v;
  std::memcpy(&v, &d, sizeof(v));
  return v;
}
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
}
inline int __float_as_int(float f) {
  int v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
}

// ------------------------------------------------------------ fp16, bf16 --
// Conversions written from the formats' definitions (independent of the CPU
// kernels' bit tricks): round to nearest even, overflow to inf, NaN to the
// canonical NaN as CUDA does (0x7fff).

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
using half = __half;
using nv_bfloat16 = __nv_bfloat16;

inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }

inline float __half2float(__half h) {
  const int sign = h.x >> 15, e = (h.x >> 10) & 31, f = h.x & 1023;
  float v;
  if (e == 0) {
    v = std::ldexp(float(f), -24);
  } else if (e == 31) {
    v = f != 0 ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(float(1024 + f), e - 25);
  }
  return sign ? -v : v;
}

inline __half __float2half_rn(float f) {
  if (std::isnan(f)) return __half{0x7fff};
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(double(f));
  // a = q * 2^-24 for subnormals; otherwise scale to an 11-bit significand.
  if (a >= 65520.0) return __half{uint16_t(sign | 0x7c00)};  // rounds to inf
  int e;
  std::frexp(a, &e);  // a = s * 2^e, s in [0.5, 1)
  int exp = e - 1;    // a = 1.x * 2^exp
  if (exp < -14) exp = -14;  // subnormal range: quantum 2^-24
  const double quantum = std::ldexp(1.0, exp - 10);
  const double q = std::nearbyint(a / quantum);  // ties to even (default rounding mode)
  const double r = q * quantum;                  // exact
  // Encode r.
  if (r == 0.0) return __half{sign};
  int re;
  std::frexp(r, &re);
  int rexp = re - 1;
  if (rexp < -14) {  // subnormal
    return __half{uint16_t(sign | uint16_t(std::ldexp(r, 24)))};
  }
  const unsigned mant = unsigned(std::ldexp(r, 10 - rexp)) - 1024u;
  return __half{uint16_t(sign | unsigned(rexp + 15) << 10 | mant)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  if (std::isnan(f)) return __nv_bfloat16{0x7fff};
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t lsb = (u >> 16) & 1u;
  return __nv_bfloat16{uint16_t((u + 0x7fffu + lsb) >> 16)};
}

inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// --------------------------------------------------------------- runtime --

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error; }
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = emu::sm_count().load(); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaError";
  }
}
