// CUDA implementation of keras_residual/kernels_cuda.h: the fused
// BatchNormalization + residual add + activation, on device pointers.
//
// Kernels (all blocks of kThreads = 256 threads):
//   elementwise   scale_shift_add_act and the second backward pass: a
//                 grid-stride loop over 128-bit vectors (V elements of one
//                 channel vector in NHWC, of one plane in NCHW), or over
//                 single elements when the contiguous dimension is not a
//                 multiple of V or a pointer is not 16-byte aligned.
//   NHWC reduce   blocks of tx channel vectors x ty rows; block (i, j) walks
//                 every splits-th group of ty rows of channel tile i, keeps
//                 per-thread per-channel sums, reduces them over the rows of
//                 the block in shared memory and writes one partial per
//                 channel and split.
//   NCHW reduce   block (ch, j) walks the j-th chunk of channel ch's
//                 (batch, position) vectors (contiguous pieces of the n
//                 planes of that channel) and writes one partial per split.
//   finish        one warp per channel sums the channel's partials (in a
//                 fixed order: results are deterministic) and writes the
//                 per-channel outputs.
// Partials live in the caller's workspace (layout in common.cuh); no
// atomics, no allocation, no synchronisation with the host.
//
// Numerics: arithmetic in the parameter type P (float, or double for
// float64). Reductions add P values over chunks of at most kChunkElems
// elements and accumulate those chunks in double; the statistics are sums
// of x - K around K = the channel's first value (as the CPU kernels do), so
// that data with a large offset keeps its variance.
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "../include/keras_residual/kernels_cuda.h"

namespace keras_residual {
namespace cuda {
namespace detail {
namespace {

// Elements added in P before the sum moves to the double accumulator.
constexpr int kChunkElems = 32;
// Blocks per SM of the elementwise grids: their __launch_bounds__ guarantee
// that this many blocks of kThreads fit on one SM (at most 64 registers a
// thread), so the grid is one full wave.
constexpr int kElementwiseBlocksPerSm = 4;

// float16 / bfloat16: the second pass of the batch-norm backward recomputes
// g = dy * act'(z) in float (bn_dx_recompute_kernel) instead of reading it
// back rounded to the tensor dtype, so the first pass writes g only to
// dresidual (when wanted).
template <class T>
constexpr bool kRecomputeG = !std::is_same<typename T::S, typename T::P>::value;

// Arguments of the reduction kernels. Statistics use x (and c, m, n, hw,
// partial, splits) only.
template <typename P>
struct ReduceArgs {
  const void* dy;
  const void* x;
  const void* residual;  // nullptr: none
  // scale_shift_add_act_backward (bn == false); nullptr scale = 1, shift = 0
  const P* scale;
  const P* shift;
  // batch_norm_add_act_backward (bn == true); nullptr gamma = 1, beta = 0
  const P* mean;
  const P* var;
  const P* gamma;
  const P* beta;
  double epsilon;
  bool bn;
  void* dx;         // bn: written only when dresidual is nullptr (then g)
  void* dresidual;  // nullptr: not wanted
  ActParams<P> act;
  double* partial;  // [2][c][splits]
  int64_t splits;
  int64_t n, c, hw, m;
};

// Per-channel constants of the backward reductions:
//   z = x * sc + sh (+ residual), g = dy * act'(z),
//   dx <- g (bn) or g * sc, second sum over g * (x - mu).
// The statistics keep their shift K in mu.
template <typename P>
struct ChannelConsts {
  P sc, sh, mu;
};

template <typename P>
__device__ __forceinline__ ChannelConsts<P> channel_consts(const ReduceArgs<P>& a, int64_t ch) {
  ChannelConsts<P> k;
  if (a.bn) {
    // Same expressions as the CPU kernels and finish_sums_kernel.
    const double invstd = 1.0 / sqrt(double(a.var[ch]) + a.epsilon);
    const double scj = (a.gamma != nullptr ? double(a.gamma[ch]) : 1.0) * invstd;
    k.sc = P(scj);
    k.sh = P((a.beta != nullptr ? double(a.beta[ch]) : 0.0) - double(a.mean[ch]) * scj);
    k.mu = a.mean[ch];
  } else {
    k.sc = a.scale != nullptr ? a.scale[ch] : P(1);
    k.sh = a.shift != nullptr ? a.shift[ch] : P(0);
    k.mu = P(0);
  }
  return k;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// ------------------------------------------------------------ elementwise --

// Per-channel values of the vector at channel position ch of the iterator:
// NHWC: channels ch * V + j; NCHW: channel ch for every j.
template <int V, typename P>
__device__ __forceinline__ void load_channel(const P* __restrict__ p, P fill, int64_t ch,
                                             bool channels_last, P (&out)[V]) {
  if (channels_last) {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = p != nullptr ? p[ch * V + j] : fill;
  } else {
    const P v = p != nullptr ? p[ch] : fill;
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = v;
  }
}

// y = act(x * scale + shift + residual) over nvec vectors of V elements.
template <class T, KernelAct K, int V>
__global__ void __launch_bounds__(kThreads, kElementwiseBlocksPerSm)
    forward_kernel(const typename T::S* __restrict__ x, const typename T::S* __restrict__ res,
                   const typename T::P* __restrict__ scale,
                   const typename T::P* __restrict__ shift, typename T::S* __restrict__ y,
                   int64_t nvec, int64_t inner, int64_t period, bool channels_last,
                   ActParams<typename T::P> act) {
  using S = typename T::S;
  using P = typename T::P;
  using PK = Pack<S, V>;
  const int64_t v0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  if (v0 >= nvec) return;
  const PK* xp = reinterpret_cast<const PK*>(x);
  const PK* rp = reinterpret_cast<const PK*>(res);
  PK* yp = reinterpret_cast<PK*>(y);
  ChannelIter it(v0, step, inner, period);
  int64_t cur = -1;
  P a[V], b[V];
  for (int64_t v = v0; v < nvec; v += step, it.advance()) {
    if (it.ch != cur) {
      cur = it.ch;
      load_channel<V>(scale, P(1), cur, channels_last, a);
      load_channel<V>(shift, P(0), cur, channels_last, b);
    }
    const PK xv = xp[v];
    PK rv{};
    if (rp != nullptr) rv = rp[v];
    PK out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      P z = T::load(xv.v[j]) * a[j] + b[j];
      if (rp != nullptr) z += T::load(rv.v[j]);
      out.v[j] = T::store(kact_forward<K, P>(z, act));
    }
    yp[v] = out;
  }
}

// Second pass of batch_norm_add_act_backward:
//   dx = a * g + k * (x - mu) + b0, with coef = [a, k, b0, mu][c].
// g may live in dx itself (then each element is read before it is written,
// by the same thread), so g and dx are not __restrict__.
template <class T, int V>
__global__ void __launch_bounds__(kThreads, kElementwiseBlocksPerSm)
    bn_dx_kernel(const typename T::S* g, const typename T::S* __restrict__ x,
                 typename T::S* dx, const typename T::P* __restrict__ coef, int64_t c,
                 int64_t nvec, int64_t inner, int64_t period, bool channels_last) {
  using S = typename T::S;
  using P = typename T::P;
  using PK = Pack<S, V>;
  const int64_t v0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  if (v0 >= nvec) return;
  const PK* gp = reinterpret_cast<const PK*>(g);
  const PK* xp = reinterpret_cast<const PK*>(x);
  PK* dxp = reinterpret_cast<PK*>(dx);
  ChannelIter it(v0, step, inner, period);
  int64_t cur = -1;
  P ca[V], ck[V], cb[V], cm[V];
  for (int64_t v = v0; v < nvec; v += step, it.advance()) {
    if (it.ch != cur) {
      cur = it.ch;
      load_channel<V>(coef, P(0), cur, channels_last, ca);
      load_channel<V>(coef + c, P(0), cur, channels_last, ck);
      load_channel<V>(coef + 2 * c, P(0), cur, channels_last, cb);
      load_channel<V>(coef + 3 * c, P(0), cur, channels_last, cm);
    }
    const PK gv = gp[v];
    const PK xv = xp[v];
    PK out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      out.v[j] = T::store(ca[j] * T::load(gv.v[j]) + ck[j] * (T::load(xv.v[j]) - cm[j]) + cb[j]);
    }
    dxp[v] = out;
  }
}

// Second pass of batch_norm_add_act_backward for float16 / bfloat16, with g
// recomputed as in the first pass:
//   z = x * sc + sh (+ residual), g = dy * act'(z),
//   dx = sc * g + k * (x - mu) + b0, with coef = [sc, k, b0, mu, sh][c].
template <class T, KernelAct K, int V>
__global__ void __launch_bounds__(kThreads, kElementwiseBlocksPerSm)
    bn_dx_recompute_kernel(const typename T::S* __restrict__ dy,
                           const typename T::S* __restrict__ x,
                           const typename T::S* __restrict__ res, typename T::S* __restrict__ dx,
                           const typename T::P* __restrict__ coef, int64_t c, int64_t nvec,
                           int64_t inner, int64_t period, bool channels_last,
                           ActParams<typename T::P> act) {
  using S = typename T::S;
  using P = typename T::P;
  using PK = Pack<S, V>;
  const int64_t v0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  if (v0 >= nvec) return;
  const PK* dyp = reinterpret_cast<const PK*>(dy);
  const PK* xp = reinterpret_cast<const PK*>(x);
  const PK* rp = reinterpret_cast<const PK*>(res);
  PK* dxp = reinterpret_cast<PK*>(dx);
  ChannelIter it(v0, step, inner, period);
  int64_t cur = -1;
  P ca[V], ck[V], cb[V], cm[V], cs[V];
  for (int64_t v = v0; v < nvec; v += step, it.advance()) {
    if (it.ch != cur) {
      cur = it.ch;
      load_channel<V>(coef, P(0), cur, channels_last, ca);
      load_channel<V>(coef + c, P(0), cur, channels_last, ck);
      load_channel<V>(coef + 2 * c, P(0), cur, channels_last, cb);
      load_channel<V>(coef + 3 * c, P(0), cur, channels_last, cm);
      load_channel<V>(coef + 4 * c, P(0), cur, channels_last, cs);
    }
    const PK dyv = dyp[v];
    const PK xv = xp[v];
    PK rv{};
    if (rp != nullptr) rv = rp[v];
    PK out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const P xj = T::load(xv.v[j]);
      P z = xj * ca[j] + cs[j];
      if (rp != nullptr) z += T::load(rv.v[j]);
      const P g = kact_backward<K, P>(T::load(dyv.v[j]), z, act);
      out.v[j] = T::store(ca[j] * g + ck[j] * (xj - cm[j]) + cb[j]);
    }
    dxp[v] = out;
  }
}

// ------------------------------------------------------------- reductions --

// The per-element work of the reductions, shared by both layouts.
//   kStats: s1 += x - K, s2 += (x - K)^2 (k.mu holds K).
//   else:   g = dy * act'(z) -> outputs; s1 += g, s2 += g * (x - mu).
template <class T, KernelAct K, bool kStats>
struct Element {
  using P = typename T::P;
  static __device__ __forceinline__ void stats(P xv, P shift, P& s1, P& s2) {
    const P d = xv - shift;
    s1 += d;
    s2 += d * d;
  }
  static __device__ __forceinline__ P backward(P dyv, P xv, P rv, bool has_res,
                                               const ChannelConsts<P>& k,
                                               const ActParams<P>& act, P& s1, P& s2) {
    P z = xv * k.sc + k.sh;
    if (has_res) z += rv;
    const P g = kact_backward<K, P>(dyv, z, act);
    s1 += g;
    s2 += g * (xv - k.mu);
    return g;
  }
};

// NHWC: blockDim = (tx, ty), grid = (tiles, splits); see NhwcGeometry.
// Each thread keeps its per-channel running sums in its own slots of the
// shared array acc[2][V][kThreads] (adding a P chunk every kChunkElems
// rows), which the block then sums over its ty rows.
template <class T, KernelAct K, int V, bool kStats>
__global__ void __launch_bounds__(kThreads) nhwc_reduce_kernel(ReduceArgs<typename T::P> a) {
  using S = typename T::S;
  using P = typename T::P;
  using PK = Pack<S, V>;
  using E = Element<T, K, kStats>;
  constexpr int kChunk = kChunkElems;  // rows: one element per channel each
  __shared__ double acc[2][V][kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;  // TX * TY == kThreads
  const int tid = ty * TX + tx;
  const int64_t cv = a.c / V;
  const int64_t cvi = int64_t(blockIdx.x) * TX + tx;

#pragma unroll
  for (int j = 0; j < V; ++j) acc[0][j][tid] = acc[1][j][tid] = 0.0;

  if (cvi < cv) {
    const PK* xp = reinterpret_cast<const PK*>(a.x);
    ChannelConsts<P> k[V];
    if constexpr (kStats) {
      const PK first = xp[cvi];  // row 0: the shift K of each channel
#pragma unroll
      for (int j = 0; j < V; ++j) {
        k[j] = ChannelConsts<P>{P(0), P(0), stats_shift(T::load(first.v[j]))};
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) k[j] = channel_consts(a, cvi * V + j);
    }
    const PK* dyp = reinterpret_cast<const PK*>(a.dy);
    const PK* rp = reinterpret_cast<const PK*>(a.residual);
    PK* dxp = reinterpret_cast<PK*>(a.dx);
    PK* drp = reinterpret_cast<PK*>(a.dresidual);
    const bool has_res = rp != nullptr;
    const bool write_dx = !a.bn || (drp == nullptr && !kRecomputeG<T>);

    P c1[V], c2[V];
#pragma unroll
    for (int j = 0; j < V; ++j) c1[j] = c2[j] = P(0);
    int count = 0;
    const int64_t row_step = int64_t(gridDim.y) * TY;
    for (int64_t row = int64_t(blockIdx.y) * TY + ty; row < a.m; row += row_step) {
      const int64_t v = row * cv + cvi;
      const PK xv = xp[v];
      if constexpr (kStats) {
#pragma unroll
        for (int j = 0; j < V; ++j) E::stats(T::load(xv.v[j]), k[j].mu, c1[j], c2[j]);
      } else {
        const PK dyv = dyp[v];
        PK rv{};
        if (has_res) rv = rp[v];
        PK gout, dxout;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const P g = E::backward(T::load(dyv.v[j]), T::load(xv.v[j]),
                                  has_res ? T::load(rv.v[j]) : P(0), has_res, k[j], a.act,
                                  c1[j], c2[j]);
          gout.v[j] = T::store(g);
          dxout.v[j] = T::store(a.bn ? g : g * k[j].sc);
        }
        if (drp != nullptr) drp[v] = gout;
        if (write_dx) dxp[v] = dxout;
      }
      if (++count == kChunk) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          acc[0][j][tid] += double(c1[j]);
          acc[1][j][tid] += double(c2[j]);
          c1[j] = c2[j] = P(0);
        }
        count = 0;
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc[0][j][tid] += double(c1[j]);
      acc[1][j][tid] += double(c2[j]);
    }
  }
  __syncthreads();

  // One column (tx, j) per thread: the sum over the ty rows of the block,
  // written to partial[q][channel][blockIdx.y].
  const int ncol = TX * V;  // <= 32 * V <= kThreads
  for (int col = tid; col < 2 * ncol; col += kThreads) {
    const int q = col / ncol, rest = col % ncol;
    const int ctx = rest % TX, j = rest / TX;
    double s = 0.0;
    for (int y = 0; y < TY; ++y) s += acc[q][j][y * TX + ctx];
    const int64_t ch = (int64_t(blockIdx.x) * TX + ctx) * V + j;
    if (ch < a.c) a.partial[(q * a.c + ch) * a.splits + blockIdx.y] = s;
  }
}

// NCHW: blockDim = kThreads, grid = (c, splits); block (ch, j) takes the
// vectors [j * chunk, min((j + 1) * chunk, n * hw / V)) of channel ch in
// (batch, position) order.
template <class T, KernelAct K, int V, bool kStats>
__global__ void __launch_bounds__(kThreads)
    nchw_reduce_kernel(ReduceArgs<typename T::P> a, int64_t chunk) {
  using S = typename T::S;
  using P = typename T::P;
  using PK = Pack<S, V>;
  using E = Element<T, K, kStats>;
  constexpr int kChunk = kChunkElems / V > 0 ? kChunkElems / V : 1;  // vectors
  const int tid = threadIdx.x;
  const int64_t ch = blockIdx.x;
  const int64_t hwv = a.hw / V;
  const int64_t total = a.n * hwv;
  const int64_t begin = int64_t(blockIdx.y) * chunk;
  const int64_t end = begin + chunk < total ? begin + chunk : total;

  double d1 = 0.0, d2 = 0.0;
  if (begin + tid < end) {
    const PK* xp = reinterpret_cast<const PK*>(a.x);
    ChannelConsts<P> k;
    if constexpr (kStats) {
      // the shift K
      k = ChannelConsts<P>{P(0), P(0),
                           stats_shift(T::load(reinterpret_cast<const S*>(a.x)[ch * a.hw]))};
    } else {
      k = channel_consts(a, ch);
    }
    const PK* dyp = reinterpret_cast<const PK*>(a.dy);
    const PK* rp = reinterpret_cast<const PK*>(a.residual);
    PK* dxp = reinterpret_cast<PK*>(a.dx);
    PK* drp = reinterpret_cast<PK*>(a.dresidual);
    const bool has_res = rp != nullptr;
    const bool write_dx = !a.bn || (drp == nullptr && !kRecomputeG<T>);

    P c1 = P(0), c2 = P(0);
    int count = 0;
    // it.ch = batch index (j / hwv < n), it.r = vector position in the plane.
    ChannelIter it(begin + tid, kThreads, hwv, a.n);
    for (int64_t j = begin + tid; j < end; j += kThreads, it.advance()) {
      const int64_t v = (it.ch * a.c + ch) * hwv + it.r;
      const PK xv = xp[v];
      if constexpr (kStats) {
#pragma unroll
        for (int e = 0; e < V; ++e) E::stats(T::load(xv.v[e]), k.mu, c1, c2);
      } else {
        const PK dyv = dyp[v];
        PK rv{};
        if (has_res) rv = rp[v];
        PK gout, dxout;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const P g = E::backward(T::load(dyv.v[e]), T::load(xv.v[e]),
                                  has_res ? T::load(rv.v[e]) : P(0), has_res, k, a.act, c1, c2);
          gout.v[e] = T::store(g);
          dxout.v[e] = T::store(a.bn ? g : g * k.sc);
        }
        if (drp != nullptr) drp[v] = gout;
        if (write_dx) dxp[v] = dxout;
      }
      if (++count == kChunk) {
        d1 += double(c1);
        d2 += double(c2);
        c1 = c2 = P(0);
        count = 0;
      }
    }
    d1 += double(c1);
    d2 += double(c2);
  }

  __shared__ double red[2][kThreads / 32];
  d1 = warp_sum(d1);
  d2 = warp_sum(d2);
  if ((tid & 31) == 0) {
    red[0][tid >> 5] = d1;
    red[1][tid >> 5] = d2;
  }
  __syncthreads();
  if (tid == 0) {
    double s1 = 0.0, s2 = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) {
      s1 += red[0][w];
      s2 += red[1][w];
    }
    a.partial[ch * a.splits + blockIdx.y] = s1;
    a.partial[(a.c + ch) * a.splits + blockIdx.y] = s2;
  }
}

// --------------------------------------------------------------- finishing --

// The sums of channel ch's partials, in lane 0 of the warp (the whole warp
// must call this with the same ch).
__device__ __forceinline__ void channel_sums(const double* __restrict__ partial, int64_t splits,
                                             int64_t c, int64_t ch, double& s1, double& s2) {
  const int lane = threadIdx.x & 31;
  s1 = 0.0;
  s2 = 0.0;
  for (int64_t r = lane; r < splits; r += 32) {
    s1 += partial[ch * splits + r];
    s2 += partial[(c + ch) * splits + r];
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
}

// mean = K + s1 / m, var = s2 / m - (s1 / m)^2 (>= 0, but NaN stays NaN);
// NaN for m == 0.
template <class T>
__global__ void __launch_bounds__(kThreads)
    finish_stats_kernel(const double* __restrict__ partial, int64_t splits, int64_t c, int64_t m,
                        const typename T::S* __restrict__ x, bool channels_last, int64_t hw,
                        typename T::P* __restrict__ mean, typename T::P* __restrict__ var) {
  using P = typename T::P;
  const int64_t ch = int64_t(blockIdx.x) * kWarpsPerFinishBlock + (threadIdx.x >> 5);
  if (ch >= c) return;  // uniform per warp
  double s1, s2;
  channel_sums(partial, splits, c, ch, s1, s2);
  if ((threadIdx.x & 31) != 0) return;
  if (m == 0) {
    mean[ch] = P(__longlong_as_double(0x7ff8000000000000LL));
    var[ch] = P(__longlong_as_double(0x7ff8000000000000LL));
    return;
  }
  const double shift = double(stats_shift(T::load(x[channels_last ? ch : ch * hw])));
  const double inv_m = 1.0 / double(m);
  const double d = s1 * inv_m;
  const double v = s2 * inv_m - d * d;
  mean[ch] = P(shift + d);
  var[ch] = P(v < 0.0 ? 0.0 : v);
}

// s1 = sum(g), s2 = sum(g * (x - mu)).
//   bn:   dbeta = s1, dgamma = s2 * invstd, and the constants of bn_dx_kernel
//         coef = [sc, -sc * invstd * dgamma / m, -sc * dbeta / m, mean, sh][c]
//         (sh = beta - mean * sc, for bn_dx_recompute_kernel).
//   else: dshift = s1, dscale = s2 (when wanted).
template <typename P>
__global__ void __launch_bounds__(kThreads)
    finish_sums_kernel(const double* __restrict__ partial, int64_t splits, int64_t c, int64_t m,
                       bool bn, const P* __restrict__ mean, const P* __restrict__ var,
                       const P* __restrict__ gamma, const P* __restrict__ beta, double epsilon,
                       P* __restrict__ out_scale, P* __restrict__ out_shift,
                       P* __restrict__ coef) {
  const int64_t ch = int64_t(blockIdx.x) * kWarpsPerFinishBlock + (threadIdx.x >> 5);
  if (ch >= c) return;  // uniform per warp
  double s1, s2;
  channel_sums(partial, splits, c, ch, s1, s2);
  if ((threadIdx.x & 31) != 0) return;
  if (!bn) {
    if (out_scale != nullptr) out_scale[ch] = P(s2);
    out_shift[ch] = P(s1);
    return;
  }
  const double invstd = 1.0 / sqrt(double(var[ch]) + epsilon);
  const double dbeta = s1;
  const double dgamma = s2 * invstd;
  out_shift[ch] = P(dbeta);
  out_scale[ch] = P(dgamma);
  const double inv_m = m > 0 ? 1.0 / double(m) : 0.0;
  const double scj = (gamma != nullptr ? double(gamma[ch]) : 1.0) * invstd;
  coef[ch] = P(scj);
  coef[c + ch] = P(-scj * invstd * dgamma * inv_m);
  coef[2 * c + ch] = P(-scj * dbeta * inv_m);
  coef[3 * c + ch] = mean[ch];
  // As channel_consts computes it for the first pass.
  coef[4 * c + ch] = P((beta != nullptr ? double(beta[ch]) : 0.0) - double(mean[ch]) * scj);
}

// The training forward's per-channel constants from the batch statistics, in
// the parameter type as cpu::batch_norm_add_act computes them:
// scale = gamma / sqrt(var + epsilon), shift = beta - mean * scale.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    stats_scale_shift_kernel(const P* __restrict__ mean, const P* __restrict__ var,
                             const P* __restrict__ gamma, const P* __restrict__ beta,
                             double epsilon, int64_t c, P* __restrict__ scale,
                             P* __restrict__ shift) {
  const int64_t ch = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (ch >= c) return;
  const P sc = gamma[ch] / sqrt(var[ch] + P(epsilon));
  scale[ch] = sc;
  shift[ch] = beta[ch] - mean[ch] * sc;
}

// ------------------------------------------------------------------- host --

template <class F>
int with_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: return f(F32{});
    case DType::kFloat64: return f(F64{});
    case DType::kFloat16: return f(F16{});
    case DType::kBFloat16: return f(BF16{});
  }
  return int(cudaErrorInvalidValue);
}

template <KernelAct K>
using ActTag = std::integral_constant<KernelAct, K>;

template <class F>
int with_act(Activation act, const F& f) {
  switch (act) {
    case Activation::kLinear:
    case Activation::kRelu:
    case Activation::kLeakyRelu:
    case Activation::kRelu6: return f(ActTag<KernelAct::kPiecewiseLinear>{});
    case Activation::kSilu: return f(ActTag<KernelAct::kSilu>{});
    case Activation::kGelu: return f(ActTag<KernelAct::kGelu>{});
  }
  return int(cudaErrorInvalidValue);
}

// Multiprocessors of the current device (cached per device).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 132;
  }
  if (dev >= 0 && dev < kMaxDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) {
    (void)cudaGetLastError();
    v = 132;
  }
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

unsigned elementwise_blocks(int64_t nvec) {
  const int64_t cap = int64_t(sm_count()) * kElementwiseBlocksPerSm;
  const int64_t need = ceil_div(nvec, kThreads);
  return unsigned(need < cap ? need : cap);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Whether the 128-bit kernels apply: the contiguous dimension is a multiple
// of V and every tensor pointer (nullptr: none) is 16-byte aligned.
template <class T>
bool vectorizable(Shape s, const void* p0, const void* p1, const void* p2, const void* p3,
                  const void* p4) {
  const int64_t inner = s.channels_last ? s.c : s.hw;
  return inner % T::kVec == 0 && aligned16(p0) && aligned16(p1) && aligned16(p2) &&
         aligned16(p3) && aligned16(p4);
}

// The iterator's (inner, period) for vectors of V elements.
template <int V>
void iter_dims(Shape s, int64_t& inner, int64_t& period) {
  inner = s.channels_last ? 1 : s.hw / V;
  period = s.channels_last ? s.c / V : s.c;
}

// Shapes the launches cannot take: negative sizes, or more channels than a
// grid dimension holds.
bool unsupported(Shape s) {
  return s.n < 0 || s.c < 0 || s.hw < 0 || s.c > int64_t(INT_MAX);
}

unsigned finish_blocks(int64_t c) { return unsigned(ceil_div(c, kWarpsPerFinishBlock)); }

template <class T, KernelAct K, int V>
int launch_forward(const void* x, const void* res, Shape s, const void* scale,
                   const void* shift, ActParams<typename T::P> act, void* y, cudaStream_t st) {
  using S = typename T::S;
  using P = typename T::P;
  const int64_t nvec = s.size() / V;
  int64_t inner, period;
  iter_dims<V>(s, inner, period);
  forward_kernel<T, K, V><<<elementwise_blocks(nvec), kThreads, 0, st>>>(
      static_cast<const S*>(x), static_cast<const S*>(res), static_cast<const P*>(scale),
      static_cast<const P*>(shift), static_cast<S*>(y), nvec, inner, period, s.channels_last,
      act);
  return int(cudaGetLastError());
}

template <class T, int V>
int launch_bn_dx(const void* g, const void* x, void* dx, const void* coef, Shape s,
                 cudaStream_t st) {
  using S = typename T::S;
  using P = typename T::P;
  const int64_t nvec = s.size() / V;
  int64_t inner, period;
  iter_dims<V>(s, inner, period);
  bn_dx_kernel<T, V><<<elementwise_blocks(nvec), kThreads, 0, st>>>(
      static_cast<const S*>(g), static_cast<const S*>(x), static_cast<S*>(dx),
      static_cast<const P*>(coef), s.c, nvec, inner, period, s.channels_last);
  return int(cudaGetLastError());
}

template <class T, KernelAct K, int V>
int launch_bn_dx_recompute(const void* dy, const void* x, const void* res, void* dx,
                           const void* coef, Shape s, ActParams<typename T::P> act,
                           cudaStream_t st) {
  using S = typename T::S;
  using P = typename T::P;
  const int64_t nvec = s.size() / V;
  int64_t inner, period;
  iter_dims<V>(s, inner, period);
  bn_dx_recompute_kernel<T, K, V><<<elementwise_blocks(nvec), kThreads, 0, st>>>(
      static_cast<const S*>(dy), static_cast<const S*>(x), static_cast<const S*>(res),
      static_cast<S*>(dx), static_cast<const P*>(coef), s.c, nvec, inner, period,
      s.channels_last, act);
  return int(cudaGetLastError());
}

// Launches the reduction over m > 0 rows, with the geometry of common.cuh
// (the one workspace_bytes() sized); returns its splits in *splits.
template <class T, KernelAct K, bool kStats, int V>
int launch_reduce_v(Shape s, ReduceArgs<typename T::P> a, cudaStream_t st, int64_t* splits) {
  if (s.channels_last) {
    const NhwcGeometry g = nhwc_geometry(s.c, s.m(), V);
    a.splits = g.splits;
    *splits = g.splits;
    const dim3 block(unsigned(g.tx), unsigned(g.ty));
    const dim3 grid(unsigned(g.tiles), unsigned(g.splits));
    nhwc_reduce_kernel<T, K, V, kStats><<<grid, block, 0, st>>>(a);
  } else {
    const NchwGeometry g = nchw_geometry(s.n, s.c, s.hw, V);
    a.splits = g.splits;
    *splits = g.splits;
    const dim3 grid(unsigned(s.c), unsigned(g.splits));
    nchw_reduce_kernel<T, K, V, kStats><<<grid, kThreads, 0, st>>>(a, g.chunk);
  }
  return int(cudaGetLastError());
}

template <class T, KernelAct K, bool kStats>
int launch_reduce(Shape s, const ReduceArgs<typename T::P>& a, bool vec, cudaStream_t st,
                  int64_t* splits) {
  if (vec) return launch_reduce_v<T, K, kStats, T::kVec>(s, a, st, splits);
  return launch_reduce_v<T, K, kStats, 1>(s, a, st, splits);
}

// Both backward functions (bn selects the formulas): pass 1 (g, outputs,
// partials), finish, and for bn pass 2 (g -> dx; float16 / bfloat16: g
// recomputed from dy, x and residual).
template <class T, KernelAct K>
int backward(const void* dy, const void* x, const void* residual, Shape s, const void* scale,
             const void* shift, const void* mean, const void* var, const void* gamma,
             const void* beta, double epsilon, bool bn, Act act, void* dx, void* dresidual,
             void* out_scale, void* out_shift, void* workspace, cudaStream_t st) {
  using P = typename T::P;
  const int64_t m = s.m();
  double* partial = static_cast<double*>(workspace);
  int64_t splits = 0;
  if (m > 0) {
    ReduceArgs<P> a{};
    a.dy = dy;
    a.x = x;
    a.residual = residual;
    a.scale = static_cast<const P*>(scale);
    a.shift = static_cast<const P*>(shift);
    a.mean = static_cast<const P*>(mean);
    a.var = static_cast<const P*>(var);
    a.gamma = static_cast<const P*>(gamma);
    a.beta = static_cast<const P*>(beta);
    a.epsilon = epsilon;
    a.bn = bn;
    a.dx = dx;
    a.dresidual = dresidual;
    a.act = act_params<P>(act);
    a.partial = partial;
    a.n = s.n;
    a.c = s.c;
    a.hw = s.hw;
    a.m = m;
    const bool vec = vectorizable<T>(s, dy, x, residual, dx, dresidual);
    const int err = launch_reduce<T, K, false>(s, a, vec, st, &splits);
    if (err != 0) return err;
  }
  // With m == 0 there are no partials (splits = 0): the sums are 0.
  P* coef = reinterpret_cast<P*>(static_cast<char*>(workspace) + partials_bytes(s.c, splits));
  finish_sums_kernel<P><<<finish_blocks(s.c), kThreads, 0, st>>>(
      partial, splits, s.c, m, bn, static_cast<const P*>(mean), static_cast<const P*>(var),
      static_cast<const P*>(gamma), static_cast<const P*>(beta), epsilon,
      static_cast<P*>(out_scale), static_cast<P*>(out_shift), bn ? coef : nullptr);
  const int err = int(cudaGetLastError());
  if (err != 0 || !bn || s.size() == 0) return err;
  if constexpr (kRecomputeG<T>) {
    const ActParams<P> params = act_params<P>(act);
    if (vectorizable<T>(s, dy, x, residual, dx, nullptr)) {
      return launch_bn_dx_recompute<T, K, T::kVec>(dy, x, residual, dx, coef, s, params, st);
    }
    return launch_bn_dx_recompute<T, K, 1>(dy, x, residual, dx, coef, s, params, st);
  } else {
    const void* g = dresidual != nullptr ? dresidual : dx;
    if (vectorizable<T>(s, g, x, dx, nullptr, nullptr)) {
      return launch_bn_dx<T, T::kVec>(g, x, dx, coef, s, st);
    }
    return launch_bn_dx<T, 1>(g, x, dx, coef, s, st);
  }
}

}  // namespace
}  // namespace detail

size_t workspace_bytes(DType dtype, Shape shape) {
  using namespace detail;
  switch (dtype) {
    case DType::kFloat32: return workspace_bytes_for(shape, sizeof(float), F32::kVec);
    case DType::kFloat64: return workspace_bytes_for(shape, sizeof(double), F64::kVec);
    case DType::kFloat16: return workspace_bytes_for(shape, sizeof(float), F16::kVec);
    case DType::kBFloat16: return workspace_bytes_for(shape, sizeof(float), BF16::kVec);
  }
  return 0;
}

int batch_stats(DType dtype, const void* x, Shape shape, void* mean, void* var, void* workspace,
                void* stream) {
  using namespace detail;
  if (unsupported(shape)) return int(cudaErrorInvalidValue);
  if (shape.c == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using S = typename T::S;
    using P = typename T::P;
    const int64_t m = shape.m();
    double* partial = static_cast<double*>(workspace);
    int64_t splits = 0;
    if (m > 0) {
      ReduceArgs<P> a{};
      a.x = x;
      a.partial = partial;
      a.n = shape.n;
      a.c = shape.c;
      a.hw = shape.hw;
      a.m = m;
      const bool vec = vectorizable<T>(shape, x, nullptr, nullptr, nullptr, nullptr);
      const int err =
          launch_reduce<T, KernelAct::kPiecewiseLinear, true>(shape, a, vec, st, &splits);
      if (err != 0) return err;
    }
    finish_stats_kernel<T><<<finish_blocks(shape.c), kThreads, 0, st>>>(
        partial, splits, shape.c, m, static_cast<const S*>(x), shape.channels_last, shape.hw,
        static_cast<P*>(mean), static_cast<P*>(var));
    return int(cudaGetLastError());
  });
}

int scale_shift_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                        const void* scale, const void* shift, Act act, void* y, void* stream) {
  using namespace detail;
  if (unsupported(shape)) return int(cudaErrorInvalidValue);
  if (shape.size() == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    using P = typename T::P;
    return with_act(act.kind, [&](auto k) -> int {
      constexpr KernelAct K = decltype(k)::value;
      const ActParams<P> params = act_params<P>(act);
      if (vectorizable<T>(shape, x, residual, y, nullptr, nullptr)) {
        return launch_forward<T, K, T::kVec>(x, residual, shape, scale, shift, params, y, st);
      }
      return launch_forward<T, K, 1>(x, residual, shape, scale, shift, params, y, st);
    });
  });
}

int batch_norm_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                       const void* gamma, const void* beta, double epsilon, Act act, void* y,
                       void* mean, void* var, void* workspace, void* stream) {
  using namespace detail;
  const int err = batch_stats(dtype, x, shape, mean, var, workspace, stream);
  if (err != 0 || shape.size() == 0) return err;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return with_dtype(dtype, [&](auto t) -> int {
    using P = typename decltype(t)::P;
    // The statistics pass is done with the partials: scale and shift take the
    // start of the workspace.
    P* scale = static_cast<P*>(workspace);
    P* shift = scale + shape.c;
    const unsigned blocks = unsigned((shape.c + kThreads - 1) / kThreads);
    stats_scale_shift_kernel<P><<<blocks, kThreads, 0, st>>>(
        static_cast<const P*>(mean), static_cast<const P*>(var), static_cast<const P*>(gamma),
        static_cast<const P*>(beta), epsilon, shape.c, scale, shift);
    const int launch = int(cudaGetLastError());
    if (launch != 0) return launch;
    return scale_shift_add_act(dtype, x, residual, shape, scale, shift, act, y, stream);
  });
}

int scale_shift_add_act_backward(DType dtype, const void* dy, const void* x,
                                 const void* residual, Shape shape, const void* scale,
                                 const void* shift, Act act, void* dx, void* dresidual,
                                 void* dscale, void* dshift, void* workspace, void* stream) {
  using namespace detail;
  if (unsupported(shape)) return int(cudaErrorInvalidValue);
  if (shape.c == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    return with_act(act.kind, [&](auto k) -> int {
      return backward<T, decltype(k)::value>(dy, x, residual, shape, scale, shift, nullptr,
                                             nullptr, nullptr, nullptr, 0.0, false, act, dx,
                                             dresidual, dscale, dshift, workspace, st);
    });
  });
}

int batch_norm_add_act_backward(DType dtype, const void* dy, const void* x,
                                const void* residual, Shape shape, const void* mean,
                                const void* var, const void* gamma, const void* beta,
                                double epsilon, Act act, void* dx, void* dresidual,
                                void* dgamma, void* dbeta, void* workspace, void* stream) {
  using namespace detail;
  if (unsupported(shape)) return int(cudaErrorInvalidValue);
  if (shape.c == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return with_dtype(dtype, [&](auto t) -> int {
    using T = decltype(t);
    return with_act(act.kind, [&](auto k) -> int {
      return backward<T, decltype(k)::value>(dy, x, residual, shape, nullptr, nullptr, mean, var,
                                             gamma, beta, epsilon, true, act, dx, dresidual,
                                             dgamma, dbeta, workspace, st);
    });
  });
}

}  // namespace cuda
}  // namespace keras_residual
