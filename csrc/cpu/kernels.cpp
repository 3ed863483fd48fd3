// CPU implementation of the kernels declared in keras_residual/kernels.h.
//
// Layout of the work:
//   NHWC  the tensor is m = n * hw rows of c contiguous channels. Threads take
//         contiguous ranges of rows; inner loops run over the channels (the
//         contiguous dimension) with per-channel parameter arrays, so they
//         vectorise. Reductions keep per-thread per-channel accumulators that
//         are combined, in thread order, at the end.
//   NCHW  the tensor is n * c planes of hw contiguous values of one channel.
//         Threads take contiguous ranges of planes; reductions use a few
//         independent lanes inside a plane, then per-plane partials that are
//         combined per channel, in plane order, at the end.
// Results are deterministic for a given thread count.
//
// Numerics: values are converted to the parameter type (float, or double for
// float64) in registers; reductions accumulate in double. The statistics are
// accumulated around a per-channel shift (the channel's first value), so that
// data with a large offset keeps its variance ("shifted data" algorithm).
// float16 and bfloat16 are converted with branch-free bit manipulation and
// rounded to nearest even on store.
//
// Threads: a plain std::thread fork/join per call (no OpenMP, no pool that
// would survive a fork()). Small tensors run on the calling thread.
#include "keras_residual/kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
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
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
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

template <Activation A, typename P>
KR_INLINE P act_forward(P z, P alpha) {
  if constexpr (A == Activation::kLinear) {
    return z;
  } else if constexpr (A == Activation::kRelu) {
    return z > P(0) ? z : P(0);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > P(0) ? z : alpha * z;
  } else if constexpr (A == Activation::kRelu6) {
    const P r = z > P(0) ? z : P(0);
    return r < P(6) ? r : P(6);
  } else if constexpr (A == Activation::kSilu) {
    return z / (P(1) + std::exp(-z));
  } else {  // kGelu, exact
    return P(0.5) * z * (P(1) + std::erf(z * P(0.70710678118654752440)));
  }
}

// d act / d z.
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
    const P s = P(1) / (P(1) + std::exp(-z));
    return s * (P(1) + z * (P(1) - s));
  } else {  // kGelu: Phi(z) + z * phi(z)
    const P cdf = P(0.5) * (P(1) + std::erf(z * P(0.70710678118654752440)));
    const P pdf = std::exp(P(-0.5) * z * z) * P(0.39894228040143267794);
    return cdf + z * pdf;
  }
}

// dy * act'(z), written so that relu-like activations become a select.
template <Activation A, typename P>
KR_INLINE P act_backward(P dy, P z, P alpha) {
  if constexpr (A == Activation::kLinear) {
    return dy;
  } else if constexpr (A == Activation::kRelu) {
    return z > P(0) ? dy : P(0);
  } else if constexpr (A == Activation::kLeakyRelu) {
    return z > P(0) ? dy : dy * alpha;
  } else if constexpr (A == Activation::kRelu6) {
    return (z > P(0) && z < P(6)) ? dy : P(0);
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

// Calls f(begin, end, thread_index) for nt contiguous slices of [0, tasks).
// Slice 0 runs on the calling thread. If a thread cannot be started, its
// slice runs on the calling thread instead.
template <class F>
void parallel_for(int64_t tasks, int nt, const F& f) {
  if (nt <= 1) {
    f(int64_t(0), tasks, 0);
    return;
  }
  auto begin_of = [&](int t) { return tasks * t / nt; };
  std::vector<std::thread> threads;
  std::vector<int> not_started;
  threads.reserve(nt - 1);
  for (int t = 1; t < nt; ++t) {
    try {
      threads.emplace_back([&f, t, b = begin_of(t), e = begin_of(t + 1)] { f(b, e, t); });
    } catch (...) {
      not_started.push_back(t);
    }
  }
  f(begin_of(0), begin_of(1), 0);
  for (int t : not_started) f(begin_of(t), begin_of(t + 1), t);
  for (auto& th : threads) th.join();
}

// Lanes of the in-plane (NCHW) reductions: independent accumulators the
// compiler can keep in vector registers without reassociating.
constexpr int kLanes = 8;

// ------------------------------------------------------------ batch_stats --

template <class T>
void batch_stats_impl(const void* x_, Shape s, void* mean_, void* var_) {
  using S = typename T::S;
  using P = typename T::P;
  const S* KR_RESTRICT x = static_cast<const S*>(x_);
  P* mean = static_cast<P*>(mean_);
  P* var = static_cast<P*>(var_);
  const int64_t c = s.c, hw = s.hw, m = s.m();
  if (c == 0) return;
  if (m == 0) {
    for (int64_t j = 0; j < c; ++j) {
      mean[j] = std::numeric_limits<P>::quiet_NaN();
      var[j] = std::numeric_limits<P>::quiet_NaN();
    }
    return;
  }
  // Per-channel shift: the channel's first value.
  std::vector<double> shift(c);
  std::vector<double> sum(c, 0.0), sumsq(c, 0.0);
  if (s.channels_last) {
    for (int64_t j = 0; j < c; ++j) shift[j] = double(T::load(x[j]));
    const int nt = plan_threads(m, c);
    std::vector<double> part(size_t(nt) * 2 * c, 0.0);
    parallel_for(m, nt, [&](int64_t r0, int64_t r1, int t) {
      double* KR_RESTRICT ps = part.data() + size_t(t) * 2 * c;
      double* KR_RESTRICT pq = ps + c;
      const double* KR_RESTRICT k = shift.data();
      for (int64_t r = r0; r < r1; ++r) {
        const S* KR_RESTRICT row = x + r * c;
        for (int64_t j = 0; j < c; ++j) {
          const double d = double(T::load(row[j])) - k[j];
          ps[j] += d;
          pq[j] += d * d;
        }
      }
    });
    for (int t = 0; t < nt; ++t) {
      const double* ps = part.data() + size_t(t) * 2 * c;
      for (int64_t j = 0; j < c; ++j) {
        sum[j] += ps[j];
        sumsq[j] += ps[c + j];
      }
    }
  } else {
    for (int64_t j = 0; j < c; ++j) shift[j] = double(T::load(x[j * hw]));
    const int64_t planes = s.n * c;
    const int nt = plan_threads(planes, hw);
    std::vector<double> part(size_t(planes) * 2);
    parallel_for(planes, nt, [&](int64_t p0, int64_t p1, int) {
      for (int64_t p = p0; p < p1; ++p) {
        const S* KR_RESTRICT plane = x + p * hw;
        const double k = shift[p % c];
        double ls[kLanes] = {}, lq[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= hw; i += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const double d = double(T::load(plane[i + l])) - k;
            ls[l] += d;
            lq[l] += d * d;
          }
        }
        for (; i < hw; ++i) {
          const double d = double(T::load(plane[i])) - k;
          ls[0] += d;
          lq[0] += d * d;
        }
        double a = 0.0, b = 0.0;
        for (int l = 0; l < kLanes; ++l) {
          a += ls[l];
          b += lq[l];
        }
        part[2 * p] = a;
        part[2 * p + 1] = b;
      }
    });
    for (int64_t p = 0; p < planes; ++p) {
      sum[p % c] += part[2 * p];
      sumsq[p % c] += part[2 * p + 1];
    }
  }
  const double inv_m = 1.0 / double(m);
  for (int64_t j = 0; j < c; ++j) {
    const double d = sum[j] * inv_m;
    const double v = sumsq[j] * inv_m - d * d;
    mean[j] = P(shift[j] + d);
    var[j] = P(v > 0.0 ? v : 0.0);
  }
}

// ---------------------------------------------------- scale_shift_add_act --

// Per-channel parameter array, with nullptr replaced by `fill`.
template <class P>
const P* param_or(const void* p, int64_t c, P fill, std::vector<P>& storage) {
  if (p != nullptr) return static_cast<const P*>(p);
  storage.assign(size_t(c), fill);
  return storage.data();
}

template <class T, Activation A, bool kRes>
void scale_shift_add_act_impl(const void* x_, const void* r_, Shape s, const void* scale_,
                              const void* shift_, double alpha_d, void* y_) {
  using S = typename T::S;
  using P = typename T::P;
  const int64_t c = s.c, hw = s.hw, m = s.m();
  if (s.size() == 0) return;
  std::vector<P> ones, zeros;
  const P* KR_RESTRICT scale = param_or<P>(scale_, c, P(1), ones);
  const P* KR_RESTRICT shift = param_or<P>(shift_, c, P(0), zeros);
  const S* KR_RESTRICT x = static_cast<const S*>(x_);
  const S* KR_RESTRICT r = static_cast<const S*>(r_);
  S* KR_RESTRICT y = static_cast<S*>(y_);
  const P alpha = P(alpha_d);
  if (s.channels_last) {
    parallel_for(m, plan_threads(m, c), [&](int64_t r0, int64_t r1, int) {
      for (int64_t row = r0; row < r1; ++row) {
        const S* KR_RESTRICT xr = x + row * c;
        const S* KR_RESTRICT rr = kRes ? r + row * c : nullptr;
        S* KR_RESTRICT yr = y + row * c;
        for (int64_t j = 0; j < c; ++j) {
          P z = T::load(xr[j]) * scale[j] + shift[j];
          if constexpr (kRes) z += T::load(rr[j]);
          yr[j] = T::store(act_forward<A, P>(z, alpha));
        }
      }
    });
  } else {
    const int64_t planes = s.n * c;
    parallel_for(planes, plan_threads(planes, hw), [&](int64_t p0, int64_t p1, int) {
      for (int64_t p = p0; p < p1; ++p) {
        const P a = scale[p % c], b = shift[p % c];
        const S* KR_RESTRICT xp = x + p * hw;
        const S* KR_RESTRICT rp = kRes ? r + p * hw : nullptr;
        S* KR_RESTRICT yp = y + p * hw;
        for (int64_t i = 0; i < hw; ++i) {
          P z = T::load(xp[i]) * a + b;
          if constexpr (kRes) z += T::load(rp[i]);
          yp[i] = T::store(act_forward<A, P>(z, alpha));
        }
      }
    });
  }
}

// ------------------------------------------- scale_shift_add_act_backward --

template <class T, Activation A, bool kRes>
void scale_shift_add_act_backward_impl(const void* dy_, const void* x_, const void* r_, Shape s,
                                       const void* scale_, const void* shift_, double alpha_d,
                                       void* dx_, void* dr_, void* dscale_, void* dshift_) {
  using S = typename T::S;
  using P = typename T::P;
  const int64_t c = s.c, hw = s.hw, m = s.m();
  if (c == 0) return;
  std::vector<P> ones, zeros;
  const P* KR_RESTRICT scale = param_or<P>(scale_, c, P(1), ones);
  const P* KR_RESTRICT shift = param_or<P>(shift_, c, P(0), zeros);
  const S* KR_RESTRICT dy = static_cast<const S*>(dy_);
  const S* KR_RESTRICT x = static_cast<const S*>(x_);
  const S* KR_RESTRICT r = static_cast<const S*>(r_);
  S* KR_RESTRICT dx = static_cast<S*>(dx_);
  S* KR_RESTRICT dr = static_cast<S*>(dr_);
  P* dscale = static_cast<P*>(dscale_);
  P* dshift = static_cast<P*>(dshift_);
  const P alpha = P(alpha_d);
  std::vector<double> sum_gx(c, 0.0), sum_g(c, 0.0);

  if (s.channels_last) {
    const int nt = plan_threads(m, c);
    std::vector<double> part(size_t(nt) * 2 * c, 0.0);
    parallel_for(m, nt, [&](int64_t r0, int64_t r1, int t) {
      double* KR_RESTRICT pgx = part.data() + size_t(t) * 2 * c;
      double* KR_RESTRICT pg = pgx + c;
      auto body = [&](auto want_dr) {
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t o = row * c;
          const S* KR_RESTRICT dyr = dy + o;
          const S* KR_RESTRICT xr = x + o;
          const S* KR_RESTRICT rr = kRes ? r + o : nullptr;
          S* KR_RESTRICT dxr = dx + o;
          S* KR_RESTRICT drr = decltype(want_dr)::value ? dr + o : nullptr;
          for (int64_t j = 0; j < c; ++j) {
            const P xv = T::load(xr[j]);
            P z = xv * scale[j] + shift[j];
            if constexpr (kRes) z += T::load(rr[j]);
            const P g = act_backward<A, P>(T::load(dyr[j]), z, alpha);
            dxr[j] = T::store(g * scale[j]);
            if constexpr (decltype(want_dr)::value) drr[j] = T::store(g);
            pgx[j] += double(g * xv);
            pg[j] += double(g);
          }
        }
      };
      if (dr != nullptr) {
        body(std::true_type{});
      } else {
        body(std::false_type{});
      }
    });
    for (int t = 0; t < nt; ++t) {
      const double* p = part.data() + size_t(t) * 2 * c;
      for (int64_t j = 0; j < c; ++j) {
        sum_gx[j] += p[j];
        sum_g[j] += p[c + j];
      }
    }
  } else {
    const int64_t planes = s.n * c;
    std::vector<double> part(size_t(planes) * 2);
    parallel_for(planes, plan_threads(planes, hw), [&](int64_t p0, int64_t p1, int) {
      auto body = [&](auto want_dr) {
        for (int64_t p = p0; p < p1; ++p) {
          const P a = scale[p % c], b = shift[p % c];
          const int64_t o = p * hw;
          const S* KR_RESTRICT dyp = dy + o;
          const S* KR_RESTRICT xp = x + o;
          const S* KR_RESTRICT rp = kRes ? r + o : nullptr;
          S* KR_RESTRICT dxp = dx + o;
          S* KR_RESTRICT drp = decltype(want_dr)::value ? dr + o : nullptr;
          double lgx[kLanes] = {}, lg[kLanes] = {};
          auto one = [&](int64_t i, int l) {
            const P xv = T::load(xp[i]);
            P z = xv * a + b;
            if constexpr (kRes) z += T::load(rp[i]);
            const P g = act_backward<A, P>(T::load(dyp[i]), z, alpha);
            dxp[i] = T::store(g * a);
            if constexpr (decltype(want_dr)::value) drp[i] = T::store(g);
            lgx[l] += double(g * xv);
            lg[l] += double(g);
          };
          int64_t i = 0;
          for (; i + kLanes <= hw; i += kLanes) {
            for (int l = 0; l < kLanes; ++l) one(i + l, l);
          }
          for (; i < hw; ++i) one(i, 0);
          double sgx = 0.0, sg = 0.0;
          for (int l = 0; l < kLanes; ++l) {
            sgx += lgx[l];
            sg += lg[l];
          }
          part[2 * p] = sgx;
          part[2 * p + 1] = sg;
        }
      };
      if (dr != nullptr) {
        body(std::true_type{});
      } else {
        body(std::false_type{});
      }
    });
    for (int64_t p = 0; p < planes; ++p) {
      sum_gx[p % c] += part[2 * p];
      sum_g[p % c] += part[2 * p + 1];
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    if (dscale != nullptr) dscale[j] = P(sum_gx[j]);
    dshift[j] = P(sum_g[j]);
  }
}

// -------------------------------------------- batch_norm_add_act_backward --

// Pass 2 of batch_norm_add_act_backward: dx = sc * g + k * (x - mean) + b0,
// with g read from g_in, or from dx itself when g_in is nullptr.
template <class T>
void batch_norm_backward_pass2(const typename T::S* x, const typename T::S* g_in,
                               typename T::S* out, Shape s, const typename T::P* sc,
                               const typename T::P* ka, const typename T::P* kb,
                               const typename T::P* mu) {
  using S = typename T::S;
  using P = typename T::P;
  const int64_t c = s.c, hw = s.hw, m = s.m();
  auto run = [&](auto in_place) {
    constexpr bool kInPlace = decltype(in_place)::value;
    if (s.channels_last) {
      parallel_for(m, plan_threads(m, c), [&](int64_t r0, int64_t r1, int) {
        const P* KR_RESTRICT a = sc;
        const P* KR_RESTRICT k = ka;
        const P* KR_RESTRICT b0 = kb;
        const P* KR_RESTRICT mm = mu;
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t o = row * c;
          const S* KR_RESTRICT xr = x + o;
          S* KR_RESTRICT outr = out + o;
          const S* KR_RESTRICT gr = kInPlace ? nullptr : g_in + o;
          for (int64_t j = 0; j < c; ++j) {
            const P g = T::load(kInPlace ? outr[j] : gr[j]);
            outr[j] = T::store(a[j] * g + k[j] * (T::load(xr[j]) - mm[j]) + b0[j]);
          }
        }
      });
    } else {
      const int64_t planes = s.n * c;
      parallel_for(planes, plan_threads(planes, hw), [&](int64_t p0, int64_t p1, int) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t ch = p % c;
          const P a = sc[ch], k = ka[ch], b0 = kb[ch], mm = mu[ch];
          const int64_t o = p * hw;
          const S* KR_RESTRICT xp = x + o;
          S* KR_RESTRICT outp = out + o;
          const S* KR_RESTRICT gp = kInPlace ? nullptr : g_in + o;
          for (int64_t i = 0; i < hw; ++i) {
            const P g = T::load(kInPlace ? outp[i] : gp[i]);
            outp[i] = T::store(a * g + k * (T::load(xp[i]) - mm) + b0);
          }
        }
      });
    }
  };
  if (g_in == nullptr) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

template <class T, Activation A, bool kRes>
void batch_norm_add_act_backward_impl(const void* dy_, const void* x_, const void* r_, Shape s,
                                      const void* mean_, const void* var_, const void* gamma_,
                                      const void* beta_, double epsilon, double alpha_d,
                                      void* dx_, void* dr_, void* dgamma_, void* dbeta_) {
  using S = typename T::S;
  using P = typename T::P;
  const int64_t c = s.c, hw = s.hw, m = s.m();
  if (c == 0) return;
  std::vector<P> ones, zeros;
  const P* mean = static_cast<const P*>(mean_);
  const P* var = static_cast<const P*>(var_);
  const P* gamma = param_or<P>(gamma_, c, P(1), ones);
  const P* beta = param_or<P>(beta_, c, P(0), zeros);
  const S* KR_RESTRICT dy = static_cast<const S*>(dy_);
  const S* KR_RESTRICT x = static_cast<const S*>(x_);
  const S* KR_RESTRICT r = static_cast<const S*>(r_);
  S* KR_RESTRICT gbuf = static_cast<S*>(dr_ != nullptr ? dr_ : dx_);
  P* dgamma = static_cast<P*>(dgamma_);
  P* dbeta = static_cast<P*>(dbeta_);
  const P alpha = P(alpha_d);

  // Per-channel constants: invstd, sc = gamma * invstd, sh = beta - mean * sc.
  std::vector<double> invstd(c);
  std::vector<P> sc(c), sh(c), mu(c);
  for (int64_t j = 0; j < c; ++j) {
    invstd[j] = 1.0 / std::sqrt(double(var[j]) + epsilon);
    const double scj = double(gamma[j]) * invstd[j];
    sc[j] = P(scj);
    sh[j] = P(double(beta[j]) - double(mean[j]) * scj);
    mu[j] = mean[j];
  }
  std::vector<double> sum_g(c, 0.0), sum_gxc(c, 0.0);  // sum(g), sum(g * (x - mean))

  // Pass 1: g = dy * act'(z) into gbuf; reduce sum(g), sum(g * (x - mean)).
  if (s.channels_last) {
    const int nt = plan_threads(m, c);
    std::vector<double> part(size_t(nt) * 2 * c, 0.0);
    parallel_for(m, nt, [&](int64_t r0, int64_t r1, int t) {
      double* KR_RESTRICT pg = part.data() + size_t(t) * 2 * c;
      double* KR_RESTRICT pgx = pg + c;
      const P* KR_RESTRICT a = sc.data();
      const P* KR_RESTRICT b = sh.data();
      const P* KR_RESTRICT mm = mu.data();
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t o = row * c;
        const S* KR_RESTRICT dyr = dy + o;
        const S* KR_RESTRICT xr = x + o;
        const S* KR_RESTRICT rr = kRes ? r + o : nullptr;
        S* KR_RESTRICT gr = gbuf + o;
        for (int64_t j = 0; j < c; ++j) {
          const P xv = T::load(xr[j]);
          P z = xv * a[j] + b[j];
          if constexpr (kRes) z += T::load(rr[j]);
          const P g = act_backward<A, P>(T::load(dyr[j]), z, alpha);
          gr[j] = T::store(g);
          pg[j] += double(g);
          pgx[j] += double(g * (xv - mm[j]));
        }
      }
    });
    for (int t = 0; t < nt; ++t) {
      const double* p = part.data() + size_t(t) * 2 * c;
      for (int64_t j = 0; j < c; ++j) {
        sum_g[j] += p[j];
        sum_gxc[j] += p[c + j];
      }
    }
  } else {
    const int64_t planes = s.n * c;
    std::vector<double> part(size_t(planes) * 2);
    parallel_for(planes, plan_threads(planes, hw), [&](int64_t p0, int64_t p1, int) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t ch = p % c;
        const P a = sc[ch], b = sh[ch], mm = mu[ch];
        const int64_t o = p * hw;
        const S* KR_RESTRICT dyp = dy + o;
        const S* KR_RESTRICT xp = x + o;
        const S* KR_RESTRICT rp = kRes ? r + o : nullptr;
        S* KR_RESTRICT gp = gbuf + o;
        double lg[kLanes] = {}, lgx[kLanes] = {};
        auto one = [&](int64_t i, int l) {
          const P xv = T::load(xp[i]);
          P z = xv * a + b;
          if constexpr (kRes) z += T::load(rp[i]);
          const P g = act_backward<A, P>(T::load(dyp[i]), z, alpha);
          gp[i] = T::store(g);
          lg[l] += double(g);
          lgx[l] += double(g * (xv - mm));
        };
        int64_t i = 0;
        for (; i + kLanes <= hw; i += kLanes) {
          for (int l = 0; l < kLanes; ++l) one(i + l, l);
        }
        for (; i < hw; ++i) one(i, 0);
        double s1 = 0.0, s2 = 0.0;
        for (int l = 0; l < kLanes; ++l) {
          s1 += lg[l];
          s2 += lgx[l];
        }
        part[2 * p] = s1;
        part[2 * p + 1] = s2;
      }
    });
    for (int64_t p = 0; p < planes; ++p) {
      sum_g[p % c] += part[2 * p];
      sum_gxc[p % c] += part[2 * p + 1];
    }
  }

  // dbeta = sum(g), dgamma = sum(g * xhat) = invstd * sum(g * (x - mean)).
  // dx = sc / m * (m * g - dbeta - xhat * dgamma)
  //    = sc * g + k * (x - mean) + b0,
  //   k = -sc * invstd * dgamma / m, b0 = -sc * dbeta / m.
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

  if (s.size() == 0) return;
  batch_norm_backward_pass2<T>(x, static_cast<const S*>(dr_), static_cast<S*>(dx_), s, sc.data(),
                               ka.data(), kb.data(), mu.data());
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

template <Activation A>
using ActTag = std::integral_constant<Activation, A>;

template <class F>
void with_act(Activation a, const F& f) {
  switch (a) {
    case Activation::kLinear: return f(ActTag<Activation::kLinear>{});
    case Activation::kRelu: return f(ActTag<Activation::kRelu>{});
    case Activation::kLeakyRelu: return f(ActTag<Activation::kLeakyRelu>{});
    case Activation::kRelu6: return f(ActTag<Activation::kRelu6>{});
    case Activation::kSilu: return f(ActTag<Activation::kSilu>{});
    case Activation::kGelu: return f(ActTag<Activation::kGelu>{});
  }
}

template <class F>
void with_bool(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace

void batch_stats(DType dtype, const void* x, Shape shape, void* mean, void* var) {
  with_dtype(dtype, [&](auto t) { batch_stats_impl<decltype(t)>(x, shape, mean, var); });
}

void scale_shift_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                         const void* scale, const void* shift, Act act, void* y) {
  with_dtype(dtype, [&](auto t) {
    with_act(act.kind, [&](auto a) {
      with_bool(residual != nullptr, [&](auto res) {
        scale_shift_add_act_impl<decltype(t), decltype(a)::value, decltype(res)::value>(
            x, residual, shape, scale, shift, act.alpha, y);
      });
    });
  });
}

void scale_shift_add_act_backward(DType dtype, const void* dy, const void* x,
                                  const void* residual, Shape shape, const void* scale,
                                  const void* shift, Act act, void* dx, void* dresidual,
                                  void* dscale, void* dshift) {
  with_dtype(dtype, [&](auto t) {
    with_act(act.kind, [&](auto a) {
      with_bool(residual != nullptr, [&](auto res) {
        scale_shift_add_act_backward_impl<decltype(t), decltype(a)::value, decltype(res)::value>(
            dy, x, residual, shape, scale, shift, act.alpha, dx, dresidual, dscale, dshift);
      });
    });
  });
}

void batch_norm_add_act_backward(DType dtype, const void* dy, const void* x,
                                 const void* residual, Shape shape, const void* mean,
                                 const void* var, const void* gamma, const void* beta,
                                 double epsilon, Act act, void* dx, void* dresidual,
                                 void* dgamma, void* dbeta) {
  with_dtype(dtype, [&](auto t) {
    with_act(act.kind, [&](auto a) {
      with_bool(residual != nullptr, [&](auto res) {
        batch_norm_add_act_backward_impl<decltype(t), decltype(a)::value, decltype(res)::value>(
            dy, x, residual, shape, mean, var, gamma, beta, epsilon, act.alpha, dx, dresidual,
            dgamma, dbeta);
      });
    });
  });
}

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

int num_threads() { return max_threads(); }

}  // namespace cpu
}  // namespace keras_residual
