// The fused tail of a CNN decoder block on CPU: torch.ops.sslam_fast_C.ln_gelu_residual and its backward
// torch.ops.sslam_fast_C.ln_gelu_residual_backward (ALGORITHM §2.2).
//
// Forward, at every position (r, h, w) of an (R, C, H, W) tensor:
//   x = (y - mean_C(y)) * rstd,  rstd = 1 / sqrt(var_C(y) + 1e-5)  (biased variance, no affine),
//   out = x * Phi(x) + z                                          (exact-erf GELU, then the residual).
// Backward (grad_out -> grad_y; the statistics are recomputed from y, nothing else is saved):
//   g = grad_out * GELU'(x),  GELU'(x) = Phi(x) + x * phi(x),
//   grad_y = rstd * (g - mean_C(g) - x * mean_C(g * x)).
// Everything is computed in float32; float16 / bfloat16 tensors are read into float32 and rounded once on the store
// (their conversions are not all branch-free, so those instantiations may run partly scalar: a correctness path, the
// decoder trains in float32 on CPU).
//
// Statistics. Two passes over the C values of a position, both on values shifted by the position's first channel
// k = y[0]: s = sum (y - k), d = (y - k) - s / C, var = sum d^2 / C. The shift keeps the sums O(std) when the mean is
// large (y ~ 1e3 + N(0, 1) loses nothing: y - k is exact there), and the mean itself is never rounded to a float
// near the data: x is formed as ((y - k) - s / C) * rstd.
//
// Layouts, without copies:
//   * channels-last (the decoder's layout: the (R, H*W, C) token tensor viewed as (R, C, H, W)): each position's C
//     values are contiguous; positions are independent rows, each reduced over C with L-lane vector accumulators.
//   * contiguous NCHW: the C values of a position are H*W apart; a tile of up to kTile consecutive positions of one
//     image is processed with the channel loop outside and the positions as vector lanes (per-position partial sums
//     in small arrays, no horizontal reductions).
// Any other strides are made contiguous in the output's layout first; the output has y's memory format
// (empty_like(y)).
//
// GELU. With q = Phi(-|x|) = erfc(|x| / sqrt 2) / 2: GELU(x) = max(x, 0) - |x| q and GELU'(x) = Phi(x) + x phi(x),
// Phi(x) = 1/2 + sign(x) (1/2 - q). erfc comes from Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the formula
// ATen's vectorised erf uses, so the reference agrees to ~1e-7), exp from a Cody-Waite reduction and a degree-7
// Taylor polynomial (relative error ~1e-8 on the range used here). All of it is inline float code without library
// calls or data-dependent branches, so the element loops vectorise.
//
// SIMD: the loops are compiled three times (AVX-512, AVX2+FMA, baseline) through target attributes and picked at run
// time with __builtin_cpu_supports (the build has no -march flag); SSLAM_FAST_CPU_ISA=avx512|avx2|baseline caps the
// choice (cpu_isa.h). Parallel over positions (channels-last) or position tiles (NCHW) with at::parallel_for.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "simd.h"  // VecF, vload, hsum, to_float, from_float

#pragma GCC diagnostic ignored "-Wpsabi"

namespace sslam_fast {
namespace {

constexpr float kEps = 1e-5f;  // upstream nn.LayerNorm default
// Positions per NCHW tile: 64 floats = 256 contiguous bytes of each channel per step; the tile's statistics arrays
// stay in registers / L1 and each channel row is a short unit-stride stream.
constexpr int64_t kTile = 64;
// Elements per parallel chunk: smaller problems run on the calling thread (an OpenMP fork/join costs ~5-10 us).
constexpr int64_t kGrainElems = 1 << 15;

// --- scalar math (inline, branch-free: vectorised by the callers' loops) ---------------------------------------------

// exp(x) for x <= 0, as 2^n * exp(r) with n = round(x / ln 2), |r| <= ln(2) / 2 (Cody-Waite: ln 2 split in two so
// that n * ln2_hi is exact). x is first raised to -87 (exp(-87) ~ 1.6e-38, still normal) by an unsigned integer min
// on its bits (for x <= 0 the bits grow with |x|): a float ternary or fmax is not if-converted by GCC for AVX2 / SSE
// targets and would keep the loops scalar. A NaN becomes -87 too, which is harmless here: every caller's result also
// depends on x through terms that carry the NaN. Rounding to an integer adds kShift = 1.5 * 2^23 + 127: the sum's low
// mantissa bits then hold n + 127, the biased exponent of 2^n, and shifting the sum's bits left by 23 leaves exactly
// the bits of 2^n (n in [-126, 0]).
SSLAM_INLINE float exp_nonpositive(float x) {
  constexpr uint32_t kMinus87 = 0xC2AE0000u;  // bits of -87.0f
  x = std::bit_cast<float>(std::min(std::bit_cast<uint32_t>(x), kMinus87));
  constexpr float kShift = 12583039.0f;  // 1.5 * 2^23 + 127
  const float big = x * 1.44269504088896341f + kShift;
  const float n = big - kShift;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;  // Taylor series of exp to degree 7: |error| <= r^8 / 8! ~ 5e-9 relative
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * std::bit_cast<float>(std::bit_cast<int32_t>(big) << 23);
}

// q = erfc(|x| / sqrt 2) / 2 = Phi(-|x|) (Abramowitz & Stegun 7.1.26, its coefficients halved) and e = exp(-x^2 / 2),
// for ax = |x|.
SSLAM_INLINE float normal_tail(float ax, float& e) {
  const float t = 1.0f / (1.0f + (0.3275911f * 0.70710678118654752f) * ax);
  float p = 0.5f * 1.061405429f;
  p = p * t - 0.5f * 1.453152027f;
  p = p * t + 0.5f * 1.421413741f;
  p = p * t - 0.5f * 0.284496736f;
  p = p * t + 0.5f * 0.254829592f;
  e = exp_nonpositive(-0.5f * ax * ax);
  return (p * t) * e;
}

// GELU(x) = x * Phi(x) = max(x, 0) - |x| * Phi(-|x|) (x - x q for x >= 0, x q for x < 0), with max(x, 0) formed
// as (x + |x|) / 2 (exact, no select).
SSLAM_INLINE float gelu(float x) {
  const float ax = std::fabs(x);
  float e;
  const float q = normal_tail(ax, e);
  return 0.5f * (x + ax) - ax * q;
}

// GELU'(x) = Phi(x) + x * phi(x), Phi(x) = 1/2 + sign(x) (1/2 - Phi(-|x|)).
SSLAM_INLINE float gelu_grad(float x) {
  float e;
  const float q = normal_tail(std::fabs(x), e);
  return std::copysign(0.5f - q, x) + (x * (e * 0.39894228040143268f) + 0.5f);  // 1 / sqrt(2 pi)
}

// --- jobs -------------------------------------------------------------------------------------------------------------

template <typename T>
struct Job {
  const T* y;
  const T* other;  // forward: z; backward: grad_out
  T* out;          // forward: out; backward: grad_y
  int64_t C;
  int64_t HW;
};

// --- channels-last: one position = one contiguous row of C values -------------------------------------------------------
// The row sums use explicit L-lane accumulators (GNU vector extensions) and a log2(L) shuffle tree at the end: an
// `omp simd reduction` ends in L dependent scalar adds, which for C = 64 costs more than the rest of the row.

// sum_c f(p[c]) for c < C; f is applied to L-lane vectors and to the scalar tail (a generic lambda).
template <int L, typename T, typename F>
SSLAM_INLINE float row_sum(const T* __restrict p, int64_t C, F f) {
  VecF<L> a0 = {}, a1 = {};
  int64_t c = 0;
  for (; c + 2 * L <= C; c += 2 * L) {  // two accumulators: half the dependent-add latency
    a0 += f(vload<L>(p + c));
    a1 += f(vload<L>(p + c + L));
  }
  if (c + L <= C) {
    a0 += f(vload<L>(p + c));
    c += L;
  }
  float tail = 0.0f;
  for (; c < C; ++c) tail += f(to_float(p[c]));
  return hsum<L>(a0 + a1) + tail;
}

// Shift k, mean of (y - k) and rstd of one row.
template <int L, typename T>
SSLAM_INLINE void row_stats(const T* __restrict y, int64_t C, float& k, float& md, float& rstd) {
  const float kk = to_float(y[0]);
  const float inv_c = 1.0f / static_cast<float>(C);
  const float m = row_sum<L>(y, C, [kk](auto v) { return v - kk; }) * inv_c;
  const float v = row_sum<L>(y, C, [kk, m](auto v) {
    const auto d = (v - kk) - m;
    return d * d;
  });
  k = kk;
  md = m;
  rstd = 1.0f / std::sqrt(v * inv_c + kEps);
}

template <int L, typename T>
SSLAM_INLINE void fwd_rows(const Job<T>& j, int64_t begin, int64_t end) {
  const int64_t C = j.C;
  for (int64_t row = begin; row < end; ++row) {
    const T* __restrict y = j.y + row * C;
    const T* __restrict z = j.other + row * C;
    T* __restrict out = j.out + row * C;
    float k, m, rstd;
    row_stats<L>(y, C, k, m, rstd);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float x = ((to_float(y[c]) - k) - m) * rstd;
      out[c] = from_float<T>(gelu(x) + to_float(z[c]));
    }
  }
}

template <int L, typename T>
SSLAM_INLINE void bwd_rows(const Job<T>& j, int64_t begin, int64_t end) {
  const int64_t C = j.C;
  std::vector<float> buf(2 * C);
  float* __restrict g = buf.data();       // grad_out * GELU'(x)
  float* __restrict gx = buf.data() + C;  // g * x
  const float inv_c = 1.0f / static_cast<float>(C);
  const auto id = [](auto v) { return v; };
  for (int64_t row = begin; row < end; ++row) {
    const T* __restrict y = j.y + row * C;
    const T* __restrict go = j.other + row * C;
    T* __restrict gy = j.out + row * C;
    float k, m, rstd;
    row_stats<L>(y, C, k, m, rstd);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float x = ((to_float(y[c]) - k) - m) * rstd;
      const float v = to_float(go[c]) * gelu_grad(x);
      g[c] = v;
      gx[c] = v * x;
    }
    const float mg = row_sum<L>(g, C, id) * inv_c;
    const float mgx = row_sum<L>(gx, C, id) * inv_c;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float x = ((to_float(y[c]) - k) - m) * rstd;
      gy[c] = from_float<T>(rstd * (g[c] - mg - x * mgx));
    }
  }
}

// --- contiguous NCHW: tiles of up to kTile consecutive positions of one image, positions as vector lanes ------------

// Tile t of the whole tensor: image t / tiles_per_image, positions [p0, p0 + n) of it. Returns the offset of
// element (channel 0, position p0).
SSLAM_INLINE int64_t tile_offset(int64_t t, int64_t C, int64_t HW, int64_t& n) {
  const int64_t tiles_per_image = (HW + kTile - 1) / kTile;
  const int64_t r = t / tiles_per_image;
  const int64_t p0 = (t - r * tiles_per_image) * kTile;
  n = std::min(kTile, HW - p0);
  return r * C * HW + p0;
}

// Per-position shift, mean of (y - k) and rstd of the tile's n positions (channel stride HW).
template <typename T>
SSLAM_INLINE void tile_stats(const T* __restrict y, int64_t C, int64_t HW, int64_t n, float* __restrict k,
                             float* __restrict m, float* __restrict rstd) {
  float s[kTile];
  for (int64_t p = 0; p < n; ++p) {
    k[p] = to_float(y[p]);
    s[p] = 0.0f;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict yc = y + c * HW;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) s[p] += to_float(yc[p]) - k[p];
  }
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int64_t p = 0; p < n; ++p) {
    m[p] = s[p] * inv_c;
    s[p] = 0.0f;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict yc = y + c * HW;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const float d = (to_float(yc[p]) - k[p]) - m[p];
      s[p] += d * d;
    }
  }
  for (int64_t p = 0; p < n; ++p) rstd[p] = 1.0f / std::sqrt(s[p] * inv_c + kEps);
}

template <typename T>
SSLAM_INLINE void fwd_tiles(const Job<T>& j, int64_t begin, int64_t end) {
  const int64_t C = j.C, HW = j.HW;
  float k[kTile], m[kTile], rstd[kTile];
  for (int64_t t = begin; t < end; ++t) {
    int64_t n;
    const int64_t off = tile_offset(t, C, HW, n);
    tile_stats(j.y + off, C, HW, n, k, m, rstd);
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict yc = j.y + off + c * HW;
      const T* __restrict zc = j.other + off + c * HW;
      T* __restrict oc = j.out + off + c * HW;
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) {
        const float x = ((to_float(yc[p]) - k[p]) - m[p]) * rstd[p];
        oc[p] = from_float<T>(gelu(x) + to_float(zc[p]));
      }
    }
  }
}

template <typename T>
SSLAM_INLINE void bwd_tiles(const Job<T>& j, int64_t begin, int64_t end) {
  const int64_t C = j.C, HW = j.HW;
  std::vector<float> g_buf(C * kTile);  // g of the tile, channel-major
  float* __restrict g = g_buf.data();
  float k[kTile], m[kTile], rstd[kTile], sg[kTile], sgx[kTile];
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int64_t t = begin; t < end; ++t) {
    int64_t n;
    const int64_t off = tile_offset(t, C, HW, n);
    tile_stats(j.y + off, C, HW, n, k, m, rstd);
    for (int64_t p = 0; p < n; ++p) sg[p] = sgx[p] = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict yc = j.y + off + c * HW;
      const T* __restrict goc = j.other + off + c * HW;
      float* __restrict gc = g + c * kTile;
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) {
        const float x = ((to_float(yc[p]) - k[p]) - m[p]) * rstd[p];
        const float v = to_float(goc[p]) * gelu_grad(x);
        gc[p] = v;
        sg[p] += v;
        sgx[p] += v * x;
      }
    }
    for (int64_t p = 0; p < n; ++p) {
      sg[p] *= inv_c;
      sgx[p] *= inv_c;
    }
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict yc = j.y + off + c * HW;
      const float* __restrict gc = g + c * kTile;
      T* __restrict oc = j.out + off + c * HW;
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) {
        const float x = ((to_float(yc[p]) - k[p]) - m[p]) * rstd[p];
        oc[p] = from_float<T>(rstd[p] * (gc[p] - sg[p] - x * sgx[p]));
      }
    }
  }
}

// --- per-ISA entry points and dispatch -------------------------------------------------------------------------------

template <typename T>
using RangeFn = void (*)(const Job<T>&, int64_t, int64_t);

template <typename T>
struct Kernels {
  RangeFn<T> fwd_rows, bwd_rows, fwd_tiles, bwd_tiles;
};

#if SSLAM_X86
template <typename T>
SSLAM_TARGET_AVX512 void fwd_rows_avx512(const Job<T>& j, int64_t b, int64_t e) { fwd_rows<16>(j, b, e); }
template <typename T>
SSLAM_TARGET_AVX512 void bwd_rows_avx512(const Job<T>& j, int64_t b, int64_t e) { bwd_rows<16>(j, b, e); }
template <typename T>
SSLAM_TARGET_AVX512 void fwd_tiles_avx512(const Job<T>& j, int64_t b, int64_t e) { fwd_tiles(j, b, e); }
template <typename T>
SSLAM_TARGET_AVX512 void bwd_tiles_avx512(const Job<T>& j, int64_t b, int64_t e) { bwd_tiles(j, b, e); }
template <typename T>
SSLAM_TARGET_AVX2 void fwd_rows_avx2(const Job<T>& j, int64_t b, int64_t e) { fwd_rows<8>(j, b, e); }
template <typename T>
SSLAM_TARGET_AVX2 void bwd_rows_avx2(const Job<T>& j, int64_t b, int64_t e) { bwd_rows<8>(j, b, e); }
template <typename T>
SSLAM_TARGET_AVX2 void fwd_tiles_avx2(const Job<T>& j, int64_t b, int64_t e) { fwd_tiles(j, b, e); }
template <typename T>
SSLAM_TARGET_AVX2 void bwd_tiles_avx2(const Job<T>& j, int64_t b, int64_t e) { bwd_tiles(j, b, e); }
#endif
template <typename T>
void fwd_rows_baseline(const Job<T>& j, int64_t b, int64_t e) { fwd_rows<4>(j, b, e); }
template <typename T>
void bwd_rows_baseline(const Job<T>& j, int64_t b, int64_t e) { bwd_rows<4>(j, b, e); }
template <typename T>
void fwd_tiles_baseline(const Job<T>& j, int64_t b, int64_t e) { fwd_tiles(j, b, e); }
template <typename T>
void bwd_tiles_baseline(const Job<T>& j, int64_t b, int64_t e) { bwd_tiles(j, b, e); }

template <typename T>
Kernels<T> kernels() {
#if SSLAM_X86
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return {&fwd_rows_avx512<T>, &bwd_rows_avx512<T>, &fwd_tiles_avx512<T>, &bwd_tiles_avx512<T>};
    case Isa::kAvx2:
      return {&fwd_rows_avx2<T>, &bwd_rows_avx2<T>, &fwd_tiles_avx2<T>, &bwd_tiles_avx2<T>};
    case Isa::kBaseline:
      break;
  }
#endif
  return {&fwd_rows_baseline<T>, &bwd_rows_baseline<T>, &fwd_tiles_baseline<T>, &bwd_tiles_baseline<T>};
}

// --- host code ---------------------------------------------------------------------------------------------------------

void check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (R, C, H, W), got ", t.dim(), " dims");
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

template <typename T>
void launch(const at::Tensor& y, const at::Tensor& other, at::Tensor& dst, bool channels_last, bool backward) {
  const int64_t R = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const Job<T> job{y.const_data_ptr<T>(), other.const_data_ptr<T>(), dst.mutable_data_ptr<T>(), C, HW};
  const Kernels<T> k = kernels<T>();
  if (channels_last) {
    const RangeFn<T> fn = backward ? k.bwd_rows : k.fwd_rows;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / C);
    at::parallel_for(0, R * HW, grain, [&](int64_t b, int64_t e) { fn(job, b, e); });
  } else {
    const RangeFn<T> fn = backward ? k.bwd_tiles : k.fwd_tiles;
    const int64_t tiles = R * ((HW + kTile - 1) / kTile);
    const int64_t grain = std::max<int64_t>(1, kGrainElems / (C * std::min(kTile, HW)));
    at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) { fn(job, b, e); });
  }
}

// Runs the forward (backward = false) or backward kernel. The result has y's memory format (empty_like(y)). The
// kernel runs channels-last when that result is channels-last and not also NCHW-contiguous (both hold when C = 1 or
// H*W = 1; with H*W = 1 the channels are the unit-stride dim, so that case runs channels-last too), NCHW otherwise;
// the inputs are brought to the same layout (a no-op when they already have it). A result in neither layout (y
// dense in some other dim order) is computed NCHW and copied.
at::Tensor run(const at::Tensor& y_in, const at::Tensor& other_in, bool backward) {
  at::Tensor out = at::empty_like(y_in);
  if (out.numel() == 0) return out;
  const int64_t HW = y_in.size(2) * y_in.size(3);
  const bool cl = out.is_contiguous(at::MemoryFormat::ChannelsLast) && (HW == 1 || !out.is_contiguous());
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor dst = out.is_contiguous(fmt) ? out : at::empty(y_in.sizes(), y_in.options().memory_format(fmt));
  const at::Tensor y = y_in.contiguous(fmt);
  const at::Tensor other = other_in.contiguous(fmt);
  switch (y.scalar_type()) {
    case at::kFloat:
      launch<float>(y, other, dst, cl, backward);
      break;
    case at::kHalf:
      launch<c10::Half>(y, other, dst, cl, backward);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(y, other, dst, cl, backward);
      break;
    default:
      TORCH_CHECK(false, "unreachable: dtype checked by check_input");
  }
  if (!dst.is_same(out)) out.copy_(dst);
  return out;
}

at::Tensor ln_gelu_residual_cpu(const at::Tensor& y, const at::Tensor& z) {
  constexpr const char* op = "ln_gelu_residual";
  check_input(op, "y", y, y);
  check_input(op, "z", z, y);
  return run(y, z, /*backward=*/false);
}

at::Tensor ln_gelu_residual_backward_cpu(const at::Tensor& grad_out, const at::Tensor& y) {
  constexpr const char* op = "ln_gelu_residual_backward";
  check_input(op, "y", y, y);
  check_input(op, "grad_out", grad_out, y);
  return run(y, grad_out, /*backward=*/true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslam_fast_C, m) {
  m.def("ln_gelu_residual(Tensor y, Tensor z) -> Tensor");
  m.def("ln_gelu_residual_backward(Tensor grad_out, Tensor y) -> Tensor");
}

TORCH_LIBRARY_IMPL(sslam_fast_C, CPU, m) {
  m.impl("ln_gelu_residual", &ln_gelu_residual_cpu);
  m.impl("ln_gelu_residual_backward", &ln_gelu_residual_backward_cpu);
}

}  // namespace sslam_fast
