// The CPU kernel of torch.ops.sslam_fast_C.fbank (the op and its pipeline: csrc/kaldi_fbank.cpp): stage 1 (framing,
// offset and DC removal, pre-emphasis, window) and stage 3 (power spectrum, sparse mel, log, normalisation) of a chunk
// of frames, each compiled per instruction set.
//
// Agreement with torchaudio. The float32 log-mel of the lowest filters is ill-conditioned: after pre-emphasis the
// first FFT bins hold little energy, and rounding differences of one ulp in the frame mean move their log-mel by up
// to 1e-3 on white noise (float32 torchaudio is itself that far from a float64 computation). So everything up to and
// including the FFT is reproduced bit for bit:
//   * the frame mean is summed in exactly the order torch's CPU sum kernel uses (SumKernel.cpp: vectorized inner sum,
//     4-way ILP, cascade levels) for the vector width torch runs at, found once per process by comparing against
//     at::mean on a probe (torch_mean_width), then divided by the frame length as at::mean does;
//   * subtraction, pre-emphasis and window are separate float32 roundings, as in torch (no FMA contraction here);
//   * the FFT is torch's own (at::fft_rfft: MKL or pocketfft, the library torchaudio uses).
// After the FFT the remaining steps are sums of positive terms and a log, insensitive to rounding order (|diff| about
// 1e-6 on the log-mel).
//
// SIMD: GNU vector extensions (csrc/simd.h), compiled three times (AVX-512, AVX2+FMA, baseline) through target
// attributes and picked at run time with __builtin_cpu_supports, so the build needs no -march flag.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_isa.h"
#include "kaldi_fbank.h"
#include "simd.h"

namespace sslam_fast::kaldi_fbank {
namespace {

constexpr float kPreemphasis = 0.97f;
constexpr float kLogFloor = std::numeric_limits<float>::epsilon();  // 1.1920929e-07, torchaudio's floor

// log(max(e, FLT_EPSILON)) per lane, with torch's special values: NaN stays NaN, +inf gives +inf.
// The argument is split as 2^k * m with m in [sqrt(1/2), sqrt(2)); log(m) = log1p(m - 1) is the classic Cephes logf
// minimax polynomial (relative error about 1e-7).
template <int L>
SSLAM_INLINE typename Vec<L>::F vlog_floored(typename Vec<L>::F e) {
  using F = typename Vec<L>::F;
  using I = typename Vec<L>::I;
  const F v = vselect<L>(e < kLogFloor, vsplat<L>(kLogFloor), e);  // NaN compares false: kept
  constexpr int32_t kSqrtHalfBits = 0x3f3504f3;                       // bits of 0.70710677f
  const I shifted = (I)v - kSqrtHalfBits;
  const F k = __builtin_convertvector(shifted >> 23, F);  // arithmetic shift: exponent with m in [sqrt(1/2), sqrt(2))
  const F f = (F)((shifted & 0x007fffff) + kSqrtHalfBits) - 1.0f;
  const F z = f * f;
  F p = vsplat<L>(7.0376836292e-2f);
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  F y = p * f * z;
  y += -2.12194440e-4f * k;  // ln 2 = 0.693359375 - 2.12194440e-4, split for accuracy
  y += -0.5f * z;
  const F l = (f + y) + 0.693359375f * k;
  return vselect<L>(v <= std::numeric_limits<float>::max(), l, v);  // +inf and NaN: passed through
}

// |X|^2 of L consecutive bins from 2L interleaved (re, im) floats.
template <int L, int... Is>
SSLAM_INLINE typename Vec<L>::F power_vec(const float* s, std::integer_sequence<int, Is...>) {
  const auto lo = vload<L>(s);
  const auto hi = vload<L>(s + L);
  const auto re = __builtin_shufflevector(lo, hi, (2 * Is)...);
  const auto im = __builtin_shufflevector(lo, hi, (2 * Is + 1)...);
  return re * re + im * im;
}

// ---------------------------------------------------------------------------------------------------------------
// Frame mean in torch's summation order
// ---------------------------------------------------------------------------------------------------------------

inline int64_t ceil_log2(int64_t x) {  // as at::native::utils::CeilLog2
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

template <int V>
struct SumLanes {
  using F = typename Vec<V>::F;
  static SSLAM_INLINE F load(const float* p, float offset) { return vload<V>(p) - offset; }
  static SSLAM_INLINE float lane_total(float total, F v) {
    float lanes[V];
    std::memcpy(lanes, &v, sizeof(v));
    for (int l = 0; l < V; ++l) total += lanes[l];
    return total;
  }
};
template <>
struct SumLanes<1> {
  using F = float;
  static SSLAM_INLINE F load(const float* p, float offset) { return *p - offset; }
  static SSLAM_INLINE float lane_total(float total, F v) { return total + v; }
};

// sum_j (x[j] - offset) over j < n, in the order of torch's CPU float sum over a contiguous row whose vector type
// holds V floats (SumKernel.cpp: vectorized_inner_sum -> row_sum -> multi_row_sum; V = 1: scalar_inner_sum).
template <int V>
SSLAM_INLINE float torch_order_sum(const float* x, float offset, int64_t n) {
  using S = SumLanes<V>;
  using F = typename S::F;
  constexpr int kIlp = 4;
  constexpr int kLevels = 4;
  const int64_t nvec = n / V;
  const int64_t rows = nvec / kIlp;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(rows) / kLevels);
  const int64_t level_step = int64_t{1} << level_power;
  F sum;
  if (rows < level_step) {
    // No cascade level is ever closed (rows < 16: any frame shorter than 64 vectors): the four ILP accumulators in
    // registers. Adding the untouched (+0) levels, as torch does, changes no nonzero value and no result.
    F a0{}, a1{}, a2{}, a3{};
    for (int64_t i = 0; i < rows; ++i) {
      const float* p = x + i * kIlp * V;
      a0 += S::load(p, offset);
      a1 += S::load(p + V, offset);
      a2 += S::load(p + 2 * V, offset);
      a3 += S::load(p + 3 * V, offset);
    }
    for (int64_t v = rows * kIlp; v < nvec; ++v) a0 += S::load(x + v * V, offset);
    sum = ((a0 + a1) + a2) + a3;
  } else {
    F acc[kLevels][kIlp];
    for (auto& level : acc) {
      for (auto& a : level) a = F{};
    }
    const int64_t level_mask = level_step - 1;
    int64_t i = 0;
    while (i + level_step <= rows) {
      for (int64_t j = 0; j < level_step; ++j, ++i) {
        for (int k = 0; k < kIlp; ++k) acc[0][k] += S::load(x + (i * kIlp + k) * V, offset);
      }
      for (int level = 1; level < kLevels; ++level) {
        for (int k = 0; k < kIlp; ++k) {
          acc[level][k] += acc[level - 1][k];
          acc[level - 1][k] = F{};
        }
        if ((i & (level_mask << (level * level_power))) != 0) break;
      }
    }
    for (; i < rows; ++i) {
      for (int k = 0; k < kIlp; ++k) acc[0][k] += S::load(x + (i * kIlp + k) * V, offset);
    }
    for (int level = 1; level < kLevels; ++level) {
      for (int k = 0; k < kIlp; ++k) acc[0][k] += acc[level][k];
    }
    for (int64_t v = rows * kIlp; v < nvec; ++v) acc[0][0] += S::load(x + v * V, offset);
    for (int k = 1; k < kIlp; ++k) acc[0][0] += acc[0][k];
    sum = acc[0][0];
  }
  if constexpr (V == 1) return S::lane_total(0.0f, sum);
  float total = 0.0f;  // vectorized_inner_sum: scalar tail first, then the vector lanes in order
  for (int64_t j = nvec * V; j < n; ++j) total += x[j] - offset;
  return S::lane_total(total, sum);
}

// mean_j (x[j] - offset) as at::mean computes it (sum, then division by the count) for a torch vector width.
SSLAM_INLINE float torch_order_mean(const float* x, float offset, int64_t n, int width) {
  float sum;
  if (n < width) {  // torch takes the scalar path for rows shorter than one vector
    sum = torch_order_sum<1>(x, offset, n);
  } else if (width == 16) {
    sum = torch_order_sum<16>(x, offset, n);
  } else if (width == 8) {
    sum = torch_order_sum<8>(x, offset, n);
  } else {
    sum = torch_order_sum<4>(x, offset, n);
  }
  return sum / static_cast<float>(n);
}

}  // namespace

// The float vector width of torch's CPU sum kernel in this process (8 for the AVX2 and default builds, 16 when it
// runs its AVX-512 kernels), found by reproducing at::mean on probe rows. Computed once (outside parallel regions).
int torch_mean_width() {
  static const int width = [] {
    const int64_t lengths[] = {5, 37, 403, 1301};  // scalar path, tails, cascade levels
    const int64_t rows = 8;
    uint64_t state = 0x9E3779B97F4A7C15ull;
    auto next = [&state]() {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      return state >> 33;
    };
    const int candidates[] = {8, 16, 4};
    int matches[3] = {0, 0, 0};
    int total = 0;
    for (const int64_t len : lengths) {
      at::Tensor probe = at::empty({rows, len}, at::TensorOptions().dtype(at::kFloat));
      float* p = probe.data_ptr<float>();
      for (int64_t j = 0; j < rows * len; ++j) {
        // mixed signs and magnitudes, so that the summation order shows in the rounding
        const float u = static_cast<float>(next() % 2000001) / 1000000.0f - 1.0f;
        p[j] = std::ldexp(u, static_cast<int>(next() % 17) - 8);
      }
      at::Tensor mean = at::mean(probe, {1});
      const float* m = mean.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r, ++total) {
        for (int c = 0; c < 3; ++c) {
          const float mine = torch_order_mean(p + r * len, 0.0f, len, candidates[c]);
          if (std::memcmp(&mine, m + r, sizeof(float)) == 0) ++matches[c];
        }
      }
    }
    int best = 0;
    for (int c = 1; c < 3; ++c) {
      if (matches[c] > matches[best]) best = c;
    }
    if (matches[best] != total) {
      TORCH_WARN_ONCE("sslam_fast_C::fbank: could not reproduce torch's float32 summation order (", matches[best],
                      "/", total, " probe rows match); frame means may differ from torchaudio by one ulp");
    }
    return candidates[best];
  }();
  return width;
}

// ---------------------------------------------------------------------------------------------------------------
// The two parallel stages
// ---------------------------------------------------------------------------------------------------------------

MelSpans make_spans(const float* banks, int64_t mels, int64_t bins) {
  MelSpans s;
  s.first.resize(mels);
  s.count.resize(mels);
  s.start.resize(mels);
  for (int64_t m = 0; m < mels; ++m) {
    const float* row = banks + m * bins;
    int64_t lo = 0;
    while (lo < bins && row[lo] == 0.0f) ++lo;
    int64_t hi = bins;
    while (hi > lo && row[hi - 1] == 0.0f) --hi;
    s.first[m] = hi > lo ? lo : 0;
    s.count[m] = hi - lo;
    s.start[m] = static_cast<int64_t>(s.weights.size());
    s.weights.insert(s.weights.end(), row + lo, row + hi);
  }
  return s;
}

namespace {

// Stage 1. No FMA contraction here: torch rounds the product and the difference of the pre-emphasis separately.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

template <int L>
SSLAM_INLINE void fill_frames(const Job& job, int64_t lo, int64_t hi) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  using F = typename Vec<L>::F;
  const int64_t n = job.frame_length;
  const float* w = job.window;
  // y = (x - offset) - mean; out[j] = (y[j] - 0.97 y[j-1]) * w[j], y[-1] := y[0]
  auto emphasise = [&](const float* x, float off, float mean, float* o) {
    const float y0 = (x[0] - off) - mean;
    o[0] = (y0 - kPreemphasis * y0) * w[0];
    auto block = [&](int64_t j) {
      const F y = (vload<L>(x + j) - off) - mean;
      const F prev = (vload<L>(x + j - 1) - off) - mean;
      vstore<L>(o + j, (y - kPreemphasis * prev) * vload<L>(w + j));
    };
    int64_t j = 1;
    for (; j + L <= n; j += L) block(j);
    if (j < n && n > L) {  // the last L outputs again, overlapping: same values
      block(n - L);
      j = n;
    }
    for (; j < n; ++j) {
      const float y = (x[j] - off) - mean;
      const float prev = (x[j - 1] - off) - mean;
      o[j] = (y - kPreemphasis * prev) * w[j];
    }
  };
  int64_t i = lo;
  for (; i + 2 <= hi; i += 2) {  // two frames at a time: their sums' dependency chains overlap
    const int64_t f = job.c0 + i;
    const float* x0 = job.wave + job.src[f];
    const float* x1 = job.wave + job.src[f + 1];
    const float off0 = job.frame_offset[f];
    const float off1 = job.frame_offset[f + 1];
    const float mean0 = torch_order_mean(x0, off0, n, job.mean_width);
    const float mean1 = torch_order_mean(x1, off1, n, job.mean_width);
    emphasise(x0, off0, mean0, job.frames + i * job.n_fft);
    emphasise(x1, off1, mean1, job.frames + (i + 1) * job.n_fft);
  }
  for (; i < hi; ++i) {
    const int64_t f = job.c0 + i;
    const float* x = job.wave + job.src[f];
    const float off = job.frame_offset[f];
    emphasise(x, off, torch_order_mean(x, off, n, job.mean_width), job.frames + i * job.n_fft);
  }
}

#if SSLAM_X86
SSLAM_TARGET_AVX512 void fill_avx512(const Job& job, int64_t lo, int64_t hi) { fill_frames<16>(job, lo, hi); }
SSLAM_TARGET_AVX2 void fill_avx2(const Job& job, int64_t lo, int64_t hi) { fill_frames<8>(job, lo, hi); }
#endif
void fill_baseline(const Job& job, int64_t lo, int64_t hi) { fill_frames<4>(job, lo, hi); }

#pragma GCC pop_options

// Stage 3 for groups [glo, ghi) of L frames of the chunk (count frames in all). P: bins * L floats of scratch.
template <int L>
SSLAM_INLINE void mel_groups(const Job& job, int64_t count, int64_t glo, int64_t ghi, float* P) {
  using F = typename Vec<L>::F;
  using Seq = std::make_integer_sequence<int, L>;
  const int64_t bins = job.bins;
  const int64_t mels = job.mels;
  const MelSpans& mel = *job.mel;
  const int64_t full_tiles = (bins - 1) / L;  // bin tiles whose 2L floats lie inside the row
  F r[L];
  float* dst[L];
  for (int64_t g = glo; g < ghi; ++g) {
    const int64_t i0 = g * L;
    const int64_t n = std::min<int64_t>(L, count - i0);
    const float* spec = job.spec + i0 * 2 * bins;
    for (int64_t i = 0; i < n; ++i) dst[i] = job.out + job.dst[job.c0 + i0 + i];
    // Power, transposed: P[k * L + i] = |X_i[k]|^2.
    for (int64_t kb = 0; kb < full_tiles; ++kb) {
      for (int i = 0; i < L; ++i) r[i] = i < n ? power_vec<L>(spec + i * 2 * bins + kb * 2 * L, Seq{}) : F{};
      transpose<L>(r);
      for (int c = 0; c < L; ++c) vstore<L>(P + (kb * L + c) * L, r[c]);
    }
    for (int64_t k = full_tiles * L; k < bins; ++k) {
      for (int i = 0; i < L; ++i) {
        float p = 0.0f;
        if (i < n) {
          const float re = spec[i * 2 * bins + 2 * k];
          const float im = spec[i * 2 * bins + 2 * k + 1];
          p = re * re + im * im;
        }
        P[k * L + i] = p;
      }
    }
    // Mel, log and normalisation for L filters at a time, then back to frame-major rows.
    for (int64_t m0 = 0; m0 < mels; m0 += L) {
      const int64_t mc = std::min<int64_t>(L, mels - m0);
      for (int c = 0; c < L; ++c) {
        F acc{};
        if (c < mc) {
          const int64_t m = m0 + c;
          const float* w = mel.weights.data() + mel.start[m];
          const float* p = P + mel.first[m] * L;
          const int64_t cnt = mel.count[m];
          F acc1{};
          int64_t k = 0;
          for (; k + 2 <= cnt; k += 2) {
            acc += w[k] * vload<L>(p + k * L);
            acc1 += w[k + 1] * vload<L>(p + (k + 1) * L);
          }
          if (k < cnt) acc += w[k] * vload<L>(p + k * L);
          acc += acc1;
        }
        r[c] = (vlog_floored<L>(acc) - job.shift) * job.scale;
      }
      transpose<L>(r);
      for (int64_t i = 0; i < n; ++i) {
        if (mc == L) {
          vstore<L>(dst[i] + m0, r[i]);
        } else {
          std::memcpy(dst[i] + m0, &r[i], mc * sizeof(float));
        }
      }
    }
  }
}

#if SSLAM_X86
SSLAM_TARGET_AVX512 void mel_avx512(const Job& job, int64_t count, int64_t glo, int64_t ghi, float* P) {
  mel_groups<16>(job, count, glo, ghi, P);
}
SSLAM_TARGET_AVX2 void mel_avx2(const Job& job, int64_t count, int64_t glo, int64_t ghi, float* P) {
  mel_groups<8>(job, count, glo, ghi, P);
}
#endif
void mel_baseline(const Job& job, int64_t count, int64_t glo, int64_t ghi, float* P) {
  mel_groups<4>(job, count, glo, ghi, P);
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k = [] {
#if SSLAM_X86
    switch (cpu_isa()) {
      case Isa::kAvx512:
        return Kernels{16, &fill_avx512, &mel_avx512};
      case Isa::kAvx2:
        return Kernels{8, &fill_avx2, &mel_avx2};
      case Isa::kBaseline:
        break;
    }
#endif
    return Kernels{4, &fill_baseline, &mel_baseline};
  }();
  return k;
}

}  // namespace sslam_fast::kaldi_fbank
