// Runs every entry point of keras_residual/kernels_cuda.h (the CUDA kernels of
// csrc/cuda/kernels.cu, executed by the CPU-thread emulation of cuda_emu.h)
// and of keras_residual/kernels.h (the CPU kernels) on the same inputs, and
// checks both against a float64 reference computed here.
//
//   driver [--quick | --big] [--nonfinite | --all] [--filter T] [--print N] [--sms N]
//          [--verbose]
//
//   (default)    the emulator's own checks (shuffles, barriers, misuse it
//                must report; the float16 / bfloat16 conversions), then
//                finite inputs: every dtype x layout x activation x residual,
//                forward, statistics, the training forward and both
//                backward functions, over the
//                shapes C in {1, 3, 17, 67, 2048}, H*W in {1, 13, 49} and a
//                few more (vectorised paths, several reduction splits, empty
//                tensors). Tolerances: the rounding of the dtype and of the
//                arithmetic as the kernels do it, relative to the magnitudes
//                that enter each result.
//   --nonfinite  NaN and +-inf inputs: the NaN / inf pattern of every output
//                must be that of the reference, which follows the composite
//                Keras semantics: forward IEEE propagation (relu(NaN) = NaN,
//                relu6(inf) = 6, silu(-inf) = NaN, ...), mean / variance of
//                Keras' moments; backward each GradRule of kernels.h where it
//                has one (PyTorch's select, TensorFlow's multiply, JAX's
//                termwise), else the select. Classes that only the arithmetic's precision or a
//                rounding near a kink decides are not checked (counted), nor
//                the reductions they enter.
//   --all        both.
//   --quick      fewer cases (for the sanitizer builds).
//   --big        also the NCHW reductions with C = 2048 (2048 blocks of 256
//                threads per launch: minutes).
//   --filter T   only the cases whose description (as FAIL lines print it)
//                contains T, for example "batch_stats" or "float16".
//   --print N    FAIL lines printed (default 40; all are counted and tallied).
//   --sms N      multiprocessors the emulated device reports (default 1: the
//                elementwise grids are small, so threads grid-stride).
//
// Every pointer is either 16-byte aligned or misaligned by one element;
// outputs and workspaces are filled with NaN before each call, their guard
// bytes before and after must stay untouched, and inputs must stay
// unchanged. Exit status 0 when every check passes and the emulation
// recorded no misuse; the last line is the summary
//   emulation: N checks, F failures (...), ...
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <new>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "keras_residual/kernels.h"
#include "keras_residual/kernels_cuda.h"

using namespace keras_residual;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kAlpha = 0.2;     // leaky_relu's slope
constexpr double kEpsilon = 1e-3;  // batch_norm's epsilon
constexpr double kSafety = 2.0;    // on every tolerance
constexpr double kChunkTerms = 34.0;  // terms summed in P before the double accumulator (+2)

// ------------------------------------------------------------------ dtypes --

struct DT {
  DType id;
  const char* name;
  size_t s, p;  // bytes of storage and parameter values
  double u;     // unit roundoff of the arithmetic (parameter) type
  double us;    // unit roundoff of the storage type
  double tiny;  // spacing of the storage type's subnormals
};

const DT kDTypes[] = {
    {DType::kFloat32, "float32", 4, 4, 0x1p-24, 0x1p-24, 0x1p-149},
    {DType::kFloat64, "float64", 8, 8, 0x1p-53, 0x1p-53, 0x1p-1074},
    {DType::kFloat16, "float16", 2, 4, 0x1p-24, 0x1p-11, 0x1p-24},
    {DType::kBFloat16, "bfloat16", 2, 4, 0x1p-24, 0x1p-8, 0x1p-133},
};

double sload(const DT& t, const void* p, int64_t i) {
  switch (t.id) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat64: return static_cast<const double*>(p)[i];
    case DType::kFloat16: return __half2float(__ushort_as_half(static_cast<const uint16_t*>(p)[i]));
    case DType::kBFloat16:
      return __bfloat162float(__ushort_as_bfloat16(static_cast<const uint16_t*>(p)[i]));
  }
  return kNaN;
}

void sstore(const DT& t, void* p, int64_t i, double v) {
  switch (t.id) {
    case DType::kFloat32: static_cast<float*>(p)[i] = float(v); break;
    case DType::kFloat64: static_cast<double*>(p)[i] = v; break;
    case DType::kFloat16:
      static_cast<uint16_t*>(p)[i] = __half_as_ushort(__float2half_rn(float(v)));
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(p)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(float(v)));
      break;
  }
}

double pload(const DT& t, const void* p, int64_t i) {
  return t.p == 8 ? static_cast<const double*>(p)[i] : double(static_cast<const float*>(p)[i]);
}

void pstore(const DT& t, void* p, int64_t i, double v) {
  if (t.p == 8) {
    static_cast<double*>(p)[i] = v;
  } else {
    static_cast<float*>(p)[i] = float(v);
  }
}

// ----------------------------------------------------------------- buffers --

// n elements of `elem` bytes at p(): 16-byte aligned, or one element past
// a 64-byte boundary; the bytes before p() and `tail` bytes after the data
// are guards. Inputs have no tail (AddressSanitizer sees any read past them).
class Buf {
 public:
  Buf() = default;
  Buf(size_t elem, int64_t n, bool aligned, size_t tail)
      : elem_(elem), n_(size_t(n)), lead_(aligned ? 16 : elem), tail_(tail) {
    bytes_ = lead_ + n_ * elem_ + tail_;
    base_ = static_cast<unsigned char*>(::operator new(std::max<size_t>(bytes_, 1), std::align_val_t(64)));
    std::memset(base_, 0xA5, bytes_);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept { *this = std::move(o); }
  Buf& operator=(Buf&& o) noexcept {
    std::swap(elem_, o.elem_);
    std::swap(n_, o.n_);
    std::swap(lead_, o.lead_);
    std::swap(tail_, o.tail_);
    std::swap(bytes_, o.bytes_);
    std::swap(base_, o.base_);
    snap_.swap(o.snap_);
    return *this;
  }
  ~Buf() {
    if (base_ != nullptr) ::operator delete(base_, std::align_val_t(64));
  }

  void* p() const { return base_ + lead_; }
  int64_t n() const { return int64_t(n_); }
  void fill_bytes(unsigned char b) { std::memset(base_ + lead_, b, n_ * elem_); }
  void snapshot() { snap_.assign(base_, base_ + bytes_); }
  bool unchanged() const { return std::memcmp(snap_.data(), base_, bytes_) == 0; }
  bool guards_ok() const {
    for (size_t i = 0; i < lead_; ++i)
      if (base_[i] != 0xA5) return false;
    for (size_t i = lead_ + n_ * elem_; i < bytes_; ++i)
      if (base_[i] != 0xA5) return false;
    return true;
  }

 private:
  size_t elem_ = 0, n_ = 0, lead_ = 0, tail_ = 0, bytes_ = 0;
  unsigned char* base_ = nullptr;
  std::vector<unsigned char> snap_;
};

Buf storage(const DT& t, int64_t n, bool aligned, bool output) {
  Buf b(t.s, n, aligned, output ? 16 : 0);
  if (output)
    for (int64_t i = 0; i < n; ++i) sstore(t, b.p(), i, kNaN);
  return b;
}

Buf params(const DT& t, int64_t n, bool aligned, bool output) {
  Buf b(t.p, n, aligned, output ? 16 : 0);
  if (output)
    for (int64_t i = 0; i < n; ++i) pstore(t, b.p(), i, kNaN);
  return b;
}

Buf workspace(const DT& t, Shape s) {
  Buf b(1, int64_t(cuda::workspace_bytes(t.id, s)), true, 16);
  b.fill_bytes(0xFF);  // NaN as double and as float
  return b;
}

// --------------------------------------------------------------- checking --

struct Counters {
  long checks = 0, failures = 0, skipped = 0;
  long fail_cuda = 0, fail_cpu = 0, fail_pair = 0, fail_other = 0;
  long cases = 0;
} g_count;

int g_max_print = 40;
bool g_verbose = false;
std::string g_case;
std::string g_filter;  // run only the cases whose description contains it

// Failures per (function, activation, rule, side, output), for the summary.
std::map<std::string, long> g_tally;
std::string g_key;  // function, activation, rule of the running case

void failure(long& bucket, const char* fmt, ...) {
  ++g_count.failures;
  ++bucket;
  {
    // "cuda dx[3] = ..." -> "cuda dx"
    char head[64];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(head, sizeof(head), fmt, ap);
    va_end(ap);
    std::string h(head);
    const size_t cut = h.find_first_of("[=:");
    ++g_tally[g_key + ": " + h.substr(0, cut == std::string::npos ? h.size() : cut)];
  }
  if (g_count.failures > g_max_print) return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  std::printf("FAIL %s: %s\n", g_case.c_str(), buf);
}

void check_true(bool ok, const char* what) {
  ++g_count.checks;
  if (!ok) failure(g_count.fail_other, "%s", what);
}

int kind(double v);

// got within tol of ref; a NaN or infinite ref must be matched exactly
// (NaN by any NaN).
bool close(double got, double ref, double tol) {
  if (std::isnan(ref)) return std::isnan(got);
  if (std::isinf(ref)) return got == ref;
  return std::isfinite(got) && std::fabs(got - ref) <= tol;
}

// The CUDA result and the CPU result against the reference, and against
// each other. `skip`: the expected value is backend dependent (not checked).
void check3(const char* what, int64_t i, double cu, double cp, double ref, double tol,
            bool skip = false) {
  if (skip) {
    g_count.skipped += 3;
    return;
  }
  tol *= kSafety;
  g_count.checks += 3;
  if (!close(cu, ref, tol))
    failure(g_count.fail_cuda, "cuda %s[%" PRId64 "] = %.9g, reference %.9g (tol %.3g)", what, i,
            cu, ref, tol);
  if (!close(cp, ref, tol))
    failure(g_count.fail_cpu, "cpu %s[%" PRId64 "] = %.9g, reference %.9g (tol %.3g)", what, i,
            cp, ref, tol);
  const bool pair = std::isfinite(ref) ? close(cu, cp, 2 * tol) : kind(cu) == kind(cp);
  if (!pair)
    failure(g_count.fail_pair, "cuda-vs-cpu %s[%" PRId64 "]: cuda %.9g, cpu %.9g (tol %.3g)", what,
            i, cu, cp, 2 * tol);
}

void check_emulation(const char* call, int err) {
  static long seen = 0;
  ++g_count.checks;
  if (err != 0) failure(g_count.fail_cuda, "cuda::%s returned %d", call, err);
  ++g_count.checks;
  const long now = emu::error_count();
  if (now != seen) {
    failure(g_count.fail_cuda, "cuda::%s: %ld emulation error(s)", call, now - seen);
    for (const auto& m : emu::error_messages()) std::printf("  emulation: %s\n", m.c_str());
    seen = now;
  }
}

void check_buffers(const char* what, std::initializer_list<const Buf*> inputs,
                   std::initializer_list<const Buf*> outputs) {
  for (const Buf* b : inputs) {
    ++g_count.checks;
    if (!b->unchanged()) failure(g_count.fail_other, "%s: an input was modified", what);
  }
  for (const Buf* b : outputs) {
    ++g_count.checks;
    if (!b->guards_ok()) failure(g_count.fail_other, "%s: write outside an output", what);
  }
}

// --------------------------------------------------------------- reference --

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x1234567ull) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uni() { return double(next() >> 11) * 0x1p-53; }
  double uni(double a, double b) { return a + (b - a) * uni(); }
  double normal() {
    double u1 = uni();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * uni());
  }
};

// A float64 reference sum that is exact enough to judge float64 kernels:
// long double with Neumaier compensation; IEEE NaN / inf propagation.
struct Acc {
  long double s = 0, c = 0;
  void add(double v) {
    const long double x = v;
    if (!std::isfinite(x) || !std::isfinite(s)) {
      s += x;
      return;
    }
    const long double t = s + x;
    c += std::fabs(s) >= std::fabs(x) ? (s - t) + x : (x - t) + s;
    s = t;
  }
  double value() const { return std::isfinite(s) ? double(s + c) : double(s); }
};

bool is_relu_family(Activation a) {
  return a == Activation::kRelu || a == Activation::kLeakyRelu || a == Activation::kRelu6;
}
bool is_smooth(Activation a) { return a == Activation::kSilu || a == Activation::kGelu; }

const char* act_name(Activation a) {
  switch (a) {
    case Activation::kLinear: return "linear";
    case Activation::kRelu: return "relu";
    case Activation::kLeakyRelu: return "leaky_relu";
    case Activation::kRelu6: return "relu6";
    case Activation::kSilu: return "silu";
    case Activation::kGelu: return "gelu";
  }
  return "?";
}

// Act::grad_rule (GradRule) where kernels.h has it: the driver builds
// against kernels.h with and without it. The rules as kernels.h numbers
// them: kSelect (PyTorch's), kMultiply (TensorFlow's), kTermwise (JAX's).
template <class A>
constexpr bool has_grad_rule_v = requires(A a) { a.grad_rule; };
constexpr bool kHasGradRule = has_grad_rule_v<Act>;
constexpr int kRuleSelect = 0, kRuleMultiply = 1, kRuleTermwise = 2;
constexpr int kRules = kHasGradRule ? 3 : 1;

const char* rule_name(int rule) {
  if (rule == kRuleMultiply) return " grad=multiply";
  return rule == kRuleTermwise ? " grad=termwise" : "";
}

// Keras' activations in float64: IEEE propagation (NaN in, NaN out).
double act_forward(Activation a, double z) {
  if (std::isnan(z)) return z;
  switch (a) {
    case Activation::kLinear: return z;
    case Activation::kRelu: return z > 0 ? z : 0.0;
    case Activation::kLeakyRelu: return z > 0 ? z : kAlpha * z;
    case Activation::kRelu6: return z > 0 ? (z < 6 ? z : 6.0) : 0.0;
    case Activation::kSilu: return z * (1.0 / (1.0 + std::exp(-z)));  // x * sigmoid(x)
    case Activation::kGelu: return 0.5 * z * (1.0 + std::erf(z * 0.70710678118654752440));
  }
  return kNaN;
}

// g = dy * act'(z) as the Keras backends compute it (kernels.h, GradRule):
// `mul` TensorFlow (relu, relu6: dy * act'(z) with act'(NaN) = 0; gelu
// dy * Phi(z) + (dy * z) * phi(z)), else PyTorch (relu: z <= 0 ? 0 : dy;
// relu6: (0 < z < 6) ? dy : 0). silu' = s (1 + z (1 - s)) and gelu' = Phi
// + z phi are NaN at +-inf. R: the precision.
template <class R>
R grad_formula(Activation a, int rule, R dy, R z) {
  const bool mul = rule == kRuleMultiply, term = rule == kRuleTermwise;
  switch (a) {
    case Activation::kLinear: return dy;
    case Activation::kRelu:
      if (z > R(0)) return dy;
      if (mul) return dy * R(0);
      if (term) return R(0);
      return z <= R(0) ? R(0) : dy;
    case Activation::kLeakyRelu:
      if (term) return z >= R(0) ? dy : dy * R(kAlpha);
      return z > R(0) ? dy : dy * R(kAlpha);
    case Activation::kRelu6:
      if (z > R(0) && z < R(6)) return dy;
      return mul ? dy * R(0) : R(0);
    case Activation::kSilu: {
      const R sg = R(1) / (R(1) + std::exp(-z));
      if (term) return dy * sg + (dy * z) * (sg * (R(1) - sg));
      return dy * (sg * (R(1) + z * (R(1) - sg)));
    }
    case Activation::kGelu: {
      const R cdf = R(0.5) * (R(1) + std::erf(z * R(0.70710678118654752440)));
      const R pdf = std::exp(R(-0.5) * z * z) * R(0.39894228040143267794);
      return mul || term ? dy * cdf + (dy * z) * pdf : dy * (cdf + z * pdf);
    }
  }
  return R(NAN);
}

double act_derivative(Activation a, double z) { return grad_formula<double>(a, kRuleSelect, 1.0, z); }

// 0 finite, 1 NaN, 2 +inf, 3 -inf.
int kind(double v) { return std::isnan(v) ? 1 : (std::isinf(v) ? (v > 0 ? 2 : 3) : 0); }

// g = dy * act'(z) for z (exact) known to within dz, with its error bound.
struct Grad {
  double g;    // reference value
  double err;  // bound on |kernel g - g| (the arithmetic, z's error, kinks)
  bool skip;   // the precision or rounding decides the NaN / inf class: not checked
};

Grad grad_ref(const DT& t, Activation a, int rule, double dy, double z, double dz) {
  const double u = t.u;
  Grad r{grad_formula<double>(a, rule, dy, z), 0.0, false};
  const bool finite = std::isfinite(dy) && std::isfinite(z);
  if (std::isfinite(z) && is_relu_family(a)) {
    // Rounding may put the kernel's z on the other side of a kink (or on it).
    for (double kink : {0.0, 6.0}) {
      if (kink == 6.0 && a != Activation::kRelu6) continue;
      if (!(std::fabs(z - kink) <= 2 * dz)) continue;
      for (double zz : {std::nextafter(kink, -kInf), kink, std::nextafter(kink, kInf)}) {
        const double alt = grad_formula<double>(a, rule, dy, zz);
        if (kind(alt) != kind(r.g)) {
          r.skip = true;
        } else if (finite) {
          r.err = std::max(r.err, std::fabs(alt - r.g));
        }
      }
    }
  }
  if (!finite) {
    // Classes that the arithmetic's precision decides (sigmoid or the normal
    // pdf underflowing in float, the sign of act' near its zeros, z near 0 in
    // gelu's TensorFlow formula) are not checked.
    if (t.p == 4 && kind(grad_formula<float>(a, rule, float(dy), float(z))) != kind(r.g)) {
      r.skip = true;
    }
    if (std::isfinite(z) && is_smooth(a)) {
      const double dd = dz + 8 * u * (1 + std::fabs(z));
      if (std::fabs(act_derivative(a, z)) <= dd || std::fabs(z) <= 2 * dz) r.skip = true;
    }
    return r;
  }
  r.err += 2 * u * std::fabs(r.g);
  if (is_smooth(a)) r.err += std::fabs(dy) * (dz + 8 * u * (1 + std::fabs(z)));
  return r;
}

// ------------------------------------------------------------------ cases --

template <class A = Act>
A make_act(Activation kind, int rule) {
  A a{};
  a.kind = kind;
  a.alpha = kAlpha;
  if constexpr (has_grad_rule_v<A>) a.grad_rule = static_cast<decltype(a.grad_rule)>(rule);
  return a;
}

constexpr unsigned kForward = 1, kAffineBackward = 2, kBnBackward = 4, kAllOps = 7;

struct Case {
  const DT* t;
  Shape s;
  Activation act = Activation::kLinear;
  bool residual = false;
  bool aligned = true;
  bool want_dres = true;   // backward: dresidual wanted
  bool null_scale = false; // scale = nullptr (and dscale not wanted); bn: gamma = beta = nullptr
  bool specials = false;   // NaN / inf inputs
  int rule = kRuleSelect;  // backward: the GradRule
  uint64_t seed = 0;
};

int64_t channel_of(Shape s, int64_t i) { return s.channels_last ? i % s.c : (i / s.hw) % s.c; }

std::string describe(const char* op, const Case& k) {
  char buf[256];
  const bool stats = std::strcmp(op, "batch_stats") == 0;
  const bool backward = std::strstr(op, "backward") != nullptr;
  std::snprintf(buf, sizeof(buf), "%s %s n=%" PRId64 " c=%" PRId64 " hw=%" PRId64 " %s%s%s%s%s%s%s%s%s",
                op, k.t->name, k.s.n, k.s.c, k.s.hw, k.s.channels_last ? "NHWC" : "NCHW",
                stats ? "" : " ", stats ? "" : act_name(k.act),
                !stats && k.residual ? " +residual" : "", k.aligned ? "" : " misaligned",
                backward && !k.want_dres ? " no-dresidual" : "",
                !stats && k.null_scale ? " null-params" : "", k.specials ? " nonfinite" : "",
                backward ? rule_name(k.rule) : "");
  return buf;
}

bool selected(const char* op, const Case& k) {
  return g_filter.empty() || describe(op, k).find(g_filter) != std::string::npos;
}

// Input values. Finite: per-channel offsets (some large, for the shifted
// statistics) and spreads. With specials, about one element in 8 is NaN,
// +inf or -inf.
struct Inputs {
  std::vector<double> off, spread;
  Inputs(Rng& rng, int64_t c) : off(size_t(c)), spread(size_t(c)) {
    for (int64_t j = 0; j < c; ++j) {
      const double big = (j % 7 == 3) ? 100.0 : 1.0;
      off[size_t(j)] = rng.uni(-2, 2) * big;
      spread[size_t(j)] = rng.uni(0.5, 2.0);
    }
  }
};

double special(Rng& rng) {
  const int k = int(rng.next() % 3);
  if (k == 0) return kNaN;
  return k == 1 ? kInf : -kInf;
}

void fill_x(const Case& k, Rng& rng, const Inputs& in, Buf& x) {
  for (int64_t i = 0; i < x.n(); ++i) {
    const int64_t j = channel_of(k.s, i);
    double v = in.off[size_t(j)] + in.spread[size_t(j)] * rng.normal();
    if (k.specials && rng.uni() < 0.125) v = special(rng);
    sstore(*k.t, x.p(), i, v);
  }
}

void fill_normal(const Case& k, Rng& rng, Buf& b) {
  for (int64_t i = 0; i < b.n(); ++i) {
    double v = rng.normal();
    if (k.specials && rng.uni() < 0.125) v = special(rng);
    sstore(*k.t, b.p(), i, v);
  }
}

// Per-channel float64 statistics of x (two passes), for the reference and,
// rounded to P, as the batch_norm backward's mean and var.
void exact_stats(const Case& k, const Buf& x, std::vector<double>& mean, std::vector<double>& var,
                 bool finite_only) {
  const Shape s = k.s;
  const size_t c = size_t(s.c);
  std::vector<Acc> sum(c), sq(c);
  std::vector<double> cnt(c, 0.0);
  std::vector<long double> mu(c, 0.0L);
  for (int64_t i = 0; i < s.size(); ++i) {
    const double v = sload(*k.t, x.p(), i);
    if (finite_only && !std::isfinite(v)) continue;
    sum[size_t(channel_of(s, i))].add(v);
    cnt[size_t(channel_of(s, i))] += 1;
  }
  for (size_t j = 0; j < c; ++j) {
    if (cnt[j] > 0) mu[j] = (sum[j].s + sum[j].c) / cnt[j];
  }
  for (int64_t i = 0; i < s.size(); ++i) {
    const double v = sload(*k.t, x.p(), i);
    if (finite_only && !std::isfinite(v)) continue;
    const long double d = v - mu[size_t(channel_of(s, i))];
    sq[size_t(channel_of(s, i))].add(double(d * d));
  }
  mean.assign(c, kNaN);
  var.assign(c, kNaN);
  for (size_t j = 0; j < c; ++j) {
    if (cnt[j] > 0) {
      mean[j] = double(mu[j]);
      var[j] = sq[j].value() / cnt[j];
    }
  }
}

// ------------------------------------------------------------ batch_stats --

void run_stats(const Case& k) {
  const DT& t = *k.t;
  const Shape s = k.s;
  if (!selected("batch_stats", k)) return;
  ++g_count.cases;
  g_case = describe("batch_stats", k);
  g_key = std::string("batch_stats ") + k.t->name;
  Rng rng(k.seed);
  Inputs in(rng, s.c);
  Buf x = storage(t, s.size(), k.aligned, false);
  fill_x(k, rng, in, x);
  x.snapshot();
  Buf mc = params(t, s.c, k.aligned, true), vc = params(t, s.c, k.aligned, true);
  Buf mp = params(t, s.c, k.aligned, true), vp = params(t, s.c, k.aligned, true);
  Buf ws = workspace(t, s);
  check_emulation("batch_stats", cuda::batch_stats(t.id, x.p(), s, mc.p(), vc.p(), ws.p(), nullptr));
  cpu::batch_stats(t.id, x.p(), s, mp.p(), vp.p());
  check_buffers("batch_stats", {&x}, {&mc, &vc, &mp, &vp, &ws});

  // Reference: the mean and biased variance of Keras (IEEE: a NaN or an inf
  // makes the variance NaN; the mean is +-inf for infs of one sign).
  std::vector<double> mean, var;
  exact_stats(k, x, mean, var, false);
  const int64_t m = s.m();
  std::vector<double> t1(size_t(s.c), 0.0), t2(size_t(s.c), 0.0);
  for (int64_t i = 0; i < s.size(); ++i) {
    const int64_t j = channel_of(s, i);
    const double first = sload(t, x.p(), s.channels_last ? j : j * s.hw);
    const double d = sload(t, x.p(), i) - first;
    t1[size_t(j)] += std::fabs(d);
    t2[size_t(j)] += d * d;
  }
  for (int64_t j = 0; j < s.c; ++j) {
    double mref = mean[size_t(j)], vref = var[size_t(j)];
    if (m == 0) mref = vref = kNaN;
    const double tm = kChunkTerms * t.u * t1[size_t(j)] / double(m);
    const double tol_m = tm + t.u * (std::fabs(mref) + std::fabs(mean[size_t(j)]));
    const double d = m > 0 ? mref - sload(t, x.p(), s.channels_last ? j : j * s.hw) : 0.0;
    const double tol_v = kChunkTerms * t.u * t2[size_t(j)] / double(m) + 2 * std::fabs(d) * tm +
                         tm * tm + t.u * std::fabs(vref);
    check3("mean", j, pload(t, mc.p(), j), pload(t, mp.p(), j), mref, tol_m);
    check3("var", j, pload(t, vc.p(), j), pload(t, vp.p(), j), vref, tol_v);
  }
}

// ----------------------------------------------------- batch_norm_add_act --

// The training forward: its mean and var are batch_stats' (bit for bit), and
// y = act((x - mean) * gamma / sqrt(var + eps) + beta + residual) from them.
void run_bn_forward(const Case& k) {
  const DT& t = *k.t;
  const Shape s = k.s;
  if (!selected("batch_norm_add_act", k)) return;
  ++g_count.cases;
  g_case = describe("batch_norm_add_act", k);
  g_key = std::string("batch_norm_add_act ") + act_name(k.act);
  Rng rng(k.seed);
  Inputs in(rng, s.c);
  Buf x = storage(t, s.size(), k.aligned, false), r = storage(t, s.size(), k.aligned, false);
  fill_x(k, rng, in, x);
  fill_normal(k, rng, r);
  Buf gamma = params(t, s.c, k.aligned, false), beta = params(t, s.c, k.aligned, false);
  for (int64_t j = 0; j < s.c; ++j) {
    pstore(t, gamma.p(), j, rng.uni(0.5, 3.0) * (rng.uni() < 0.25 ? -1 : 1));
    pstore(t, beta.p(), j, rng.uni(-1.0, 1.0));
  }
  for (Buf* b : {&x, &r, &gamma, &beta}) b->snapshot();
  Buf yc = storage(t, s.size(), k.aligned, true), yp = storage(t, s.size(), k.aligned, true);
  Buf mc = params(t, s.c, k.aligned, true), vc = params(t, s.c, k.aligned, true);
  Buf mp = params(t, s.c, k.aligned, true), vp = params(t, s.c, k.aligned, true);
  Buf ms = params(t, s.c, k.aligned, true), vs = params(t, s.c, k.aligned, true);
  Buf ws = workspace(t, s), ws2 = workspace(t, s);
  const void* res = k.residual ? r.p() : nullptr;
  const Act act = make_act(k.act, kRuleSelect);
  check_emulation("batch_norm_add_act",
                  cuda::batch_norm_add_act(t.id, x.p(), res, s, gamma.p(), beta.p(), kEpsilon,
                                           act, yc.p(), mc.p(), vc.p(), ws.p(), nullptr));
  check_emulation("batch_stats",
                  cuda::batch_stats(t.id, x.p(), s, ms.p(), vs.p(), ws2.p(), nullptr));
  cpu::batch_norm_add_act(t.id, x.p(), res, s, gamma.p(), beta.p(), kEpsilon, act, yp.p(),
                          mp.p(), vp.p());
  check_buffers("batch_norm_add_act", {&x, &r, &gamma, &beta},
                {&yc, &yp, &mc, &vc, &mp, &vp, &ms, &vs, &ws, &ws2});

  for (int64_t j = 0; j < s.c; ++j) {
    for (auto [got, want] : {std::pair{pload(t, mc.p(), j), pload(t, ms.p(), j)},
                             std::pair{pload(t, vc.p(), j), pload(t, vs.p(), j)}}) {
      ++g_count.checks;
      if (!(got == want || (std::isnan(got) && std::isnan(want))))
        failure(g_count.fail_cuda, "cuda batch_norm_add_act stats[%" PRId64 "] = %.17g, "
                "batch_stats %.17g", j, got, want);
    }
  }
  // y from the CUDA statistics in float64; the CPU's differ by the
  // statistics' rounding, which the tolerance adds.
  for (int64_t i = 0; i < s.size(); ++i) {
    const int64_t j = channel_of(s, i);
    const double m = pload(t, mc.p(), j), v = pload(t, vc.p(), j);
    const double dm = std::fabs(m - pload(t, mp.p(), j)), dv = std::fabs(v - pload(t, vp.p(), j));
    const double sc = pload(t, gamma.p(), j) / std::sqrt(v + kEpsilon);
    const double sh = pload(t, beta.p(), j) - m * sc;
    const double xv = sload(t, x.p(), i), rv = k.residual ? sload(t, r.p(), i) : 0.0;
    const double z = xv * sc + sh + rv;
    const double y = act_forward(k.act, z);
    const double dstats = std::fabs(sc) * (dm + std::fabs(xv - m) * dv / (2 * (v + kEpsilon)));
    const double dz = 6 * t.u * (std::fabs(xv * sc) + std::fabs(m * sc) + std::fabs(sh) +
                                 std::fabs(rv)) + dstats;
    double tol = 1.2 * dz + t.us * std::fabs(y) + t.tiny;
    if (is_smooth(k.act)) tol += 8 * t.u * (1 + std::fabs(z));
    check3("y", i, sload(t, yc.p(), i), sload(t, yp.p(), i), y, tol);
  }
}

// ---------------------------------------------------- scale_shift_add_act --

void run_forward(const Case& k) {
  const DT& t = *k.t;
  const Shape s = k.s;
  if (!selected("scale_shift_add_act", k)) return;
  ++g_count.cases;
  g_case = describe("scale_shift_add_act", k);
  g_key = std::string("scale_shift_add_act ") + act_name(k.act);
  Rng rng(k.seed);
  Inputs in(rng, s.c);
  Buf x = storage(t, s.size(), k.aligned, false), r = storage(t, s.size(), k.aligned, false);
  fill_x(k, rng, in, x);
  fill_normal(k, rng, r);
  Buf sc = params(t, s.c, k.aligned, false), sh = params(t, s.c, k.aligned, false);
  for (int64_t j = 0; j < s.c; ++j) {
    pstore(t, sc.p(), j, rng.uni(0.5, 3.0) * (rng.uni() < 0.25 ? -1 : 1));
    pstore(t, sh.p(), j, rng.uni(-1.0, 1.0));
  }
  for (Buf* b : {&x, &r, &sc, &sh}) b->snapshot();
  Buf yc = storage(t, s.size(), k.aligned, true), yp = storage(t, s.size(), k.aligned, true);
  const void* res = k.residual ? r.p() : nullptr;
  const void* scale = k.null_scale ? nullptr : sc.p();
  const Act act = make_act(k.act, k.rule);
  check_emulation("scale_shift_add_act", cuda::scale_shift_add_act(t.id, x.p(), res, s, scale,
                                                                    sh.p(), act, yc.p(), nullptr));
  cpu::scale_shift_add_act(t.id, x.p(), res, s, scale, sh.p(), act, yp.p());
  check_buffers("scale_shift_add_act", {&x, &r, &sc, &sh}, {&yc, &yp});

  for (int64_t i = 0; i < s.size(); ++i) {
    const int64_t j = channel_of(s, i);
    const double xv = sload(t, x.p(), i), rv = k.residual ? sload(t, r.p(), i) : 0.0;
    const double a = k.null_scale ? 1.0 : pload(t, sc.p(), j), b = pload(t, sh.p(), j);
    const double z = xv * a + b + rv;
    const double y = act_forward(k.act, z);
    const double dz = 3 * t.u * (std::fabs(xv * a) + std::fabs(b) + std::fabs(rv));
    double tol = 1.2 * dz + t.us * std::fabs(y) + t.tiny;
    if (is_smooth(k.act)) tol += 8 * t.u * (1 + std::fabs(z));
    check3("y", i, sload(t, yc.p(), i), sload(t, yp.p(), i), y, tol);
  }
}

// ------------------------------------------- scale_shift_add_act_backward --

void run_affine_backward(const Case& k) {
  const DT& t = *k.t;
  const Shape s = k.s;
  if (!selected("scale_shift_add_act_backward", k)) return;
  ++g_count.cases;
  g_case = describe("scale_shift_add_act_backward", k);
  g_key = std::string("scale_shift_add_act_backward ") + act_name(k.act) + rule_name(k.rule);
  Rng rng(k.seed);
  Inputs in(rng, s.c);
  Buf dy = storage(t, s.size(), k.aligned, false), x = storage(t, s.size(), k.aligned, false),
      r = storage(t, s.size(), k.aligned, false);
  fill_normal(k, rng, dy);
  fill_x(k, rng, in, x);
  fill_normal(k, rng, r);
  Buf sc = params(t, s.c, k.aligned, false), sh = params(t, s.c, k.aligned, false);
  for (int64_t j = 0; j < s.c; ++j) {
    pstore(t, sc.p(), j, rng.uni(0.5, 3.0) * (rng.uni() < 0.25 ? -1 : 1));
    pstore(t, sh.p(), j, rng.uni(-1.0, 1.0));
  }
  for (Buf* b : {&dy, &x, &r, &sc, &sh}) b->snapshot();
  Buf dxc = storage(t, s.size(), k.aligned, true), dxp = storage(t, s.size(), k.aligned, true);
  Buf drc = storage(t, s.size(), k.aligned, true), drp = storage(t, s.size(), k.aligned, true);
  Buf dsc = params(t, s.c, k.aligned, true), dsp = params(t, s.c, k.aligned, true);
  Buf dhc = params(t, s.c, k.aligned, true), dhp = params(t, s.c, k.aligned, true);
  Buf ws = workspace(t, s);
  const void* res = k.residual ? r.p() : nullptr;
  const void* scale = k.null_scale ? nullptr : sc.p();
  const Act act = make_act(k.act, k.rule);
  check_emulation("scale_shift_add_act_backward",
                  cuda::scale_shift_add_act_backward(
                      t.id, dy.p(), x.p(), res, s, scale, sh.p(), act, dxc.p(),
                      k.want_dres ? drc.p() : nullptr, k.null_scale ? nullptr : dsc.p(), dhc.p(),
                      ws.p(), nullptr));
  cpu::scale_shift_add_act_backward(t.id, dy.p(), x.p(), res, s, scale, sh.p(), act, dxp.p(),
                                    k.want_dres ? drp.p() : nullptr,
                                    k.null_scale ? nullptr : dsp.p(), dhp.p());
  check_buffers("scale_shift_add_act_backward", {&dy, &x, &r, &sc, &sh},
                {&dxc, &dxp, &drc, &drp, &dsc, &dsp, &dhc, &dhp, &ws});

  std::vector<Acc> sg(size_t(s.c)), sgx(size_t(s.c));
  std::vector<double> tg(size_t(s.c), 0.0), tgx(size_t(s.c), 0.0);
  std::vector<bool> skip(size_t(s.c), false);
  for (int64_t i = 0; i < s.size(); ++i) {
    const int64_t j = channel_of(s, i);
    const double xv = sload(t, x.p(), i), rv = k.residual ? sload(t, r.p(), i) : 0.0;
    const double dyv = sload(t, dy.p(), i);
    const double a = k.null_scale ? 1.0 : pload(t, sc.p(), j), b = pload(t, sh.p(), j);
    const double z = xv * a + b + rv;
    const double dz = 3 * t.u * (std::fabs(xv * a) + std::fabs(b) + std::fabs(rv));
    const Grad gr = grad_ref(t, k.act, k.rule, dyv, z, dz);
    const size_t js = size_t(j);
    sg[js].add(gr.g);
    sgx[js].add(gr.g * xv);
    tg[js] += gr.err + kChunkTerms * t.u * std::fabs(gr.g);
    tgx[js] += (gr.err + kChunkTerms * t.u * std::fabs(gr.g)) * std::fabs(xv);
    if (gr.skip) skip[js] = true;
    if (k.want_dres) {
      check3("dresidual", i, sload(t, drc.p(), i), sload(t, drp.p(), i), gr.g,
             gr.err + t.us * std::fabs(gr.g) + t.tiny, gr.skip);
    }
    const double dx = gr.g * a;
    check3("dx", i, sload(t, dxc.p(), i), sload(t, dxp.p(), i), dx,
           gr.err * std::fabs(a) + (t.u + t.us) * std::fabs(dx) + t.tiny, gr.skip);
  }
  for (int64_t j = 0; j < s.c; ++j) {
    const size_t js = size_t(j);
    const double dshift = sg[js].value(), dscale = sgx[js].value();
    check3("dshift", j, pload(t, dhc.p(), j), pload(t, dhp.p(), j), dshift,
           tg[js] + t.u * std::fabs(dshift), skip[js]);
    if (!k.null_scale) {
      check3("dscale", j, pload(t, dsc.p(), j), pload(t, dsp.p(), j), dscale,
             tgx[js] + t.u * std::fabs(dscale), skip[js]);
    }
  }
}

// -------------------------------------------- batch_norm_add_act_backward --

void run_bn_backward(const Case& k) {
  const DT& t = *k.t;
  const Shape s = k.s;
  if (!selected("batch_norm_add_act_backward", k)) return;
  ++g_count.cases;
  g_case = describe("batch_norm_add_act_backward", k);
  g_key = std::string("batch_norm_add_act_backward ") + act_name(k.act) + rule_name(k.rule);
  Rng rng(k.seed);
  Inputs in(rng, s.c);
  Buf dy = storage(t, s.size(), k.aligned, false), x = storage(t, s.size(), k.aligned, false),
      r = storage(t, s.size(), k.aligned, false);
  fill_normal(k, rng, dy);
  fill_x(k, rng, in, x);
  fill_normal(k, rng, r);
  // mean and var: the batch statistics (of the finite values), rounded to P.
  std::vector<double> em, ev;
  exact_stats(k, x, em, ev, true);
  Buf mean = params(t, s.c, k.aligned, false), var = params(t, s.c, k.aligned, false);
  Buf gamma = params(t, s.c, k.aligned, false), beta = params(t, s.c, k.aligned, false);
  for (int64_t j = 0; j < s.c; ++j) {
    const size_t js = size_t(j);
    pstore(t, mean.p(), j, std::isnan(em[js]) ? 0.0 : em[js]);
    pstore(t, var.p(), j, std::isnan(ev[js]) ? 1.0 : ev[js]);
    pstore(t, gamma.p(), j, rng.uni(0.5, 3.0) * (rng.uni() < 0.25 ? -1 : 1));
    pstore(t, beta.p(), j, rng.uni(-1.0, 1.0));
  }
  for (Buf* b : {&dy, &x, &r, &mean, &var, &gamma, &beta}) b->snapshot();
  Buf dxc = storage(t, s.size(), k.aligned, true), dxp = storage(t, s.size(), k.aligned, true);
  Buf drc = storage(t, s.size(), k.aligned, true), drp = storage(t, s.size(), k.aligned, true);
  Buf dgc = params(t, s.c, k.aligned, true), dgp = params(t, s.c, k.aligned, true);
  Buf dbc = params(t, s.c, k.aligned, true), dbp = params(t, s.c, k.aligned, true);
  Buf ws = workspace(t, s);
  const void* res = k.residual ? r.p() : nullptr;
  const void* gp = k.null_scale ? nullptr : gamma.p();
  const void* bp = k.null_scale ? nullptr : beta.p();
  const Act act = make_act(k.act, k.rule);
  check_emulation("batch_norm_add_act_backward",
                  cuda::batch_norm_add_act_backward(
                      t.id, dy.p(), x.p(), res, s, mean.p(), var.p(), gp, bp, kEpsilon, act,
                      dxc.p(), k.want_dres ? drc.p() : nullptr, dgc.p(), dbc.p(), ws.p(),
                      nullptr));
  cpu::batch_norm_add_act_backward(t.id, dy.p(), x.p(), res, s, mean.p(), var.p(), gp, bp,
                                   kEpsilon, act, dxp.p(), k.want_dres ? drp.p() : nullptr,
                                   dgp.p(), dbp.p());
  check_buffers("batch_norm_add_act_backward", {&dy, &x, &r, &mean, &var, &gamma, &beta},
                {&dxc, &dxp, &drc, &drp, &dgc, &dgp, &dbc, &dbp, &ws});

  const int64_t m = s.m();
  const size_t c = size_t(s.c);
  std::vector<double> invstd(c), scj(c), mu(c);
  for (size_t j = 0; j < c; ++j) {
    invstd[j] = 1.0 / std::sqrt(pload(t, var.p(), int64_t(j)) + kEpsilon);
    const double gm = k.null_scale ? 1.0 : pload(t, gamma.p(), int64_t(j));
    scj[j] = gm * invstd[j];
    mu[j] = pload(t, mean.p(), int64_t(j));
  }
  std::vector<Grad> grads(size_t(s.size()));
  std::vector<Acc> sg(c), sgx(c);
  std::vector<double> tg(c, 0.0), tgx(c, 0.0);
  std::vector<bool> skip(c, false);
  for (int64_t i = 0; i < s.size(); ++i) {
    const size_t j = size_t(channel_of(s, i));
    const double xv = sload(t, x.p(), i), rv = k.residual ? sload(t, r.p(), i) : 0.0;
    const double dyv = sload(t, dy.p(), i);
    const double bt = k.null_scale ? 0.0 : pload(t, beta.p(), int64_t(j));
    const double sh = bt - mu[j] * scj[j];
    const double z = (xv - mu[j]) * scj[j] + bt + rv;  // the composite's z
    const double dz = 4 * t.u * (std::fabs(xv * scj[j]) + std::fabs(sh) + std::fabs(rv));
    const Grad gr = grad_ref(t, k.act, k.rule, dyv, z, dz);
    grads[size_t(i)] = gr;
    const double xc = xv - mu[j];
    sg[j].add(gr.g);
    sgx[j].add(gr.g * xc);
    tg[j] += gr.err + kChunkTerms * t.u * std::fabs(gr.g);
    tgx[j] += (gr.err + kChunkTerms * t.u * std::fabs(gr.g)) * std::fabs(xc);
    if (gr.skip) skip[j] = true;
    if (k.want_dres) {
      check3("dresidual", i, sload(t, drc.p(), i), sload(t, drp.p(), i), gr.g,
             gr.err + t.us * std::fabs(gr.g) + t.tiny, gr.skip);
    }
  }
  std::vector<double> dbeta(c), dgamma(c), tdb(c), tdg(c);
  for (size_t j = 0; j < c; ++j) {
    dbeta[j] = sg[j].value();
    dgamma[j] = sgx[j].value() * invstd[j];
    tdb[j] = tg[j];
    tdg[j] = tgx[j] * invstd[j];
    check3("dbeta", int64_t(j), pload(t, dbc.p(), int64_t(j)), pload(t, dbp.p(), int64_t(j)),
           dbeta[j], tdb[j] + t.u * std::fabs(dbeta[j]), skip[j]);
    check3("dgamma", int64_t(j), pload(t, dgc.p(), int64_t(j)), pload(t, dgp.p(), int64_t(j)),
           dgamma[j], tdg[j] + t.u * std::fabs(dgamma[j]), skip[j]);
  }
  // dx = sc / m * (m * g - dbeta - xhat * dgamma), xhat = (x - mean) * invstd.
  for (int64_t i = 0; i < s.size(); ++i) {
    const size_t j = size_t(channel_of(s, i));
    const Grad& gr = grads[size_t(i)];
    const double xv = sload(t, x.p(), i);
    const double xhat = (xv - mu[j]) * invstd[j];
    const double md = double(m);
    const double dx = scj[j] / md * (md * gr.g - dbeta[j] - xhat * dgamma[j]);
    const double A = std::fabs(scj[j] * gr.g);
    const double B = std::fabs(scj[j] / md * xhat * dgamma[j]);
    const double C = std::fabs(scj[j] / md * dbeta[j]);
    const double tol = std::fabs(scj[j]) * (gr.err + t.us * std::fabs(gr.g) + t.tiny) +
                       std::fabs(scj[j]) / md * (std::fabs(xhat) * tdg[j] + tdb[j]) +
                       4 * t.u * (A + B + C) + (t.u + t.us) * std::fabs(dx) + t.tiny;
    check3("dx", i, sload(t, dxc.p(), i), sload(t, dxp.p(), i), dx, tol, skip[j]);
  }
}

// -------------------------------------------------- the emulation itself --

// The emulated conversions against the compiler's _Float16 and the
// bfloat16 definition, on every half pattern and on floats near the
// rounding boundaries.
void check_conversions() {
  g_case = "conversions";
#ifdef __FLT16_MAX__
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 hv;
    const uint16_t hb = uint16_t(h);
    std::memcpy(&hv, &hb, 2);
    const float f = __half2float(__ushort_as_half(hb));
    const float ref = float(hv);
    check_true(std::isnan(ref) ? std::isnan(f) : std::memcmp(&f, &ref, 4) == 0, "half -> float");
  }
  Rng rng(7);
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = uint32_t(rng.next());
    if (i % 4 == 0) u = (u & 0x8000FFFFu) | ((uint32_t(rng.next() % 46) + 100u) << 23);
    float f;
    std::memcpy(&f, &u, 4);
    const _Float16 hv = _Float16(f);
    uint16_t ref;
    std::memcpy(&ref, &hv, 2);
    const uint16_t got = __half_as_ushort(__float2half_rn(f));
    const bool nan = std::isnan(f);
    check_true(nan ? ((got & 0x7c00) == 0x7c00 && (got & 0x3ff) != 0) : got == ref, "float -> half");
  }
#endif
  Rng rng2(11);
  for (int i = 0; i < 100000; ++i) {
    const uint32_t u = uint32_t(rng2.next());
    float f;
    std::memcpy(&f, &u, 4);
    const uint16_t b = __bfloat16_as_ushort(__float2bfloat16_rn(f));
    if (std::isnan(f)) {
      check_true(std::isnan(__bfloat162float(__ushort_as_bfloat16(b))), "float -> bf16 NaN");
      continue;
    }
    // Round to nearest even by the definition: the nearer of the two
    // neighbours, the even one on a tie.
    const uint32_t lo = u & 0xFFFF0000u, hi = lo + 0x10000u;
    float flo, fhi;
    std::memcpy(&flo, &lo, 4);
    std::memcpy(&fhi, &hi, 4);
    // Past the largest finite value, the next "neighbour" is 2^128 (inf).
    const double dhi_value = (hi & 0x7FFFFFFFu) == 0x7F800000u ? std::copysign(0x1p128, f) : double(fhi);
    const double dlo = std::fabs(double(f) - double(flo));
    const double dhi = std::fabs(dhi_value - double(f));
    uint16_t ref = uint16_t(lo >> 16);
    if (dhi < dlo || (dhi == dlo && ((lo >> 16) & 1u))) ref = uint16_t(hi >> 16);
    check_true(b == ref, "float -> bf16");
  }
}

// ------------------------------------------------------ emulator checks --
// The emulation itself: shuffles, __syncthreads with shared memory, 2D
// blocks, and the misuse it must report.

__global__ void selftest_kernel(int* out_down, int* out_xor, int* out_up, int* out_idx,
                                int* out_block) {
  __shared__ int sh[256];
  const int tid = int(threadIdx.y * blockDim.x + threadIdx.x);
  const int lane = tid & 31;
  const int v = tid + 1 + 1000 * int(blockIdx.x);
  int down = v, x = v;
  for (int off = 16; off > 0; off >>= 1) down += __shfl_down_sync(0xffffffffu, down, off);
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  const int up = __shfl_up_sync(0xffffffffu, v, 1);
  const int idx = __shfl_sync(0xffffffffu, v, 31 - lane);
  sh[tid] = v;
  __syncthreads();
  const int g = int(blockIdx.x) * 256 + tid;
  out_down[g] = down;
  out_xor[g] = x;
  out_up[g] = up;
  out_idx[g] = idx;
  if (tid == 0) {
    int total = 0;
    for (int i = 0; i < 256; ++i) total += sh[i];
    out_block[blockIdx.x] = total;
  }
}

__global__ void selftest_half_warp(int* out, unsigned mask) {
  if ((threadIdx.x & 31) >= 16) return;  // the upper half of each warp leaves
  out[threadIdx.x] = __shfl_xor_sync(mask, int(threadIdx.x), 1);
}

void check_emulator() {
  g_case = "emulator";
  emu::reset_errors();
  constexpr int kBlocks = 3;
  std::vector<int> down(kBlocks * 256), x(kBlocks * 256), up(kBlocks * 256), idx(kBlocks * 256),
      block(kBlocks);
  emu::launch(selftest_kernel, emu::LaunchConfig(dim3(kBlocks), dim3(32, 8)), down.data(),
              x.data(), up.data(), idx.data(), block.data());
  check_true(cudaGetLastError() == cudaSuccess, "self-test launch");
  for (int b = 0; b < kBlocks; ++b) {
    int total = 0;
    for (int t = 0; t < 256; ++t) total += t + 1 + 1000 * b;
    check_true(block[size_t(b)] == total, "__syncthreads + __shared__ block sum");
    for (int w = 0; w < 8; ++w) {
      auto val = [&](int lane) { return w * 32 + lane + 1 + 1000 * b; };
      int wsum = 0;
      for (int l = 0; l < 32; ++l) wsum += val(l);
      const size_t g0 = size_t(b * 256 + w * 32);
      check_true(down[g0] == wsum, "__shfl_down_sync warp sum in lane 0");
      for (int l = 0; l < 32; ++l) {
        check_true(x[g0 + size_t(l)] == wsum, "__shfl_xor_sync butterfly sum");
        check_true(up[g0 + size_t(l)] == val(l == 0 ? 0 : l - 1), "__shfl_up_sync");
        check_true(idx[g0 + size_t(l)] == val(31 - l), "__shfl_sync");
      }
    }
  }
  std::vector<int> out(64, -1);
  emu::launch(selftest_half_warp, emu::LaunchConfig(dim3(1), dim3(64)), out.data(), 0x0000ffffu);
  check_true(emu::error_count() == 0, "a shuffle among the lanes that stay is fine");
  check_true(out[0] == 1 && out[1] == 0 && out[15] == 14 && out[32] == 33, "half-warp shuffle");
  emu::launch(selftest_half_warp, emu::LaunchConfig(dim3(1), dim3(64)), out.data(), 0xffffffffu);
  check_true(emu::error_count() > 0, "a shuffle whose mask names exited lanes is reported");
  emu::reset_errors();
  emu::launch(selftest_half_warp, emu::LaunchConfig(dim3(1), dim3(2048)), out.data(), 0xffffffffu);
  check_true(cudaGetLastError() == cudaErrorInvalidConfiguration && emu::error_count() == 1,
             "a block of 2048 threads is refused");
  check_true(cudaGetLastError() == cudaSuccess, "cudaGetLastError clears the error");
  emu::reset_errors();
}

// ------------------------------------------------------------------- main --

constexpr unsigned kAllDT = 15, kF32 = 1, kF64 = 2, kF16 = 4, kBF16 = 8;
constexpr unsigned kNHWC = 1, kNCHW = 2, kBoth = 3;
constexpr int kAnyAlign = 0, kAligned = 1, kMisaligned = 2;

// A group of cases: a shape, the dtypes and layouts to run it with, and
// which of the twelve (activation, residual) pairs run forward and both
// backward functions there.
struct Plan {
  int64_t n, c, hw;
  unsigned dtypes;   // bit d: kDTypes[d]
  unsigned layouts;  // 1 NHWC, 2 NCHW
  bool stats;        // batch_stats once per dtype and layout
  int pairs;         // 12: all; k < 12: k pairs, rotating from one run to the next
  unsigned ops = kAllOps;
  int align = kAnyAlign;  // pointers: 16-byte aligned, misaligned, or either (hash)
};

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

uint64_t mix(uint64_t v) {
  v ^= v >> 33;
  v *= 0xff51afd7ed558ccdull;
  v ^= v >> 33;
  v *= 0xc4ceb9fe1a85ec53ull;
  return v ^ (v >> 33);
}

const Activation kActs[] = {Activation::kLinear, Activation::kRelu, Activation::kLeakyRelu,
                            Activation::kRelu6, Activation::kSilu, Activation::kGelu};

void run_plans(const std::vector<Plan>& plans, bool specials) {
  uint64_t serial = specials ? 1000000 : 0;
  int rotation = 0;
  double last = seconds();
  for (const Plan& pl : plans) {
    for (int d = 0; d < 4; ++d) {
      if (((pl.dtypes >> d) & 1u) == 0) continue;
      const DT& t = kDTypes[d];
      for (int layout = 0; layout < 2; ++layout) {
        if (((pl.layouts >> layout) & 1u) == 0) continue;
        Case base;
        base.t = &t;
        base.s = Shape{pl.n, pl.c, pl.hw, layout == 0};
        base.specials = specials;
        auto vary = [&](Case k) {
          const uint64_t h = mix(++serial);
          k.seed = serial;
          k.aligned = pl.align == kAnyAlign ? (h & 1) != 0 : pl.align == kAligned;
          k.want_dres = (h & 2) != 0;
          k.null_scale = (h & 12) == 12;
          if (!specials) k.rule = int((h >> 4) % uint64_t(kRules));
          return k;
        };
        if (pl.stats) {
          run_stats(vary(base));
          Case k = base;
          k.act = kActs[(serial / 2) % 6];
          k.residual = serial % 2 != 0;
          run_bn_forward(vary(k));
        }
        for (int q = 0; q < std::min(pl.pairs, 12); ++q) {
          // All pairs in order, or pl.pairs of them spread over the twelve,
          // starting where the previous run stopped.
          const int pair = pl.pairs >= 12 ? q : (rotation + q * 12 / pl.pairs) % 12;
          Case k = base;
          k.act = kActs[pair / 2];
          k.residual = pair % 2 != 0;
          if (pl.ops & kForward) run_forward(vary(k));
          // Non-finite inputs: the backward under each gradient rule.
          for (int rule = 0; rule < (specials ? kRules : 1); ++rule) {
            k.rule = rule;
            if (pl.ops & kAffineBackward) run_affine_backward(vary(k));
            if (pl.ops & kBnBackward) run_bn_backward(vary(k));
          }
        }
        if (pl.pairs < 12) rotation += 5;
        if (g_verbose) {
          const double now = seconds();
          std::printf("done n=%" PRId64 " c=%" PRId64 " hw=%" PRId64 " %s %s: %ld checks, %.2f s\n",
                      pl.n, pl.c, pl.hw, t.name, layout == 0 ? "NHWC" : "NCHW", g_count.checks,
                      now - last);
          last = now;
          std::fflush(stdout);
        }
      }
    }
  }
}

// The cost of a case is its blocks: 256 OS threads each, about 12 ms for a
// block whose warps shuffle (NCHW reductions: c blocks; the finishing
// kernels: c warps), 1-2 ms for one that only synchronises. So the wide
// shapes run a few cases, the narrow ones all of them.
std::vector<Plan> regular_plans(bool quick, bool big) {
  if (quick) {
    // every kernel and path once or more, for the sanitizer builds
    return {
        {2, 3, 13, kAllDT, kBoth, true, 2, kAllOps},
        {2, 16, 16, kAllDT, kBoth, true, 1, kAllOps, kAligned},  // 128-bit paths
        {3, 5, 400, kF32, kBoth, true, 1, kAffineBackward},      // several splits
        {2, 67, 1, kBF16, kNHWC, true, 1, kBnBackward},          // several tiles
        {0, 3, 13, kF16, kBoth, true, 1, kAllOps},               // empty
    };
  }
  std::vector<Plan> plans = {
      // every dtype x layout x activation x residual x function
      {2, 3, 13, kAllDT, kBoth, true, 12, kAllOps},
      // the shapes C in {1, 3, 17, 67, 2048} x H*W in {1, 13, 49}
      {2, 1, 1, kAllDT, kBoth, true, 2, kAllOps},
      {3, 1, 13, kAllDT, kBoth, true, 2, kAllOps},
      {2, 1, 49, kAllDT, kBoth, true, 2, kAllOps},
      {2, 3, 1, kAllDT, kBoth, true, 2, kAllOps},
      {1, 3, 49, kAllDT, kBoth, true, 2, kAllOps},
      {3, 17, 1, kAllDT, kNHWC, true, 2, kAllOps},
      {3, 17, 1, kF16, kNCHW, true, 1, kAllOps},
      {2, 17, 13, kAllDT, kNHWC, true, 1, kAllOps},
      {2, 17, 13, kF64, kNCHW, true, 1, kAllOps},
      {2, 17, 49, kAllDT, kNHWC, true, 1, kAllOps},
      {2, 17, 49, kBF16, kNCHW, true, 1, kAllOps},
      {2, 67, 1, kAllDT, kNHWC, true, 1, kAllOps},
      {2, 67, 1, kAllDT, kNCHW, false, 1, kForward},
      {1, 67, 13, kF32 | kBF16, kNHWC, true, 1, kAllOps},
      {1, 67, 13, kF32, kNCHW, true, 1, kForward},
      {2, 67, 49, kF16 | kF64, kNHWC, true, 1, kAllOps},
      {2, 67, 49, kBF16, kNCHW, false, 1, kBnBackward},
      {2, 2048, 1, kAllDT, kBoth, false, 2, kForward},
      {1, 2048, 13, kAllDT, kBoth, false, 1, kForward},
      {2, 2048, 1, kF16, kNHWC, false, 1, kBnBackward, kAligned},
      // the 128-bit paths (C and H*W multiples of 8), several splits per
      // channel, empty tensors
      {2, 16, 16, kAllDT, kNHWC, true, 2, kAllOps, kAligned},
      {2, 16, 16, kF16 | kF32, kNCHW, true, 1, kAllOps, kAligned},
      {1, 8, 64, kF64 | kBF16, kBoth, true, 1, kAllOps},
      {3, 5, 400, kAllDT, kNHWC, true, 1, kAllOps},
      {3, 5, 400, kF32 | kBF16, kNCHW, true, 1, kAllOps},
      {0, 3, 13, kAllDT, kBoth, true, 1, kAllOps},
      {2, 0, 5, kF32 | kF16, kBoth, true, 1, kAllOps},
  };
  if (big) {
    // The wide reductions: an NHWC finishing grid of 256 blocks whose warps
    // all shuffle (seconds); NCHW 2048 blocks of 256 threads (a minute).
    plans.push_back({1, 2048, 13, kF32, kNHWC, true, 1, kAllOps, kMisaligned});
    plans.push_back({1, 2048, 13, kF32, kNCHW, true, 0, kAllOps});
    plans.push_back({2, 2048, 1, kBF16, kNCHW, false, 1, kAffineBackward | kBnBackward});
  }
  return plans;
}

std::vector<Plan> nonfinite_plans(bool quick) {
  if (quick) {
    return {
        {2, 3, 13, kF32 | kBF16, kBoth, true, 3, kAllOps},
        {1, 16, 8, kF16 | kF64, kBoth, true, 1, kAllOps, kAligned},
    };
  }
  return {
      {2, 3, 13, kAllDT, kNHWC, true, 12, kAllOps},
      {2, 3, 13, kAllDT, kNCHW, true, 3, kAllOps},
      {1, 16, 8, kAllDT, kNHWC, true, 3, kAllOps, kAligned},
      {1, 16, 8, kF16 | kF64, kNCHW, true, 2, kAllOps, kAligned},
  };
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, big = false, regular = true, nonfinite = false;
  int sms = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a == "--big") {
      big = true;
    } else if (a == "--nonfinite") {
      regular = false;
      nonfinite = true;
    } else if (a == "--all") {
      regular = nonfinite = true;
    } else if (a == "--sms" && i + 1 < argc) {
      sms = std::atoi(argv[++i]);
    } else if (a == "--filter" && i + 1 < argc) {
      g_filter = argv[++i];
    } else if (a == "--print" && i + 1 < argc) {
      g_max_print = std::atoi(argv[++i]);
    } else if (a == "--verbose") {
      g_verbose = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick | --big] [--nonfinite | --all] [--sms N] [--filter TEXT] [--print N] [--verbose]\n",
                   argv[0]);
      return 2;
    }
  }
  emu::sm_count().store(sms > 0 ? sms : 1);
  cpu::set_num_threads(2);

  check_emulator();
  if (regular) {
    check_conversions();
    run_plans(regular_plans(quick, big), false);
  }
  if (nonfinite) run_plans(nonfinite_plans(quick), true);

  if (!g_tally.empty()) {
    std::printf("failures by function, activation, side and output:\n");
    for (const auto& [key, n] : g_tally) std::printf("  %6ld  %s\n", n, key.c_str());
  }
  std::printf(
      "emulation: %ld checks, %ld failures (cuda %ld, cpu %ld, cuda-vs-cpu %ld, other %ld), "
      "%ld not checked, %ld cases, %ld launches, %ld blocks, %ld emulation errors%s\n",
      g_count.checks, g_count.failures, g_count.fail_cuda, g_count.fail_cpu, g_count.fail_pair,
      g_count.fail_other, g_count.skipped, g_count.cases, emu::launches().load(),
      emu::blocks_run().load(), emu::error_count(),
      regular && nonfinite ? " [all]" : (nonfinite ? " [nonfinite]" : ""));
  return (g_count.failures == 0 && emu::error_count() == 0 && g_count.checks > 0) ? 0 : 1;
}
