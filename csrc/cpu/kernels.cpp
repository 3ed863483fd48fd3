// CPU implementation of the kernels declared in keras_residual/kernels.h.
//
// Layout of the work:
//   NHWC  the tensor is m = n * hw rows of c contiguous channels. Threads take
//         contiguous ranges of rows; inner loops run over the channels (the
//         contiguous dimension) with per-channel parameter arrays, so they
//         vectorise. Reductions keep per-thread per-channel accumulators that
//         are combined, in thread order, at the end.
//   NCHW  the tensor is n * c planes of hw contiguous values of one channel.
//         Threads take contiguous ranges of channels and walk their n planes;
//         reductions keep per-value accumulators folded once per channel.
// Results are deterministic for a given thread count.
//
// Numerics: values are converted to the parameter type (float, or double for
// float64) in registers; reductions accumulate in the parameter type over at
// most kFoldEvery (16) values per accumulator, then in double. The statistics are
// accumulated around a per-channel shift (the channel's first value), so that
// data with a large offset keeps its variance ("shifted data" algorithm).
// float16 and bfloat16 are converted with branch-free bit manipulation and
// rounded to nearest even on store; their batch-norm backward recomputes g
// in its second pass instead of reading it back rounded. NaN and +-inf come
// out where the composite path puts them (kernels.h: Act, GradRule).
//
// Threads: the runner an adapter installed (set_parallel_runner: the torch
// adapter uses torch's intra-op pool), else a plain std::thread fork/join per
// call (no pool of our own that would have to survive a fork()). Small
// tensors run on the calling thread.

// GCC keeps loops whose floating-point operations depend on a comparison (the
// relu family's gradients, the float16 conversions) scalar while it assumes
// that floating-point exceptions can trap; nothing here reads the exception
// flags. Set before the includes, so that the inline functions of the
// standard headers get the same options and still inline.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "../include/keras_residual/kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define KR_RESTRICT __restrict__
#define KR_INLINE inline __attribute__((always_inline))
#else
#define KR_RESTRICT
#define KR_INLINE inline
#endif

namespace keras_residual {

const char* version() { return "keras_residual kernels 0.1.0"; }

namespace cpu {
namespace {

// ---------------------------------------------------------------- storage --

KR_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

KR_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE half -> float, exact, branch free (normal, subnormal, inf, NaN).
KR_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized));
  return bits_float(result);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN kept quiet.
KR_INLINE uint16_t float_to_half(float f) {
  float base = (bits_float(float_bits(f) & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

KR_INLINE float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

// float -> bfloat16, round to nearest even, NaN kept quiet.
KR_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

struct F32 {
  using S = float;   // storage
  using P = float;   // parameter / arithmetic type
  static KR_INLINE P load(S v) { return v; }
  static KR_INLINE S store(P v) { return v; }
};
struct F64 {
  using S = double;
  using P = double;
  static KR_INLINE P load(S v) { return v; }
  static KR_INLINE S store(P v) { return v; }
};
struct F16 {
  using S = uint16_t;
  using P = float;
  static KR_INLINE P load(S v) { return half_to_float(v); }
  static KR_INLINE S store(P v) { return float_to_half(v); }
};
struct BF16 {
  using S = uint16_t;
  using P = float;
  static KR_INLINE P load(S v) { return bf16_to_float(v); }
  static KR_INLINE S store(P v) { return float_to_bf16(v); }
};

// ------------------------------------------------------------ activations --

// exp and the normal CDF for the float paths, written without calls or
// branches so that silu and gelu loops vectorise, from Cephes' expf
// polynomial (relative error < 1e-7) on r = x - n ln 2, times 2^n.
//   exp_float<true> (exp_approx) applies 2^n as two normal factors, so that
//     it over- and underflows (to inf, subnormals and 0) where float32's exp
//     does: -inf / exp(inf) (silu) and inf * exp(-inf) (gelu') are then NaN
//     as on the composite path, and an inf gradient meets a zero where the
//     composite path has one. NaN propagates.
//   exp_float<false> clamps x to [-88, 88], where 2^n is 2^-127, whose bits
//     are 0: it flushes to 0 below -87.7 (instead of subnormals) at no cost.
//     For the CDF's tail (x < 0), which is then 0 where float32's is 0 or
//     subnormal: one multiply fewer in gelu's forward.
// The CDF comes from erfc by the Chebyshev fit of Numerical Recipes (erfcc,
// fractional error < 1.2e-7), so its absolute error stays below 2e-7.
// float64 uses the C library.
template <bool kFullRange>
KR_INLINE float exp_float(float x) {
  if constexpr (kFullRange) {
    x = x < -104.0f ? -104.0f : x;  // exp(-104) rounds to 0
    x = x > 89.0f ? 89.0f : x;      // exp(89) overflows
  } else {
    x = x < -88.0f ? -88.0f : x;  // n = -127: a factor of +0
    x = x > 88.0f ? 88.0f : x;
  }
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fn);
  if constexpr (kFullRange) {
    const int32_t n1 = n >> 1;  // n in [-150, 128]: 2^n = 2^n1 * 2^(n - n1), both normal
    return (y * bits_float(static_cast<uint32_t>(n1 + 127) << 23)) *
           bits_float(static_cast<uint32_t>(n - n1 + 127) << 23);
  } else {
    return y * bits_float(static_cast<uint32_t>(n + 127) << 23);
  }
}
KR_INLINE float exp_approx(float x) { return exp_float<true>(x); }
KR_INLINE double exp_approx(double x) { return std::exp(x); }

KR_INLINE float normal_cdf(float z) {
  const float u = bits_float(float_bits(z) & 0x7FFFFFFFu) * 0.70710678118654752440f;  // |z| / sqrt(2)
  const float t = 1.0f / (1.0f + 0.5f * u);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float tail = 0.5f * t * exp_float<false>(p - u * u);  // P(N > |z|)
  return z > 0.0f ? 1.0f - tail : tail;
}
KR_INLINE double normal_cdf(double z) { return 0.5 * std::erfc(-z * 0.70710678118654752440); }

// Non-finite values as on the composite path (kernels.h): the comparisons
// are ordered so that NaN, for which every comparison is false, falls
// through to z itself (relu, leaky_relu, relu6); silu and
// gelu give NaN at -inf (-inf / inf, -inf * 0) and their derivatives NaN at
// +-inf (inf * 0), as z * sigmoid(z) and z * Phi(z) do.
template <Activation A, typename P>
KR_INLINE P act_forward(P z, P alpha) {
  if constexpr (A == Activation::kLinear) {
    return z;
  } else if constexpr (A == Activation::kRelu) {
    return z < P(0) ? P(0) : z;
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z < P(0) ? alpha * z : z;
  } else if constexpr (A == Activation::kRelu6) {
    const P r = z < P(0) ? P(0) : z;
    return r > P(6) ? P(6) : r;
  } else if constexpr (A == Activation::kSilu) {
    return z / (P(1) + exp_approx(-z));
  } else {  // kGelu, exact: z * Phi(z)
    return z * normal_cdf(z);
  }
}

// d act / d z (the relu family: its kMultiply value, act'(NaN) = 0).
template <Activation A, typename P>
KR_INLINE P act_grad(P z, P alpha) {
  if constexpr (A == Activation::kLinear) {
    return P(1);
  } else if constexpr (A == Activation::kRelu) {
    return z > P(0) ? P(1) : P(0);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > P(0) ? P(1) : alpha;
  } else if constexpr (A == Activation::kRelu6) {
    return (z > P(0) && z < P(6)) ? P(1) : P(0);
  } else if constexpr (A == Activation::kSilu) {
    const P s = P(1) / (P(1) + exp_approx(-z));
    return s * (P(1) + z * (P(1) - s));
  } else {  // kGelu: Phi(z) + z * phi(z)
    const P pdf = exp_approx(P(-0.5) * z * z) * P(0.39894228040143267794);
    return normal_cdf(z) + z * pdf;
  }
}

// dy * act'(z) under GradRule R (kernels.h): kMultiply, TensorFlow's
// formulas (relu, relu6: the zero regions give dy * 0, and z = NaN is in
// them; gelu: dy * Phi(z) + (dy * z) * phi(z), as TensorFlow differentiates
// 0.5 * z * (1 + erf(z / sqrt(2))), which differs for an inf dy only);
// kSelect, PyTorch's (the zero regions give 0; z = NaN passes dy through
// relu, not through relu6; gelu dy * gelu'(z)); kTermwise, JAX's (relu and
// relu6 select, z = NaN gives 0; leaky_relu passes dy at z = 0; silu and
// gelu term by term).
template <Activation A, typename P, GradRule R = GradRule::kSelect>
KR_INLINE P act_backward(P dy, P z, P alpha) {
  constexpr bool kMul = R == GradRule::kMultiply;
  constexpr bool kTerm = R == GradRule::kTermwise;
  if constexpr (A == Activation::kLinear) {
    return dy;
  } else if constexpr (A == Activation::kRelu) {
    if constexpr (kMul) return z > P(0) ? dy : dy * P(0);
    if constexpr (kTerm) return z > P(0) ? dy : P(0);
    return z <= P(0) ? P(0) : dy;
  } else if constexpr (A == Activation::kLeakyRelu) {
    if constexpr (kTerm) return z >= P(0) ? dy : dy * alpha;
    return z > P(0) ? dy : dy * alpha;
  } else if constexpr (A == Activation::kRelu6) {
    return (z > P(0) && z < P(6)) ? dy : (kMul ? dy * P(0) : P(0));
  } else if constexpr (A == Activation::kSilu && kTerm) {
    const P s = P(1) / (P(1) + exp_approx(-z));
    return dy * s + (dy * z) * (s * (P(1) - s));
  } else if constexpr (A == Activation::kGelu && (kMul || kTerm)) {
    const P pdf = exp_approx(P(-0.5) * z * z) * P(0.39894228040143267794);
    return dy * normal_cdf(z) + (dy * z) * pdf;
  } else {
    return dy * act_grad<A, P>(z, alpha);
  }
}

// ---------------------------------------------------------------- threads --

std::atomic<int> g_num_threads{0};

int max_threads() {
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n <= 0) {
    n = static_cast<int>(std::thread::hardware_concurrency());
    if (n <= 0) n = 1;
  }
  return n;
}

// Below this many elements per thread, another thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 15;

// Number of threads for `tasks` units of `work_per_task` elements each.
int plan_threads(int64_t tasks, int64_t work_per_task) {
  if (tasks <= 1) return 1;
  const int64_t total = tasks * std::max<int64_t>(work_per_task, 1);
  int64_t nt = std::min<int64_t>(max_threads(), total / kMinElementsPerThread);
  nt = std::min<int64_t>(nt, tasks);
  return static_cast<int>(std::max<int64_t>(nt, 1));
}

std::atomic<ParallelRunner> g_runner{nullptr};

// Calls f(begin, end, thread_index) for nt contiguous slices of [0, tasks):
// on the runner an adapter installed, else slice 0 on the calling thread and
// the others on std::threads forked for the call (a slice whose thread cannot
// be started runs on the calling thread instead).
template <class F>
void parallel_for(int64_t tasks, int nt, const F& f) {
  if (nt <= 1) {
    f(int64_t(0), tasks, 0);
    return;
  }
  auto begin_of = [&](int t) { return tasks * t / nt; };
  auto slice = [&](int t) { f(begin_of(t), begin_of(t + 1), t); };
  if (ParallelRunner runner = g_runner.load(std::memory_order_acquire)) {
    runner(nt, &slice, [](void* ctx, int t) { (*static_cast<decltype(slice)*>(ctx))(t); });
    return;
  }
  std::vector<std::thread> threads;
  std::vector<int> not_started;
  threads.reserve(nt - 1);
  for (int t = 1; t < nt; ++t) {
    try {
      threads.emplace_back([&slice, t] { slice(t); });
    } catch (...) {
      not_started.push_back(t);
    }
  }
  slice(0);
  for (int t : not_started) slice(t);
  for (auto& th : threads) th.join();
}


// ------------------------------------------------------------------ tiles --
//
// The dtype-specific work (conversions, pointer arithmetic, threads) is kept
// apart from the arithmetic: the arithmetic runs on tiles of at most kTile
// values of the parameter type P, with per-value parameter and accumulator
// arrays indexed like the values. Tile functions are instantiated once per
// (P, activation, residual) and reached through a function pointer, so the
// float16 and bfloat16 paths reuse the float32 arithmetic: their tiles are
// converted into stack buffers first. float32 and float64 tiles point straight
// into the tensors.

constexpr int64_t kTile = 1024;

// Sum of a[0, len), in kLanes independent partial sums (vectorisable).
constexpr int kLanes = 8;
inline double fold(const double* KR_RESTRICT a, int64_t len) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l];
  }
  for (; i < len; ++i) lanes[0] += a[i];
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// Tiles add into accumulators of the parameter type P, which are added into
// double accumulators (and zeroed) every kFoldEvery tiles: P sums of at most
// kFoldEvery values, then double sums. Accumulating every value in double
// took twice the time of the whole pass in float (the conversions and the
// double vectors of half the width), on a tile in cache.
constexpr int kFoldEvery = 16;

// dst[i] += src[i] for i in [0, len); src zeroed.
template <class P>
inline void fold_into(P* KR_RESTRICT src, double* KR_RESTRICT dst, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    dst[i] += double(src[i]);
    src[i] = P(0);
  }
}

// Cuts a tensor into tiles and hands each tile, with its parameter and
// accumulator arrays, to `tile`:
//   tile(int64_t offset, int64_t len, const P* const* params, P* const* acc, P* scratch)
// `params` are NP per-channel arrays of length c; `totals` are NA per-channel
// arrays of length c that receive, per channel, the sums of the accumulators
// (added into double every kFoldEvery tiles).
//   NHWC, c <= kTile: tiles of whole rows; parameters replicated across the
//     rows of a tile; per-thread accumulators folded per channel at the end.
//   NHWC, c > kTile: tiles are segments of a row.
//   NCHW: threads own channels; tiles are segments of the channel's planes;
//     parameters broadcast per channel; accumulators folded per channel.
//     (n, c, 1, 1) is handled as NHWC, which it is in memory.
template <class P, int NP, int NA, class Tile>
void for_each_tile(Shape s, const P* const* params, double* const* totals,
                   const Tile& tile) {
  if (s.size() == 0) return;
  if (s.hw == 1) s.channels_last = true;  // (n, c, 1, 1) is laid out as (n, 1, 1, c)
  const int64_t c = s.c, hw = s.hw, m = s.m();
  constexpr int kNA = NA > 0 ? NA : 1;
  constexpr int kNP = NP > 0 ? NP : 1;
  if (s.channels_last && c <= kTile) {
    const int64_t rows_per_tile = kTile / c;
    const int64_t width = rows_per_tile * c;
    std::vector<P> rep(size_t(kNP) * width);
    const P* prm[kNP] = {};
    for (int k = 0; k < NP; ++k) {
      P* dst = rep.data() + size_t(k) * width;
      for (int64_t i = 0; i < width; ++i) dst[i] = params[k][i % c];
      prm[k] = dst;
    }
    const int nt = plan_threads(m, c);
    std::vector<double> part(size_t(nt) * kNA * c, 0.0);
    parallel_for(m, nt, [&](int64_t r0, int64_t r1, int t) {
      const size_t acc_size = NA > 0 ? size_t(NA) * width : 0;
      std::vector<double> accv(acc_size, 0.0);
      std::vector<P> accp(acc_size, P(0));
      P* acc[kNA] = {};
      for (int k = 0; k < NA; ++k) acc[k] = accp.data() + size_t(k) * width;
      alignas(64) P scratch[kTile];
      int pending = 0;
      for (int64_t r = r0; r < r1; r += rows_per_tile) {
        const int64_t rows = std::min(rows_per_tile, r1 - r);
        tile(r * c, rows * c, prm, acc, scratch);
        if (NA > 0 && ++pending == kFoldEvery) {
          fold_into(accp.data(), accv.data(), int64_t(acc_size));
          pending = 0;
        }
      }
      if (NA > 0) fold_into(accp.data(), accv.data(), int64_t(acc_size));
      for (int k = 0; k < NA; ++k) {
        double* out = part.data() + (size_t(t) * kNA + k) * c;
        const double* in = accv.data() + size_t(k) * width;
        for (int64_t i = 0; i < width; ++i) out[i % c] += in[i];
      }
    });
    for (int t = 0; t < nt; ++t)
      for (int k = 0; k < NA; ++k)
        for (int64_t j = 0; j < c; ++j) totals[k][j] += part[(size_t(t) * kNA + k) * c + j];
  } else if (s.channels_last) {
    const int nt = plan_threads(m, c);
    std::vector<double> part(size_t(nt) * kNA * c, 0.0);
    parallel_for(m, nt, [&](int64_t r0, int64_t r1, int t) {
      double* accbase = part.data() + size_t(t) * kNA * c;
      const size_t acc_size = NA > 0 ? size_t(NA) * c : 0;
      std::vector<P> accp(acc_size, P(0));
      alignas(64) P scratch[kTile];
      int pending = 0;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j0 = 0; j0 < c; j0 += kTile) {
          const P* prm[kNP] = {};
          P* acc[kNA] = {};
          for (int k = 0; k < NP; ++k) prm[k] = params[k] + j0;
          for (int k = 0; k < NA; ++k) acc[k] = accp.data() + size_t(k) * c + j0;
          tile(r * c + j0, std::min(kTile, c - j0), prm, acc, scratch);
        }
        if (NA > 0 && ++pending == kFoldEvery) {
          fold_into(accp.data(), accbase, int64_t(acc_size));
          pending = 0;
        }
      }
      if (NA > 0) fold_into(accp.data(), accbase, int64_t(acc_size));
    });
    for (int t = 0; t < nt; ++t)
      for (int k = 0; k < NA; ++k)
        for (int64_t j = 0; j < c; ++j) totals[k][j] += part[(size_t(t) * kNA + k) * c + j];
  } else {
    // Threads own whole channels and walk their n planes, so that the
    // per-value accumulators are folded once per channel.
    const int64_t width = std::min(hw, kTile);
    const int nt = plan_threads(c, s.n * hw);
    parallel_for(c, nt, [&](int64_t c0, int64_t c1, int) {
      const size_t acc_size = NA > 0 ? size_t(NA) * width : 0;
      std::vector<P> bcast(size_t(kNP) * width);
      std::vector<double> accv(acc_size);
      std::vector<P> accp(acc_size, P(0));
      const P* prm[kNP] = {};
      P* acc[kNA] = {};
      for (int k = 0; k < NP; ++k) prm[k] = bcast.data() + size_t(k) * width;
      for (int k = 0; k < NA; ++k) acc[k] = accp.data() + size_t(k) * width;
      alignas(64) P scratch[kTile];
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int k = 0; k < NP; ++k) {
          std::fill_n(bcast.data() + size_t(k) * width, width, params[k][ch]);
        }
        if (NA > 0) std::fill(accv.begin(), accv.end(), 0.0);
        int pending = 0;
        for (int64_t b = 0; b < s.n; ++b) {
          const int64_t base = (b * c + ch) * hw;
          for (int64_t i0 = 0; i0 < hw; i0 += kTile) {
            tile(base + i0, std::min(kTile, hw - i0), prm, acc, scratch);
            if (NA > 0 && ++pending == kFoldEvery) {
              fold_into(accp.data(), accv.data(), int64_t(acc_size));
              pending = 0;
            }
          }
        }
        if (NA > 0) fold_into(accp.data(), accv.data(), int64_t(acc_size));
        for (int k = 0; k < NA; ++k) totals[k][ch] = fold(accv.data() + size_t(k) * width, width);
      }
    });
  }
}

// Conversions of a tile between storage and the parameter type.
template <class T>
void load_tile(const typename T::S* KR_RESTRICT src, typename T::P* KR_RESTRICT dst, int64_t len) {
  for (int64_t i = 0; i < len; ++i) dst[i] = T::load(src[i]);
}
template <class T>
void store_tile(const typename T::P* KR_RESTRICT src, typename T::S* KR_RESTRICT dst,
                int64_t len) {
  for (int64_t i = 0; i < len; ++i) dst[i] = T::store(src[i]);
}

// A tensor argument as P values: the tensor itself when S == P, else a tile
// converted into `buf`.
template <class T>
KR_INLINE const typename T::P* tile_in(const void* base, int64_t offset, int64_t len,
                                       typename T::P* buf) {
  using S = typename T::S;
  const S* src = static_cast<const S*>(base) + offset;
  if constexpr (std::is_same<S, typename T::P>::value) {
    (void)len;
    (void)buf;
    return src;
  } else {
    load_tile<T>(src, buf, len);
    return buf;
  }
}

// Where a tile's output goes: the tensor itself when S == P, else `buf`
// (then stored with tile_out_store).
template <class T>
KR_INLINE typename T::P* tile_out(void* base, int64_t offset, typename T::P* buf) {
  using S = typename T::S;
  if constexpr (std::is_same<S, typename T::P>::value) {
    (void)buf;
    return static_cast<S*>(base) + offset;
  } else {
    return buf;
  }
}
template <class T>
KR_INLINE void tile_out_store(void* base, int64_t offset, int64_t len,
                              const typename T::P* buf) {
  using S = typename T::S;
  if constexpr (!std::is_same<S, typename T::P>::value) {
    store_tile<T>(buf, static_cast<S*>(base) + offset, len);
  } else {
    (void)base, (void)offset, (void)len, (void)buf;
  }
}

// ---------------------------------------------------------- tile kernels --

// Statistics around the shift k: s += x - k, q += (x - k)^2.
template <class P>
void stats_tile(const P* KR_RESTRICT x, const P* KR_RESTRICT k, P* KR_RESTRICT s,
                P* KR_RESTRICT q, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const P d = x[i] - k[i];
    s[i] += d;
    q[i] += d * d;
  }
}

// y = act(x * a + b + r).
template <class P, Activation A, bool kRes>
void forward_tile(const P* KR_RESTRICT x, const P* KR_RESTRICT r, const P* KR_RESTRICT a,
                  const P* KR_RESTRICT b, P* KR_RESTRICT y, int64_t len, P alpha) {
  for (int64_t i = 0; i < len; ++i) {
    P z = x[i] * a[i] + b[i];
    if constexpr (kRes) z += r[i];
    y[i] = act_forward<A, P>(z, alpha);
  }
}

// g = dy * act'(x * a + b + r); dx = g * a; sgx += g * x; sg += g.
template <class P, Activation A, GradRule R, bool kRes>
void affine_backward_tile(const P* KR_RESTRICT dy, const P* KR_RESTRICT x,
                          const P* KR_RESTRICT r, const P* KR_RESTRICT a,
                          const P* KR_RESTRICT b, P* KR_RESTRICT g, P* KR_RESTRICT dx,
                          P* KR_RESTRICT sgx, P* KR_RESTRICT sg, int64_t len, P alpha) {
  for (int64_t i = 0; i < len; ++i) {
    const P xv = x[i];
    P z = xv * a[i] + b[i];
    if constexpr (kRes) z += r[i];
    const P gv = act_backward<A, P, R>(dy[i], z, alpha);
    g[i] = gv;
    dx[i] = gv * a[i];
    sgx[i] += gv * xv;
    sg[i] += gv;
  }
}

// Pass 1 of the batch-norm backward: g = dy * act'(x * a + b + r);
// sg += g; sgx += g * (x - mu).
template <class P, Activation A, GradRule R, bool kRes>
void bn_backward1_tile(const P* KR_RESTRICT dy, const P* KR_RESTRICT x, const P* KR_RESTRICT r,
                       const P* KR_RESTRICT a, const P* KR_RESTRICT b, const P* KR_RESTRICT mu,
                       P* KR_RESTRICT g, P* KR_RESTRICT sg, P* KR_RESTRICT sgx, int64_t len,
                       P alpha) {
  for (int64_t i = 0; i < len; ++i) {
    const P xv = x[i];
    P z = xv * a[i] + b[i];
    if constexpr (kRes) z += r[i];
    const P gv = act_backward<A, P, R>(dy[i], z, alpha);
    g[i] = gv;
    sg[i] += gv;
    sgx[i] += gv * (xv - mu[i]);
  }
}

// Pass 2 of the batch-norm backward: out = a * g + k * (x - mu) + b0.
template <class P>
void bn_backward2_tile(const P* KR_RESTRICT g, const P* KR_RESTRICT x, const P* KR_RESTRICT a,
                       const P* KR_RESTRICT k, const P* KR_RESTRICT b0, const P* KR_RESTRICT mu,
                       P* KR_RESTRICT out, int64_t len) {
  for (int64_t i = 0; i < len; ++i) out[i] = a[i] * g[i] + k[i] * (x[i] - mu[i]) + b0[i];
}
// The same with g read from, and dx written to, one array.
template <class P>
void bn_backward2_inplace_tile(P* KR_RESTRICT io, const P* KR_RESTRICT x, const P* KR_RESTRICT a,
                               const P* KR_RESTRICT k, const P* KR_RESTRICT b0,
                               const P* KR_RESTRICT mu, int64_t len) {
  for (int64_t i = 0; i < len; ++i) io[i] = a[i] * io[i] + k[i] * (x[i] - mu[i]) + b0[i];
}
// The same with g recomputed as in pass 1 (float16 / bfloat16, where a g
// stored in the tensor dtype would have been rounded):
//   g = dy * act'(x * a + b + r); out = a * g + k * (x - mu) + b0.
template <class P, Activation A, GradRule R, bool kRes>
void bn_backward2_recompute_tile(const P* KR_RESTRICT dy, const P* KR_RESTRICT x,
                                 const P* KR_RESTRICT r, const P* KR_RESTRICT a,
                                 const P* KR_RESTRICT b, const P* KR_RESTRICT k,
                                 const P* KR_RESTRICT b0, const P* KR_RESTRICT mu,
                                 P* KR_RESTRICT out, int64_t len, P alpha) {
  for (int64_t i = 0; i < len; ++i) {
    const P xv = x[i];
    P z = xv * a[i] + b[i];
    if constexpr (kRes) z += r[i];
    const P gv = act_backward<A, P, R>(dy[i], z, alpha);
    out[i] = a[i] * gv + k[i] * (xv - mu[i]) + b0[i];
  }
}

template <class P>
using ForwardFn = void (*)(const P*, const P*, const P*, const P*, P*, int64_t, P);
template <class P>
using AffineBackwardFn = void (*)(const P*, const P*, const P*, const P*, const P*, P*, P*, P*,
                                  P*, int64_t, P);
template <class P>
using BnBackward1Fn = void (*)(const P*, const P*, const P*, const P*, const P*, const P*, P*,
                               P*, P*, int64_t, P);
template <class P>
using BnBackward2Fn = void (*)(const P*, const P*, const P*, const P*, const P*, const P*,
                               const P*, const P*, P*, int64_t, P);

// The activation and the gradient rule, as compile-time values; only the
// rules that change an activation's gradient are instantiated for it.
template <Activation A, GradRule R = GradRule::kSelect>
struct ActTag {
  static constexpr Activation value = A;
  static constexpr GradRule rule = R;
};

template <class F>
void with_act(Act act, const F& f) {
  using A = Activation;
  using R = GradRule;
  const bool mul = act.grad_rule == R::kMultiply;
  const bool term = act.grad_rule == R::kTermwise;
  switch (act.kind) {
    case A::kLinear: return f(ActTag<A::kLinear>{});
    case A::kRelu:
      if (mul) return f(ActTag<A::kRelu, R::kMultiply>{});
      return term ? f(ActTag<A::kRelu, R::kTermwise>{}) : f(ActTag<A::kRelu>{});
    case A::kLeakyRelu:
      return term ? f(ActTag<A::kLeakyRelu, R::kTermwise>{}) : f(ActTag<A::kLeakyRelu>{});
    case A::kRelu6:  // kTermwise selects, as kSelect does
      return mul ? f(ActTag<A::kRelu6, R::kMultiply>{}) : f(ActTag<A::kRelu6>{});
    case A::kSilu: return term ? f(ActTag<A::kSilu, R::kTermwise>{}) : f(ActTag<A::kSilu>{});
    case A::kGelu:  // kTermwise differentiates gelu as kMultiply does
      return mul || term ? f(ActTag<A::kGelu, R::kMultiply>{}) : f(ActTag<A::kGelu>{});
  }
}

template <class P>
ForwardFn<P> forward_fn(Act act, bool res) {
  ForwardFn<P> fn = nullptr;
  with_act(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    fn = res ? &forward_tile<P, A, true> : &forward_tile<P, A, false>;
  });
  return fn;
}
template <class P>
AffineBackwardFn<P> affine_backward_fn(Act act, bool res) {
  AffineBackwardFn<P> fn = nullptr;
  with_act(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    constexpr GradRule M = decltype(a)::rule;
    fn = res ? &affine_backward_tile<P, A, M, true> : &affine_backward_tile<P, A, M, false>;
  });
  return fn;
}
template <class P>
BnBackward1Fn<P> bn_backward1_fn(Act act, bool res) {
  BnBackward1Fn<P> fn = nullptr;
  with_act(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    constexpr GradRule M = decltype(a)::rule;
    fn = res ? &bn_backward1_tile<P, A, M, true> : &bn_backward1_tile<P, A, M, false>;
  });
  return fn;
}
template <class P>
BnBackward2Fn<P> bn_backward2_recompute_fn(Act act, bool res) {
  BnBackward2Fn<P> fn = nullptr;
  with_act(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    constexpr GradRule M = decltype(a)::rule;
    fn = res ? &bn_backward2_recompute_tile<P, A, M, true>
             : &bn_backward2_recompute_tile<P, A, M, false>;
  });
  return fn;
}

// Per-channel parameter array, with nullptr replaced by `fill`.
template <class P>
const P* param_or(const void* p, int64_t c, P fill, std::vector<P>& storage) {
  if (p != nullptr) return static_cast<const P*>(p);
  storage.assign(size_t(c), fill);
  return storage.data();
}

// ---------------------------------------------------------------- kernels --

template <class T>
void batch_stats_impl(const void* x, Shape s, void* mean_, void* var_) {
  using S = typename T::S;
  using P = typename T::P;
  P* mean = static_cast<P*>(mean_);
  P* var = static_cast<P*>(var_);
  const int64_t c = s.c, m = s.m();
  if (c == 0) return;
  if (m == 0) {
    std::fill_n(mean, c, std::numeric_limits<P>::quiet_NaN());
    std::fill_n(var, c, std::numeric_limits<P>::quiet_NaN());
    return;
  }
  // Per-channel shift: the channel's first value, or 0 if that is not finite
  // (an inf shift would turn the channel's sums into NaN, where the plain
  // mean is +-inf; a NaN anywhere makes the sums NaN either way).
  const S* xs = static_cast<const S*>(x);
  std::vector<P> shift(c);
  for (int64_t j = 0; j < c; ++j) {
    const P first = T::load(xs[s.channels_last ? j : j * s.hw]);
    shift[j] = std::isfinite(first) ? first : P(0);
  }
  std::vector<double> sum(c, 0.0), sumsq(c, 0.0);
  const P* params[1] = {shift.data()};
  double* const totals[2] = {sum.data(), sumsq.data()};
  for_each_tile<P, 1, 2>(s, params, totals,
                         [&](int64_t o, int64_t len, const P* const* prm, P* const* acc,
                             P* scratch) {
                           const P* xv = tile_in<T>(x, o, len, scratch);
                           stats_tile<P>(xv, prm[0], acc[0], acc[1], len);
                         });
  const double inv_m = 1.0 / double(m);
  for (int64_t j = 0; j < c; ++j) {
    const double d = sum[j] * inv_m;
    const double v = sumsq[j] * inv_m - d * d;
    mean[j] = P(double(shift[j]) + d);
    // Rounding may leave v slightly below 0: clamp, but keep a NaN (a NaN
    // or inf in the channel), which the composite path has as well.
    var[j] = P(v < 0.0 ? 0.0 : v);
  }
}

template <class T>
void scale_shift_add_act_impl(const void* x, const void* r, Shape s, const void* scale_,
                              const void* shift_, Act act, void* y) {
  using P = typename T::P;
  if (s.size() == 0) return;
  std::vector<P> ones, zeros;
  const P* params[2] = {param_or<P>(scale_, s.c, P(1), ones),
                        param_or<P>(shift_, s.c, P(0), zeros)};
  double* const totals[1] = {nullptr};
  const ForwardFn<P> fn = forward_fn<P>(act, r != nullptr);
  const P alpha = P(act.alpha);
  for_each_tile<P, 2, 0>(s, params, totals,
                         [&](int64_t o, int64_t len, const P* const* prm, P* const*,
                             P* scratch) {
                           alignas(64) P bx[std::is_same<typename T::S, P>::value ? 1 : kTile];
                           alignas(64) P br[std::is_same<typename T::S, P>::value ? 1 : kTile];
                           const P* xv = tile_in<T>(x, o, len, bx);
                           const P* rv = r ? tile_in<T>(r, o, len, br) : nullptr;
                           P* yv = tile_out<T>(y, o, scratch);
                           fn(xv, rv, prm[0], prm[1], yv, len, alpha);
                           tile_out_store<T>(y, o, len, yv);
                         });
}

template <class T>
void scale_shift_add_act_backward_impl(const void* dy, const void* x, const void* r, Shape s,
                                       const void* scale_, const void* shift_, Act act,
                                       void* dx, void* dr, void* dscale_, void* dshift_) {
  using P = typename T::P;
  constexpr bool kDirect = std::is_same<typename T::S, P>::value;
  constexpr int64_t kBuf = kDirect ? 1 : kTile;
  const int64_t c = s.c;
  if (c == 0) return;
  std::vector<P> ones, zeros;
  const P* params[2] = {param_or<P>(scale_, c, P(1), ones), param_or<P>(shift_, c, P(0), zeros)};
  std::vector<double> sum_gx(c, 0.0), sum_g(c, 0.0);
  double* const totals[2] = {sum_gx.data(), sum_g.data()};
  const AffineBackwardFn<P> fn = affine_backward_fn<P>(act, r != nullptr);
  const P alpha = P(act.alpha);
  for_each_tile<P, 2, 2>(
      s, params, totals,
      [&](int64_t o, int64_t len, const P* const* prm, P* const* acc, P* scratch) {
        alignas(64) P bdy[kBuf], bx[kBuf], br[kBuf], bdx[kBuf];
        const P* dyv = tile_in<T>(dy, o, len, bdy);
        const P* xv = tile_in<T>(x, o, len, bx);
        const P* rv = r ? tile_in<T>(r, o, len, br) : nullptr;
        P* gv = dr ? tile_out<T>(dr, o, scratch) : scratch;
        P* dxv = tile_out<T>(dx, o, bdx);
        fn(dyv, xv, rv, prm[0], prm[1], gv, dxv, acc[0], acc[1], len, alpha);
        if (dr) tile_out_store<T>(dr, o, len, gv);
        tile_out_store<T>(dx, o, len, dxv);
      });
  P* dscale = static_cast<P*>(dscale_);
  P* dshift = static_cast<P*>(dshift_);
  for (int64_t j = 0; j < c; ++j) {
    if (dscale != nullptr) dscale[j] = P(sum_gx[j]);
    dshift[j] = P(sum_g[j]);
  }
}

template <class T>
void batch_norm_add_act_backward_impl(const void* dy, const void* x, const void* r, Shape s,
                                      const void* mean_, const void* var_, const void* gamma_,
                                      const void* beta_, double epsilon, Act act, void* dx,
                                      void* dr, void* dgamma_, void* dbeta_) {
  using P = typename T::P;
  constexpr bool kDirect = std::is_same<typename T::S, P>::value;
  constexpr int64_t kBuf = kDirect ? 1 : kTile;
  const int64_t c = s.c, m = s.m();
  if (c == 0) return;
  std::vector<P> ones, zeros;
  const P* mean = static_cast<const P*>(mean_);
  const P* var = static_cast<const P*>(var_);
  const P* gamma = param_or<P>(gamma_, c, P(1), ones);
  const P* beta = param_or<P>(beta_, c, P(0), zeros);

  // Per-channel constants: invstd, sc = gamma * invstd, sh = beta - mean * sc.
  std::vector<double> invstd(c);
  std::vector<P> sc(c), sh(c);
  for (int64_t j = 0; j < c; ++j) {
    invstd[j] = 1.0 / std::sqrt(double(var[j]) + epsilon);
    const double scj = double(gamma[j]) * invstd[j];
    sc[j] = P(scj);
    sh[j] = P(double(beta[j]) - double(mean[j]) * scj);
  }

  // Pass 1: g = dy * act'(z) into dr (or dx); sums of g and g * (x - mean).
  // float16 / bfloat16: pass 2 recomputes g in float rather than reading it
  // back rounded to the tensor dtype, so g goes to dr only (if wanted).
  constexpr bool kRecompute = !kDirect;
  void* gbuf = dr != nullptr ? dr : (kRecompute ? nullptr : dx);
  std::vector<double> sum_g(c, 0.0), sum_gxc(c, 0.0);
  {
    const P* params[3] = {sc.data(), sh.data(), mean};
    double* const totals[2] = {sum_g.data(), sum_gxc.data()};
    const BnBackward1Fn<P> fn = bn_backward1_fn<P>(act, r != nullptr);
    const P alpha = P(act.alpha);
    for_each_tile<P, 3, 2>(
        s, params, totals,
        [&](int64_t o, int64_t len, const P* const* prm, P* const* acc, P* scratch) {
          alignas(64) P bdy[kBuf], bx[kBuf], br[kBuf];
          const P* dyv = tile_in<T>(dy, o, len, bdy);
          const P* xv = tile_in<T>(x, o, len, bx);
          const P* rv = r ? tile_in<T>(r, o, len, br) : nullptr;
          P* gv = gbuf != nullptr ? tile_out<T>(gbuf, o, scratch) : scratch;
          fn(dyv, xv, rv, prm[0], prm[1], prm[2], gv, acc[0], acc[1], len, alpha);
          if (gbuf != nullptr) tile_out_store<T>(gbuf, o, len, gv);
        });
  }

  // dbeta = sum(g), dgamma = sum(g * xhat) = invstd * sum(g * (x - mean)).
  // dx = sc / m * (m * g - dbeta - xhat * dgamma)
  //    = sc * g + k * (x - mean) + b0,
  //   k = -sc * invstd * dgamma / m, b0 = -sc * dbeta / m.
  P* dgamma = static_cast<P*>(dgamma_);
  P* dbeta = static_cast<P*>(dbeta_);
  std::vector<P> ka(c), kb(c);
  const double inv_m = m > 0 ? 1.0 / double(m) : 0.0;
  for (int64_t j = 0; j < c; ++j) {
    const double dbeta_j = sum_g[j];
    const double dgamma_j = sum_gxc[j] * invstd[j];
    dbeta[j] = P(dbeta_j);
    dgamma[j] = P(dgamma_j);
    const double scj = double(gamma[j]) * invstd[j];
    ka[j] = P(-scj * invstd[j] * dgamma_j * inv_m);
    kb[j] = P(-scj * dbeta_j * inv_m);
  }

  double* const totals[1] = {nullptr};
  if constexpr (kRecompute) {
    // Pass 2: dx from g recomputed in float.
    const P* params[5] = {sc.data(), sh.data(), ka.data(), kb.data(), mean};
    const BnBackward2Fn<P> fn = bn_backward2_recompute_fn<P>(act, r != nullptr);
    const P alpha = P(act.alpha);
    for_each_tile<P, 5, 0>(
        s, params, totals,
        [&](int64_t o, int64_t len, const P* const* prm, P* const*, P* scratch) {
          alignas(64) P bdy[kBuf], bx[kBuf], br[kBuf];
          const P* dyv = tile_in<T>(dy, o, len, bdy);
          const P* xv = tile_in<T>(x, o, len, bx);
          const P* rv = r ? tile_in<T>(r, o, len, br) : nullptr;
          fn(dyv, xv, rv, prm[0], prm[1], prm[2], prm[3], prm[4], scratch, len, alpha);
          tile_out_store<T>(dx, o, len, scratch);
        });
  } else {
    // Pass 2: g -> dx (in place when g lives in dx).
    const P* params[4] = {sc.data(), ka.data(), kb.data(), mean};
    for_each_tile<P, 4, 0>(
        s, params, totals,
        [&](int64_t o, int64_t len, const P* const* prm, P* const*, P* scratch) {
          alignas(64) P bx[kBuf], bg[kBuf];
          const P* xv = tile_in<T>(x, o, len, bx);
          if (kDirect && dr == nullptr) {
            bn_backward2_inplace_tile<P>(tile_out<T>(dx, o, scratch), xv, prm[0], prm[1], prm[2],
                                         prm[3], len);
          } else {
            const P* gv = tile_in<T>(gbuf, o, len, bg);
            P* out = tile_out<T>(dx, o, scratch);
            bn_backward2_tile<P>(gv, xv, prm[0], prm[1], prm[2], prm[3], out, len);
            tile_out_store<T>(dx, o, len, out);
          }
        });
  }
}

// -------------------------------------------------------------- transpose --

// Tiles of kBlock x kBlock elements: both the rows read and the rows written
// stay in the L1 cache while a tile is copied. One thread: the copy is bound
// by memory, and a second thread measured no faster.
template <class T>
void transpose_impl(const T* KR_RESTRICT in, int64_t rows, int64_t cols, T* KR_RESTRICT out) {
  constexpr int64_t kBlock = 64 / sizeof(T) * 2;  // two cache lines of a row
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c) {
        T* KR_RESTRICT o = out + c * rows;
        for (int64_t r = r0; r < r1; ++r) o[r] = in[r * cols + c];
      }
    }
  }
}

// --------------------------------------------------------------- dispatch --

template <class F>
void with_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: return f(F32{});
    case DType::kFloat64: return f(F64{});
    case DType::kFloat16: return f(F16{});
    case DType::kBFloat16: return f(BF16{});
  }
}

}  // namespace

void batch_stats(DType dtype, const void* x, Shape shape, void* mean, void* var) {
  with_dtype(dtype, [&](auto t) { batch_stats_impl<decltype(t)>(x, shape, mean, var); });
}

void scale_shift_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                         const void* scale, const void* shift, Act act, void* y) {
  with_dtype(dtype, [&](auto t) {
    scale_shift_add_act_impl<decltype(t)>(x, residual, shape, scale, shift, act, y);
  });
}

void batch_norm_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                        const void* gamma, const void* beta, double epsilon, Act act, void* y,
                        void* mean, void* var) {
  with_dtype(dtype, [&](auto t) {
    using P = typename decltype(t)::P;
    batch_stats_impl<decltype(t)>(x, shape, mean, var);
    const P* m = static_cast<const P*>(mean);
    const P* v = static_cast<const P*>(var);
    const P* g = static_cast<const P*>(gamma);
    const P* b = static_cast<const P*>(beta);
    std::vector<P> scale(size_t(shape.c)), shift(size_t(shape.c));
    for (int64_t c = 0; c < shape.c; ++c) {
      scale[c] = g[c] / std::sqrt(v[c] + P(epsilon));
      shift[c] = b[c] - m[c] * scale[c];
    }
    scale_shift_add_act_impl<decltype(t)>(x, residual, shape, scale.data(), shift.data(), act, y);
  });
}

void scale_shift_add_act_backward(DType dtype, const void* dy, const void* x,
                                  const void* residual, Shape shape, const void* scale,
                                  const void* shift, Act act, void* dx, void* dresidual,
                                  void* dscale, void* dshift) {
  with_dtype(dtype, [&](auto t) {
    scale_shift_add_act_backward_impl<decltype(t)>(dy, x, residual, shape, scale, shift, act, dx,
                                                   dresidual, dscale, dshift);
  });
}

void batch_norm_add_act_backward(DType dtype, const void* dy, const void* x,
                                 const void* residual, Shape shape, const void* mean,
                                 const void* var, const void* gamma, const void* beta,
                                 double epsilon, Act act, void* dx, void* dresidual,
                                 void* dgamma, void* dbeta) {
  with_dtype(dtype, [&](auto t) {
    batch_norm_add_act_backward_impl<decltype(t)>(dy, x, residual, shape, mean, var, gamma, beta,
                                                  epsilon, act, dx, dresidual, dgamma, dbeta);
  });
}

void transpose(int element_bytes, const void* in, int64_t rows, int64_t cols, void* out) {
  if (rows <= 0 || cols <= 0) return;
  switch (element_bytes) {
    case 2:
      return transpose_impl(static_cast<const uint16_t*>(in), rows, cols,
                            static_cast<uint16_t*>(out));
    case 4:
      return transpose_impl(static_cast<const uint32_t*>(in), rows, cols,
                            static_cast<uint32_t*>(out));
    case 8:
      return transpose_impl(static_cast<const uint64_t*>(in), rows, cols,
                            static_cast<uint64_t*>(out));
    default:
      throw std::invalid_argument("keras_residual::cpu::transpose: element_bytes must be 2, 4 or 8");
  }
}

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

int num_threads() { return max_threads(); }

void set_parallel_runner(ParallelRunner runner) {
  g_runner.store(runner, std::memory_order_release);
}

}  // namespace cpu
}  // namespace keras_residual
