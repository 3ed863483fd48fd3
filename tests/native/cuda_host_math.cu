// CPU checks of the host-callable parts of the CUDA kernels (no GPU needed):
// float16 / bfloat16 conversions, activations and derivatives, the
// piecewise-linear activation family against the per-activation
// definitions, the channel iterator, the launch geometry and workspace size,
// and a host replay of the reduction loops' index arithmetic (every element
// visited once, every partial written once).
//
// Built and run by tests/native/test_cuda_compile.py: nvcc -std=c++17
// -Icsrc/include tests/native/cuda_host_math.cu <kernels object> -o <exe>.
// Exit status 0 when every check passes; prints a summary.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "../../csrc/cuda/common.cuh"
#include "../../csrc/include/keras_residual/kernels_cuda.h"

using namespace keras_residual;
using namespace keras_residual::cuda::detail;

static int g_checks = 0;
static int g_failures = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    ++g_checks;                                                  \
    if (!(cond)) {                                               \
      ++g_failures;                                              \
      if (g_failures <= 30) {                                    \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                \
        std::printf("\n");                                       \
      }                                                          \
    }                                                            \
  } while (0)

static uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename P>
static bool same(P a, P b) {  // bitwise, with every NaN equal
  if (std::isnan(a) && std::isnan(b)) return true;
  return std::memcmp(&a, &b, sizeof(P)) == 0;
}

// ------------------------------------------------------------ conversions --

// Reference half -> float by the definition of the format.
static double half_value(uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 31, f = h & 1023;
  double v;
  if (e == 0) {
    v = std::ldexp(double(f), -24);
  } else if (e == 31) {
    v = f ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(double(1024 + f), e - 25);
  }
  return sign ? -v : v;
}

static void check_conversions() {
  // Every half pattern: exact value, and the round trip keeps it.
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = F16::load(uint16_t(h));
    const double ref = half_value(uint16_t(h));
    if (std::isnan(ref)) {
      CHECK(std::isnan(f), "half %04x", h);
      CHECK(std::isnan(F16::load(F16::store(f))), "half NaN round trip %04x", h);
    } else {
      CHECK(double(f) == ref && std::signbit(f) == std::signbit(ref), "half %04x: %g vs %g", h,
            double(f), ref);
      CHECK(F16::store(f) == h, "half round trip %04x -> %04x", h, F16::store(f));
    }
  }
  // Every bfloat16 pattern: the top half of the float.
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = BF16::load(uint16_t(b));
    CHECK(bits(f) == (b << 16), "bf16 %04x", b);
    if (!std::isnan(f)) CHECK(BF16::store(f) == b, "bf16 round trip %04x", b);
  }
  // Round to nearest, ties to even.
  CHECK(F16::store(1.0f + 0x1.0p-11f) == 0x3C00, "half tie to even (down)");
  CHECK(F16::store(1.0f + 3 * 0x1.0p-11f) == 0x3C02, "half tie to even (up)");
  CHECK(F16::store(1.0f + 0x1.0p-11f + 0x1.0p-20f) == 0x3C01, "half above tie");
  CHECK(F16::store(65520.0f) == 0x7C00, "half overflow to inf");
  CHECK(F16::store(65519.0f) == 0x7BFF, "half max");
  CHECK(F16::store(0x1.0p-25f) == 0x0000, "half underflow tie to even");
  CHECK(F16::store(0x1.8p-25f) == 0x0001, "half smallest subnormal");
  CHECK(F16::store(-0.0f) == 0x8000, "half -0");
  CHECK(BF16::store(from_bits(0x3F808000u)) == 0x3F80, "bf16 tie to even (down)");
  CHECK(BF16::store(from_bits(0x3F818000u)) == 0x3F82, "bf16 tie to even (up)");
  CHECK(BF16::store(from_bits(0x3F808001u)) == 0x3F81, "bf16 above tie");
  CHECK(BF16::store(from_bits(0x7F7FFFFFu)) == 0x7F80, "bf16 overflow to inf");
  CHECK((BF16::store(std::numeric_limits<float>::quiet_NaN()) & 0x7FFF) > 0x7F80, "bf16 NaN");
  CHECK(F32::load(F32::store(1.5f)) == 1.5f, "float identity");
  CHECK(F64::load(F64::store(1.5)) == 1.5, "double identity");
}

// ------------------------------------------------------------ activations --

template <typename P>
static void check_activation_values() {
  const double tol = sizeof(P) == 4 ? 2e-6 : 1e-13;
  struct Ref {
    double z, gelu, silu;
  };
  // gelu(z) = z * Phi(z), silu(z) = z / (1 + exp(-z)), from Python's math.erf / exp.
  const Ref refs[] = {{0.0, 0.0, 0.0},
                      {1.0, 0.8413447460685429, 0.7310585786300049},
                      {-1.0, -0.15865525393145707, -0.2689414213699951},
                      {2.5, 2.4844758366855597, 2.3103545499468914},
                      {-3.0, -0.00404969409489031, -0.14227761953270035}};
  for (const Ref& r : refs) {
    const P g = act_forward<Activation::kGelu, P>(P(r.z), P(0));
    const P s = act_forward<Activation::kSilu, P>(P(r.z), P(0));
    CHECK(std::fabs(double(g) - r.gelu) <= tol * (1 + std::fabs(r.gelu)), "gelu(%g) = %.17g",
          r.z, double(g));
    CHECK(std::fabs(double(s) - r.silu) <= tol * (1 + std::fabs(r.silu)), "silu(%g) = %.17g",
          r.z, double(s));
  }
  CHECK((act_forward<Activation::kRelu6, P>(P(7), P(0)) == P(6)), "relu6(7)");
  CHECK((act_forward<Activation::kLeakyRelu, P>(P(-2), P(0.25)) == P(-0.5)), "leaky(-2)");
  CHECK((act_forward<Activation::kSilu, P>(P(-1000), P(0)) == P(0)), "silu(-1000)");
  CHECK((act_forward<Activation::kSilu, P>(P(1000), P(0)) == P(1000)), "silu(1000)");

  // Derivatives against central differences of the forward, in double.
  const double zs[] = {-4.0, -2.2, -1.0, -0.3, 0.2, 0.9, 1.7, 3.1, 5.5};
  for (double z : zs) {
    const double h = 1e-5;
    const double dg = (act_forward<Activation::kGelu, double>(z + h, 0) -
                       act_forward<Activation::kGelu, double>(z - h, 0)) / (2 * h);
    const double ds = (act_forward<Activation::kSilu, double>(z + h, 0) -
                       act_forward<Activation::kSilu, double>(z - h, 0)) / (2 * h);
    const double dtol = sizeof(P) == 4 ? 1e-5 : 1e-8;
    CHECK(std::fabs(double(act_grad<Activation::kGelu, P>(P(z), P(0))) - dg) <= dtol,
          "gelu'(%g)", z);
    CHECK(std::fabs(double(act_grad<Activation::kSilu, P>(P(z), P(0))) - ds) <= dtol,
          "silu'(%g)", z);
    CHECK((act_backward<Activation::kGelu, P>(P(2), P(z), P(0)) ==
           P(2) * act_grad<Activation::kGelu, P>(P(z), P(0))),
          "gelu backward");
  }
}

// kact_* with act_params() must equal the per-activation act_* bit for bit.
template <typename P>
static void check_piecewise_linear() {
  const P inf = std::numeric_limits<P>::infinity();
  const P nan = std::numeric_limits<P>::quiet_NaN();
  const P zs[] = {P(0),  -P(0), P(1),    P(-1),    P(5.999), P(6),   P(6.001), P(-6),
                  inf,   -inf,  nan,     P(1e-30), P(-1e-30), std::numeric_limits<P>::denorm_min(),
                  P(100), P(-3.5)};
  const P dys[] = {P(1), P(-2.5), P(0), inf, nan};
  const Activation kinds[] = {Activation::kLinear, Activation::kRelu, Activation::kLeakyRelu,
                              Activation::kRelu6};
  const double alphas[] = {0.2, 0.0, 1.5};
  for (Activation kind : kinds) {
    for (double alpha : alphas) {
      const Act act{kind, alpha};
      CHECK(kernel_act(kind) == KernelAct::kPiecewiseLinear, "kernel_act");
      const ActParams<P> p = act_params<P>(act);
      for (P z : zs) {
        P ref;
        switch (kind) {
          case Activation::kLinear: ref = act_forward<Activation::kLinear, P>(z, P(alpha)); break;
          case Activation::kRelu: ref = act_forward<Activation::kRelu, P>(z, P(alpha)); break;
          case Activation::kLeakyRelu:
            ref = act_forward<Activation::kLeakyRelu, P>(z, P(alpha));
            break;
          default: ref = act_forward<Activation::kRelu6, P>(z, P(alpha)); break;
        }
        const P got = kact_forward<KernelAct::kPiecewiseLinear, P>(z, p);
        CHECK(same(got, ref), "forward kind %d alpha %g z %g: %g vs %g", int(kind), alpha,
              double(z), double(got), double(ref));
        for (P dy : dys) {
          P gref;
          switch (kind) {
            case Activation::kLinear:
              gref = act_backward<Activation::kLinear, P>(dy, z, P(alpha));
              break;
            case Activation::kRelu: gref = act_backward<Activation::kRelu, P>(dy, z, P(alpha)); break;
            case Activation::kLeakyRelu:
              gref = act_backward<Activation::kLeakyRelu, P>(dy, z, P(alpha));
              break;
            default: gref = act_backward<Activation::kRelu6, P>(dy, z, P(alpha)); break;
          }
          const P g = kact_backward<KernelAct::kPiecewiseLinear, P>(dy, z, p);
          CHECK(same(g, gref), "backward kind %d alpha %g z %g dy %g: %g vs %g", int(kind), alpha,
                double(z), double(dy), double(g), double(gref));
        }
      }
    }
  }
  CHECK(kernel_act(Activation::kSilu) == KernelAct::kSilu, "silu kind");
  CHECK(kernel_act(Activation::kGelu) == KernelAct::kGelu, "gelu kind");
  const ActParams<P> none{};
  CHECK(same(kact_forward<KernelAct::kGelu, P>(P(1.3), none),
             act_forward<Activation::kGelu, P>(P(1.3), P(0))),
        "gelu family");
  CHECK(same(kact_backward<KernelAct::kSilu, P>(P(0.7), P(-1.3), none),
             act_backward<Activation::kSilu, P>(P(0.7), P(-1.3), P(0))),
        "silu family");
}

// ------------------------------------------------------- channel iterator --

static void check_iterator() {
  const int64_t inners[] = {1, 2, 3, 7, 49, 784};
  const int64_t periods[] = {1, 2, 3, 16, 64, 1000};
  const int64_t steps[] = {1, 5, 256, 1024, 1056 * 256, 3 * 7 * 256 + 1};
  for (int64_t inner : inners) {
    for (int64_t period : periods) {
      for (int64_t step : steps) {
        for (int64_t v0 : {int64_t(0), int64_t(1), int64_t(255), int64_t(123457)}) {
          ChannelIter it(v0, step, inner, period);
          bool ok = true;
          for (int k = 0; k < 200 && ok; ++k, it.advance()) {
            const int64_t v = v0 + k * step;
            ok = it.r == v % inner && it.ch == (v / inner) % period;
          }
          CHECK(ok, "iterator inner %lld period %lld step %lld v0 %lld", (long long)inner,
                (long long)period, (long long)step, (long long)v0);
        }
      }
    }
  }
  // 64-bit positions (tensors of more than 2^31 elements).
  const int64_t big = int64_t(3) << 33;
  ChannelIter it(big + 17, 1056 * 256, 3136, 2048);
  for (int k = 0; k < 1000; ++k) it.advance();
  const int64_t v = big + 17 + int64_t(1000) * 1056 * 256;
  CHECK(it.r == v % 3136 && it.ch == (v / 3136) % 2048, "iterator beyond 2^32");
}

// ------------------------------------------------- geometry and workspace --

// Replays the loops of nhwc_reduce_kernel / nchw_reduce_kernel on the host:
// every (row or position, channel) is visited exactly once, every partial
// slot [q][ch][split] is written exactly once, and the slots fit the
// workspace.
static void replay_reductions(Shape s, int vec, size_t workspace) {
  const int64_t c = s.c, m = s.m();
  if (m == 0) return;
  std::vector<uint8_t> seen(size_t(s.size() / vec), 0);
  bool ok = true;
  int64_t splits;
  if (s.channels_last) {
    const NhwcGeometry g = nhwc_geometry(c, m, vec);
    splits = g.splits;
    CHECK(g.tx * g.ty == kThreads && g.tx >= 1 && g.tx <= 32, "block shape");
    CHECK(g.splits >= 1 && g.splits <= kMaxGridY && g.tiles * g.tx >= c / vec, "nhwc grid");
    const int64_t cv = c / vec;
    for (int64_t bx = 0; bx < g.tiles; ++bx)
      for (int64_t by = 0; by < g.splits; ++by)
        for (int ty = 0; ty < g.ty; ++ty)
          for (int tx = 0; tx < g.tx; ++tx) {
            const int64_t cvi = bx * g.tx + tx;
            if (cvi >= cv) continue;
            for (int64_t row = by * g.ty + ty; row < m; row += g.splits * g.ty) {
              const int64_t v = row * cv + cvi;
              ok = ok && v < int64_t(seen.size()) && seen[size_t(v)]++ == 0;
            }
          }
  } else {
    const NchwGeometry g = nchw_geometry(s.n, c, s.hw, vec);
    splits = g.splits;
    const int64_t hwv = s.hw / vec, total = s.n * hwv;
    CHECK(g.splits >= 1 && g.splits <= kMaxGridY, "nchw splits");
    CHECK(g.chunk * g.splits >= total && (g.splits - 1) * g.chunk < total, "nchw chunks");
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t by = 0; by < g.splits; ++by) {
        const int64_t begin = by * g.chunk;
        const int64_t end = begin + g.chunk < total ? begin + g.chunk : total;
        for (int tid = 0; tid < kThreads; ++tid) {
          if (begin + tid >= end) continue;
          ChannelIter it(begin + tid, kThreads, hwv, s.n);
          for (int64_t j = begin + tid; j < end; j += kThreads, it.advance()) {
            const int64_t v = (it.ch * c + ch) * hwv + it.r;
            ok = ok && v < int64_t(seen.size()) && seen[size_t(v)]++ == 0;
          }
        }
      }
  }
  for (uint8_t x : seen) ok = ok && x == 1;
  CHECK(ok, "reduction covers n=%lld c=%lld hw=%lld %s vec %d once", (long long)s.n,
        (long long)c, (long long)s.hw, s.channels_last ? "NHWC" : "NCHW", vec);
  // Partials [2][c][splits] of double, then coef[4][c] of P (<= 8 bytes).
  CHECK(partials_bytes(c, splits) + size_t(4) * size_t(c) * sizeof(float) <= workspace,
        "workspace n=%lld c=%lld hw=%lld", (long long)s.n, (long long)c, (long long)s.hw);
}

static void check_geometry() {
  const int64_t ns[] = {1, 2, 3, 32};
  const int64_t cs[] = {1, 3, 8, 16, 64, 100, 256, 2048};
  const int64_t hws[] = {1, 3, 49, 64, 196, 3136};
  for (bool cl : {true, false})
    for (int64_t n : ns)
      for (int64_t c : cs)
        for (int64_t hw : hws) {
          const Shape s{n, c, hw, cl};
          for (DType dt : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
            const int vec = dt == DType::kFloat64 ? 2 : (dt == DType::kFloat32 ? 4 : 8);
            const size_t ws = keras_residual::cuda::workspace_bytes(dt, s);
            const size_t psize = dt == DType::kFloat64 ? 8 : 4;
            CHECK(ws == workspace_bytes_for(s, psize, vec), "workspace_bytes dispatch");
            if (s.size() > 2000000) continue;  // keep the replay quick
            replay_reductions(s, 1, ws);
            if ((cl ? c : hw) % vec == 0) replay_reductions(s, vec, ws);
            if (dt == DType::kFloat64) {
              // coef of double: 4 * c * 8 bytes.
              const int64_t sp1 = reduction_splits(s, 1), spv = reduction_splits(s, vec);
              const int64_t sp = sp1 > spv ? sp1 : spv;
              CHECK(partials_bytes(c, sp) + size_t(4 * c * 8) <= ws, "double workspace");
            }
          }
        }
  // Large shapes: grids within limits, workspace modest.
  const Shape big_nhwc{256, 64, 112 * 112, true};
  const NhwcGeometry g = nhwc_geometry(big_nhwc.c, big_nhwc.m(), 4);
  CHECK(g.tx == 16 && g.ty == 16 && g.tiles == 1 && g.splits == kTargetBlocks, "big nhwc grid");
  const Shape big_nchw{256, 2048, 49, false};
  const NchwGeometry h = nchw_geometry(big_nchw.n, big_nchw.c, big_nchw.hw, 1);
  CHECK(h.splits == 1 && h.chunk == 256 * 49, "big nchw grid");
  const size_t ws = keras_residual::cuda::workspace_bytes(DType::kFloat16, big_nchw);
  CHECK(ws <= size_t(1) << 20, "workspace of a large NCHW shape: %zu bytes", ws);
  CHECK(keras_residual::cuda::workspace_bytes(DType::kFloat32, Shape{4, 0, 9, true}) == 0,
        "no channels, no workspace");
}

// ------------------------------------------------------------ public API --

// Without a GPU the launches must fail cleanly (an error code, no crash);
// shapes with nothing to do return 0 without touching the device.
static void check_api_without_device() {
  float dummy[64] = {};
  const Shape empty{0, 0, 0, true};
  CHECK(keras_residual::cuda::batch_stats(DType::kFloat32, dummy, empty, dummy, dummy, dummy,
                                          nullptr) == 0,
        "empty batch_stats");
  CHECK(keras_residual::cuda::scale_shift_add_act(DType::kFloat32, dummy, nullptr,
                                                  Shape{0, 4, 4, true}, nullptr, dummy,
                                                  Act{Activation::kRelu, 0.0}, dummy,
                                                  nullptr) == 0,
        "empty forward");
  CHECK(keras_residual::cuda::scale_shift_add_act(DType::kFloat32, dummy, nullptr,
                                                  Shape{-1, 4, 4, true}, nullptr, dummy,
                                                  Act{Activation::kRelu, 0.0}, dummy,
                                                  nullptr) != 0,
        "negative size rejected");
  int count = 0;
  const bool have_gpu = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  (void)cudaGetLastError();
  if (have_gpu) return;  // the pointers above are host memory: launch nothing
  const int err = keras_residual::cuda::scale_shift_add_act(
      DType::kFloat32, dummy, nullptr, Shape{1, 4, 4, true}, nullptr, dummy,
      Act{Activation::kRelu, 0.0}, dummy, nullptr);
  CHECK(err != 0, "a launch without a GPU reports an error");
  const int err2 = keras_residual::cuda::batch_norm_add_act_backward(
      DType::kFloat16, dummy, dummy, nullptr, Shape{2, 8, 3, false}, dummy, dummy, nullptr,
      nullptr, 1e-3, Act{Activation::kGelu, 0.0}, dummy, nullptr, dummy, dummy, dummy, nullptr);
  CHECK(err2 != 0, "a backward launch without a GPU reports an error");
}

int main() {
  check_conversions();
  check_activation_values<float>();
  check_activation_values<double>();
  check_piecewise_linear<float>();
  check_piecewise_linear<double>();
  check_iterator();
  check_geometry();
  check_api_without_device();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
