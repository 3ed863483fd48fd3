// Building blocks of the CUDA kernels (kernels.cu): storage types and their
// conversions, activations and their derivatives, the channel iterator of the
// grid-stride loops and the launch geometry of the reductions.
//
// Everything here that does not need a GPU is __host__ __device__ (or plain
// host code), so that tests/native/cuda_host_math.cu checks it on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../include/keras_residual/kernels.h"

#define KR_HD __host__ __device__ __forceinline__

namespace keras_residual {
namespace cuda {
namespace detail {

// ---------------------------------------------------------------- storage --
// Storage types: S is what memory holds (float16 and bfloat16 as raw uint16
// bit patterns), P the parameter / arithmetic type, V the elements of one
// 128-bit vector.

struct F32 {
  using S = float;
  using P = float;
  static constexpr int kVec = 4;
  static KR_HD P load(S v) { return v; }
  static KR_HD S store(P v) { return v; }
};

struct F64 {
  using S = double;
  using P = double;
  static constexpr int kVec = 2;
  static KR_HD P load(S v) { return v; }
  static KR_HD S store(P v) { return v; }
};

struct F16 {
  using S = uint16_t;
  using P = float;
  static constexpr int kVec = 8;
  static KR_HD P load(S v) { return __half2float(__ushort_as_half(v)); }
  // Round to nearest even; overflow to inf.
  static KR_HD S store(P v) { return __half_as_ushort(__float2half_rn(v)); }
};

struct BF16 {
  using S = uint16_t;
  using P = float;
  static constexpr int kVec = 8;
  static KR_HD P load(S v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  // Round to nearest even.
  static KR_HD S store(P v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// V consecutive storage values, loaded and stored as one access of
// V * sizeof(S) bytes (16 for the vectorised kernels, sizeof(S) for V = 1).
template <typename S, int V>
struct alignas(sizeof(S) * V) Pack {
  S v[V];
};

// ------------------------------------------------------------------- math --

KR_HD float kr_exp(float v) { return expf(v); }
KR_HD double kr_exp(double v) { return exp(v); }
KR_HD float kr_erf(float v) { return erff(v); }
KR_HD double kr_erf(double v) { return erf(v); }

// ------------------------------------------------------------ activations --
// The same definitions as the CPU kernels (kernels.cpp): relu'(0) = 0,
// leaky_relu'(0) = alpha, relu6' = 1 on the open interval (0, 6) only, silu
// = z * sigmoid(z), gelu the exact erf form. Non-finite values as there (and
// kernels.h): NaN propagates through every activation (the comparisons are
// ordered so that NaN falls through to z), silu(-inf) = gelu(-inf) = NaN.

// The shift of the statistics of a channel whose first value is v: v, or 0
// when v is not finite (an inf shift would make the sums NaN where the mean
// is +-inf).
template <typename P>
KR_HD P stats_shift(P v) {
  return (v - v == P(0)) ? v : P(0);
}

template <Activation A, typename P>
KR_HD P act_forward(P z, P alpha) {
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
    return z / (P(1) + kr_exp(-z));
  } else {  // kGelu, exact
    return P(0.5) * z * (P(1) + kr_erf(z * P(0.70710678118654752440)));
  }
}

// d act / d z.
template <Activation A, typename P>
KR_HD P act_grad(P z, P alpha) {
  if constexpr (A == Activation::kLinear) {
    return P(1);
  } else if constexpr (A == Activation::kRelu) {
    return z > P(0) ? P(1) : P(0);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > P(0) ? P(1) : alpha;
  } else if constexpr (A == Activation::kRelu6) {
    return (z > P(0) && z < P(6)) ? P(1) : P(0);
  } else if constexpr (A == Activation::kSilu) {
    const P s = P(1) / (P(1) + kr_exp(-z));
    return s * (P(1) + z * (P(1) - s));
  } else {  // kGelu: Phi(z) + z * phi(z)
    const P cdf = P(0.5) * (P(1) + kr_erf(z * P(0.70710678118654752440)));
    const P pdf = kr_exp(P(-0.5) * z * z) * P(0.39894228040143267794);
    return cdf + z * pdf;
  }
}

// dy * act'(z) under each GradRule of kernels.h (R): kMultiply, TensorFlow's
// formulas (relu, relu6: the zero regions give dy * 0 and take z = NaN;
// gelu: dy * Phi(z) + (dy * z) * phi(z)); kSelect, PyTorch's (relu, relu6 a
// select: the zero regions give 0; z = NaN passes dy through relu, not
// relu6); kTermwise, JAX's (relu and relu6 select, z = NaN gives 0;
// leaky_relu passes dy at z = 0; silu term by term; gelu as kMultiply).
template <Activation A, typename P, GradRule R = GradRule::kSelect>
KR_HD P act_backward(P dy, P z, P alpha) {
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
    const P s = P(1) / (P(1) + kr_exp(-z));
    return dy * s + (dy * z) * (s * (P(1) - s));
  } else if constexpr (A == Activation::kGelu && (kMul || kTerm)) {
    const P cdf = P(0.5) * (P(1) + kr_erf(z * P(0.70710678118654752440)));
    const P pdf = kr_exp(P(-0.5) * z * z) * P(0.39894228040143267794);
    return dy * cdf + (dy * z) * pdf;
  } else {
    return dy * act_grad<A, P>(z, alpha);
  }
}

// The kernels are compiled for three activation families only (fewer
// instantiations): silu, gelu, and the piecewise-linear ones, which are
// described at run time by ActParams:
//   forward   z < 0 ? (zero_lo ? 0 : lo * z) : (clip && z > hi ? hi : z)
//   backward  z > 0 ? (clip && z >= hi ? zero : dy)
//                   : zero_lo ? (mul || clip || term || z <= 0 ? zero : dy)
//                   : (term && z == 0 ? dy : dy * lo)
//             with zero = mul ? dy * 0 : 0
// which give exactly act_forward / act_backward above (also for +-0, +-inf
// and NaN): linear lo = 1; relu zero_lo; leaky_relu lo = alpha; relu6
// zero_lo, clip at hi = 6; mul for GradRule::kMultiply (which gelu follows
// too), term for GradRule::kTermwise (and silu's and gelu's formulas).
enum class KernelAct : int { kPiecewiseLinear = 0, kSilu = 1, kGelu = 2 };

template <typename P>
struct ActParams {
  P lo;
  P hi;
  bool clip;
  bool zero_lo;
  bool mul = false;
  bool term = false;
};

inline KernelAct kernel_act(Activation a) {
  switch (a) {
    case Activation::kSilu: return KernelAct::kSilu;
    case Activation::kGelu: return KernelAct::kGelu;
    default: return KernelAct::kPiecewiseLinear;
  }
}

template <typename P>
inline ActParams<P> act_params(Act act) {
  ActParams<P> p{P(1), P(0), false, false};  // linear (silu ignores it, gelu all but mul)
  p.mul = act.grad_rule == GradRule::kMultiply;
  p.term = act.grad_rule == GradRule::kTermwise;
  if (act.kind == Activation::kRelu) {
    p.zero_lo = true;
  } else if (act.kind == Activation::kLeakyRelu) {
    p.lo = P(act.alpha);
  } else if (act.kind == Activation::kRelu6) {
    p.zero_lo = true;
    p.clip = true;
    p.hi = P(6);
  }
  return p;
}

template <KernelAct K, typename P>
KR_HD P kact_forward(P z, const ActParams<P>& p) {
  if constexpr (K == KernelAct::kSilu) {
    return act_forward<Activation::kSilu, P>(z, P(0));
  } else if constexpr (K == KernelAct::kGelu) {
    return act_forward<Activation::kGelu, P>(z, P(0));
  } else {
    if (z < P(0)) return p.zero_lo ? P(0) : p.lo * z;
    return (p.clip && z > p.hi) ? p.hi : z;  // NaN falls through
  }
}

template <KernelAct K, typename P>
KR_HD P kact_backward(P dy, P z, const ActParams<P>& p) {
  if constexpr (K == KernelAct::kSilu) {
    return p.term ? act_backward<Activation::kSilu, P, GradRule::kTermwise>(dy, z, P(0))
                  : act_backward<Activation::kSilu, P>(dy, z, P(0));
  } else if constexpr (K == KernelAct::kGelu) {
    return p.mul || p.term ? act_backward<Activation::kGelu, P, GradRule::kMultiply>(dy, z, P(0))
                           : act_backward<Activation::kGelu, P>(dy, z, P(0));
  } else {
    const P zero = p.mul ? dy * P(0) : P(0);
    if (z > P(0)) return (p.clip && z >= p.hi) ? zero : dy;
    // z <= 0 or NaN; NaN passes dy through relu under the select rule only.
    if (p.zero_lo) return (p.mul || p.clip || p.term || z <= P(0)) ? zero : dy;
    // leaky_relu (and linear) under the termwise rule: z >= 0 passes dy.
    return (p.term && z == P(0)) ? dy : dy * p.lo;
  }
}

// ------------------------------------------------------- channel iterator --
// A grid-stride loop visits the vectors v = v0, v0 + step, ... of a tensor
// seen as `outer` groups of `inner` vectors, the group q holding channel
// q % period:
//   NHWC  inner = 1,        period = c / V  (channel vector of the row)
//   NCHW  inner = hw / V,   period = c      (channel of the plane)
// ChannelIter keeps v % inner and (v / inner) % period up to date with adds
// and compares only (no 64-bit division in the loop). Requires step >= 0,
// inner >= 1, period >= 1.
struct ChannelIter {
  int64_t inner, period;
  int64_t step_r, step_ch;  // step % inner, (step / inner) % period
  int64_t r, ch;            // v % inner, (v / inner) % period

  KR_HD ChannelIter(int64_t v0, int64_t step, int64_t inner_, int64_t period_)
      : inner(inner_),
        period(period_),
        step_r(step % inner_),
        step_ch((step / inner_) % period_),
        r(v0 % inner_),
        ch((v0 / inner_) % period_) {}

  KR_HD void advance() {
    r += step_r;  // < 2 * inner
    int64_t carry = 0;
    if (r >= inner) {
      r -= inner;
      carry = 1;
    }
    ch += step_ch + carry;  // < 2 * period
    if (ch >= period) ch -= period;
  }
};

// ------------------------------------------------------- launch geometry --
// The grids of the reductions depend on the shape only (never on the
// device), so that workspace_bytes() and the launches agree.

constexpr int kThreads = 256;         // threads of every block
constexpr int64_t kTargetBlocks = 1024;  // enough to fill an H100 (132 SMs)
constexpr int64_t kMinItemsPerThread = 4;  // vectors per thread before splitting further
constexpr int64_t kMaxGridY = 65535;
constexpr int kWarpsPerFinishBlock = kThreads / 32;  // one channel per warp

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// NHWC reductions: blocks of tx x ty threads (tx channel vectors, ty rows),
// a grid of tiles x splits blocks; block (i, j) reduces the rows j * ty + k *
// splits * ty of the channel vectors [i * tx, (i + 1) * tx).
struct NhwcGeometry {
  int tx, ty;
  int64_t tiles, splits;
};

inline NhwcGeometry nhwc_geometry(int64_t c, int64_t m, int vec) {
  NhwcGeometry g;
  const int64_t cv = c / vec > 0 ? c / vec : 1;  // vec divides c > 0 in every launch
  int tx = 1;
  while (tx < 32 && tx < cv) tx *= 2;
  g.tx = tx;
  g.ty = kThreads / tx;
  g.tiles = ceil_div(cv, tx);
  const int64_t by_occupancy = ceil_div(kTargetBlocks, g.tiles);
  const int64_t by_work = ceil_div(m, int64_t(g.ty) * kMinItemsPerThread);
  g.splits = clamp64(by_occupancy < by_work ? by_occupancy : by_work, 1, kMaxGridY);
  return g;
}

// NCHW reductions: a grid of c x splits blocks; block (ch, j) reduces the
// vectors [j * chunk, (j + 1) * chunk) of channel ch's n * (hw / V) vectors,
// taken in (batch, position) order.
struct NchwGeometry {
  int64_t chunk, splits;
};

inline NchwGeometry nchw_geometry(int64_t n, int64_t c, int64_t hw, int vec) {
  NchwGeometry g;
  const int64_t total = n * (hw / vec);
  const int64_t by_occupancy = ceil_div(kTargetBlocks, c);
  const int64_t by_work = ceil_div(total, kThreads * kMinItemsPerThread);
  int64_t splits = clamp64(by_occupancy < by_work ? by_occupancy : by_work, 1, kMaxGridY);
  g.chunk = total > 0 ? ceil_div(total, splits) : 1;
  g.splits = total > 0 ? ceil_div(total, g.chunk) : 1;  // no empty block
  return g;
}

inline int64_t reduction_splits(Shape s, int vec) {
  if (s.c <= 0) return 0;
  if (s.channels_last) return nhwc_geometry(s.c, s.m(), vec).splits;
  return nchw_geometry(s.n, s.c, s.hw, vec).splits;
}

// Workspace layout, for `splits` partials per channel:
//   double partial[2][c][splits]       per-block sums (channel-major)
//   P      coef[5][c]                  batch_norm backward: pass-2 constants
constexpr int kCoefArrays = 5;  // sc, k, b0, mean, sh

inline size_t partials_bytes(int64_t c, int64_t splits) {
  return size_t(2) * size_t(c) * size_t(splits) * sizeof(double);
}

// Enough for the scalar and (where the contiguous dimension allows it) the
// vectorised launches, whichever the pointers' alignment selects.
inline size_t workspace_bytes_for(Shape s, size_t param_size, int vec) {
  if (s.c <= 0) return 0;
  int64_t splits = reduction_splits(s, 1);
  if ((s.channels_last ? s.c : s.hw) % vec == 0) {
    const int64_t vs = reduction_splits(s, vec);
    if (vs > splits) splits = vs;
  }
  return partials_bytes(s.c, splits) + size_t(kCoefArrays) * size_t(s.c) * param_size;
}

}  // namespace detail
}  // namespace cuda
}  // namespace keras_residual
