// Inverse block masks on CPU: torch.ops.sslam_fast_C.inverse_block_mask.
//
// The distribution of upstream compute_block_mask_2d with inverse_mask=True, require_same_masks=True (ALGORITHM §3),
// for all rows of a batch at once. Each row is built as a bitset of its H*W tokens (bit set = kept, token n = W t + f):
//   1. n_centers centres drawn uniformly from the H*W tokens, with replacement (duplicates collapse): each centre is an
//      independent uniform time row r in [0, H) and frequency column c in [0, W), which is a uniform token id without
//      the division that would split one;
//   2. each centre (r, c) kept-marks the block [r - o, r - o + mask_length) x [c - o, c - o + mask_length) cut to the
//      grid, o = mask_length / 2: the same set as upstream's clamped expansion (clamping folds the outside cells onto
//      cells that the cut block already contains). When mask_length rows of W bits fit in 64 bits (EAT: 5 x 8), a
//      block is one shifted 64-bit pattern OR-ed into at most two words; otherwise it is set row by row;
//   3. the exact fix-up to `keep` kept tokens: a row with n > keep keeps a uniformly random keep-subset of its block
//      tokens, a row with n < keep adds a uniformly random (keep - n)-subset of the others. Upstream draws these with
//      torch.multinomial without replacement on the 0/1 row, which is a uniformly random subset of the given size;
//      here flip_random draws the same distribution (by rejection over the grid or from a list of the candidates).
// Output: (rows, H*W) bool, true = masked (not kept), written by expanding the bitset (spread_*).
//
// RNG: one stream per row, so that a row's tokens depend only on (seed, row): the result is deterministic for a seed
// and independent of the thread count and of the batch split. The stream is wyrand (a Weyl sequence mixed by one
// 64 x 64 -> 128-bit multiply, two 32-bit draws per step) started at mix64(seed ^ mix64(row + gamma)) (splitmix64's
// finaliser). Uniform integers in [0, m) use Lemire's multiply-and-reject (exactly uniform). The reference draws with
// torch's generator, so the bits differ from the reference; the distribution is the same (tests of inverse_block_mask).
//
// Instruction sets: the row loop is compiled three times (AVX-512, AVX2, baseline; csrc/cpu_isa.h), which gives the
// two wider builds hardware popcount and a vector expansion of the bitset into bytes.
//
// keep = -1 skips step 3 and returns the raw union of blocks (a diagnostic used by the tests).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"

#if SSLAM_X86
#include <immintrin.h>
#endif

namespace sslam_fast {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;  // splitmix64 increment (golden ratio)
// Rows per parallel chunk; fewer rows run inline on the calling thread. A row costs ~0.1 us (EAT shape, AVX-512), so
// one EAT batch (12 x 16 = 192 rows, ~20 us) stays on one thread: an OpenMP fork/join costs ~5-10 us on an idle
// machine, and when the other cores are busy (DataLoader workers, other jobs) waking a worker was measured at ~8 ms
// (median, 2 cores, loaded). Larger batches split into chunks of >= 1024 rows (>= ~100 us each).
constexpr int64_t kGrainRows = 1024;

SSLAM_INLINE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

class RowRng {
 public:
  SSLAM_INLINE RowRng(uint64_t seed, uint64_t row) : state_(mix64(seed ^ mix64(row + kGamma))) {}

  SSLAM_INLINE uint32_t next32() {
    if (have_low_) {
      have_low_ = false;
      return low_;
    }
    state_ += 0xA0761D6478BD642FULL;
    const unsigned __int128 t = static_cast<unsigned __int128>(state_) * (state_ ^ 0xE7037ED1A0B428DBULL);
    const uint64_t x = static_cast<uint64_t>(t >> 64) ^ static_cast<uint64_t>(t);
    low_ = static_cast<uint32_t>(x);
    have_low_ = true;
    return static_cast<uint32_t>(x >> 32);
  }

  // Uniform in [0, m), 1 <= m < 2^32, exactly (Lemire 2019, "Fast random integer generation in an interval").
  SSLAM_INLINE uint32_t below(uint32_t m) {
    uint64_t prod = static_cast<uint64_t>(next32()) * m;
    uint32_t low = static_cast<uint32_t>(prod);
    if (__builtin_expect(low < m, 0)) {
      const uint32_t threshold = static_cast<uint32_t>(-m) % m;
      while (low < threshold) {
        prod = static_cast<uint64_t>(next32()) * m;
        low = static_cast<uint32_t>(prod);
      }
    }
    return static_cast<uint32_t>(prod >> 32);
  }

 private:
  uint64_t state_;
  uint32_t low_ = 0;
  bool have_low_ = false;
};

// The sizes of one call, shared by its chunks.
struct Grid {
  int64_t H, W, L;
  int64_t nw;          // 64-bit words a row's bitset holds: ceil(L / 64)
  uint64_t last_mask;  // the valid bits of the last word
  int64_t n_centers, mask_length, keep;
  bool pattern;        // a block is rep[h] * (column bits): h rows of W bits fit in one 64-bit word
  uint64_t rep[65];    // rep[h] = sum over k < h of 2^(k W): bit 0 of each of h consecutive grid rows
};

Grid make_grid(int64_t H, int64_t W, int64_t n_centers, int64_t mask_length, int64_t keep) {
  Grid g{};
  g.H = H;
  g.W = W;
  g.L = H * W;
  g.nw = (g.L + 63) / 64;
  g.last_mask = (g.L % 64) ? (1ULL << (g.L % 64)) - 1 : ~0ULL;
  g.n_centers = n_centers;
  g.mask_length = mask_length;
  g.keep = keep;
  const int64_t hmax = std::min(mask_length, H);  // the tallest cut block
  g.pattern = W <= 64 && hmax * W <= 64;
  if (g.pattern) {
    for (int64_t h = 1; h <= hmax; ++h) g.rep[h] = g.rep[h - 1] | (1ULL << ((h - 1) * W));
  }
  return g;
}

// Bits [lo, hi) of a bitset set to one (lo < hi).
SSLAM_INLINE void set_range(uint64_t* bits, int64_t lo, int64_t hi) {
  const int64_t w0 = lo >> 6, w1 = (hi - 1) >> 6;
  const uint64_t m0 = ~0ULL << (lo & 63);
  const uint64_t m1 = ~0ULL >> (63 - ((hi - 1) & 63));
  if (w0 == w1) {
    bits[w0] |= m0 & m1;
    return;
  }
  bits[w0] |= m0;
  for (int64_t w = w0 + 1; w < w1; ++w) bits[w] = ~0ULL;
  bits[w1] |= m1;
}

// Flip `count` uniformly random bits among the m bits of the row that equal `value` (1 <= count <= m / 2: the callers
// flip the complement when more are needed). Two exact ways, whichever is expected to cost less:
//   * rejection: draw tokens uniformly from the grid and flip a draw whose bit still equals `value`. Each accepted draw
//     is uniform over the candidates not yet flipped, so the flipped set is a uniformly random count-subset. The body
//     is branch-free; the expected number of draws is sum_{j < count} L / (m - j) <= L * count / (m - count).
//   * listing: list the m candidates in order (ctz over the words), then a partial Fisher-Yates shuffle picks count
//     of them: ~nw + m + count steps, whatever the share of candidates in the grid.
// The cost weights (a draw 3, a word 20 with its loop exit, a listed candidate 2, a pick 8) are rough cycle counts. At
// the EAT shape both fix-ups reject: adding ~15 of ~420 free tokens takes ~19 draws, dropping ~8 of ~110 block tokens
// ~40 draws, against ~1000 and ~450 for listing.
SSLAM_INLINE void flip_random(uint64_t* bits, const Grid& g, bool value, int64_t m, int64_t count, RowRng& rng,
                              std::vector<int32_t>& cand_buf) {
  if (count <= 0) return;
  const uint64_t flip = value ? 0 : ~0ULL;  // (word ^ flip) has the candidates set
  const double L = static_cast<double>(g.L), cnt = static_cast<double>(count), cands = static_cast<double>(m);
  const double reject_cost = 3.0 * L * cnt / (cands - cnt);
  const double list_cost = 20.0 * static_cast<double>(g.nw) + 2.0 * cands + 8.0 * cnt;
  if (reject_cost <= list_cost) {
    const uint32_t uL = static_cast<uint32_t>(g.L);
    for (int64_t done = 0; done < count;) {
      const uint32_t i = rng.below(uL);
      const uint64_t word = bits[i >> 6];
      const uint64_t hit = (word ^ flip) & (1ULL << (i & 63));
      done += hit != 0;
      bits[i >> 6] = word ^ hit;
    }
    return;
  }
  if (cand_buf.empty()) cand_buf.resize(static_cast<size_t>(g.L));
  int32_t* const cand = cand_buf.data();
  int64_t k = 0;
  for (int64_t w = 0; w < g.nw; ++w) {
    uint64_t x = (bits[w] ^ flip) & (w == g.nw - 1 ? g.last_mask : ~0ULL);
    while (x) {
      cand[k++] = static_cast<int32_t>((w << 6) + __builtin_ctzll(x));
      x &= x - 1;
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    const int64_t s = j + rng.below(static_cast<uint32_t>(m - j));
    std::swap(cand[j], cand[s]);
    bits[cand[j] >> 6] ^= 1ULL << (cand[j] & 63);
  }
}

// --- the bitset of a row as L bytes, 1 = masked (bit clear) ----------------------------------------------------------

// Eight tokens per step: byte b of the bitset -> 8 bytes, byte k = 1 - bit k of b.
struct SpreadTable {
  uint64_t t[256];
  SpreadTable() {
    for (int b = 0; b < 256; ++b) {
      uint64_t v = 0;
      for (int k = 0; k < 8; ++k) v |= static_cast<uint64_t>(((b >> k) & 1) ^ 1) << (8 * k);
      t[b] = v;
    }
  }
};
const SpreadTable kSpread;

// Tokens [i, L) of the row (i a multiple of 8).
SSLAM_INLINE void spread_from(uint8_t* dst, const uint64_t* bits, int64_t i, int64_t L) {
  for (; i + 8 <= L; i += 8) {
    const uint64_t v = kSpread.t[(bits[i >> 6] >> (i & 63)) & 0xFF];
    std::memcpy(dst + i, &v, 8);
  }
  for (; i < L; ++i) dst[i] = static_cast<uint8_t>(((bits[i >> 6] >> (i & 63)) & 1) ^ 1);
}

#if SSLAM_X86
// 64 tokens per step: a byte move of a vector of ones under the inverted word as the byte mask.
SSLAM_TARGET_AVX512 __attribute__((noinline)) void spread_avx512(uint8_t* dst, const uint64_t* bits, int64_t L) {
  const __m512i one = _mm512_set1_epi8(1);
  int64_t i = 0;
  for (; i + 64 <= L; i += 64) _mm512_storeu_si512(dst + i, _mm512_maskz_mov_epi8(~bits[i >> 6], one));
  if (i < L) _mm512_mask_storeu_epi8(dst + i, (1ULL << (L - i)) - 1, _mm512_maskz_mov_epi8(~bits[i >> 6], one));
}

// 32 tokens per step: the 4 bytes broadcast, each byte shuffled to 8 lanes, lane k tests bit k.
SSLAM_TARGET_AVX2 __attribute__((noinline)) void spread_avx2(uint8_t* dst, const uint64_t* bits, int64_t L) {
  const __m256i lanes = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i one = _mm256_set1_epi8(1);
  int64_t i = 0;
  for (; i + 32 <= L; i += 32) {
    const uint32_t b = static_cast<uint32_t>(bits[i >> 6] >> (i & 63));
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(b)), lanes);
    const __m256i clear = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), _mm256_setzero_si256());
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_and_si256(clear, one));
  }
  spread_from(dst, bits, i, L);
}
#endif

enum class Spread { kAvx512, kAvx2, kTable };

// Rows [begin, end) of the output (L bytes a row, 1 = masked). Per chunk two bitsets of nw + 1 words (the extra word
// takes the high half of a block pattern that crosses the last word boundary; it is never read) and, only when a
// fix-up lists its candidates, an L-entry list: nothing is allocated per row.
template <Spread kSpreadIsa>
SSLAM_INLINE void fill_rows(uint8_t* const out_base, int64_t begin, int64_t end, const Grid& g, uint64_t seed) {
  // Sizes as locals: the bitset stores (uint64_t) may alias the Grid's 64-bit fields, which would be reloaded.
  const int64_t H = g.H, W = g.W, L = g.L, nw = g.nw, ml = g.mask_length, off = ml / 2, keep = g.keep;
  const int64_t n_centers = g.n_centers;
  const bool pattern = g.pattern;
  const uint32_t uH = static_cast<uint32_t>(H), uW = static_cast<uint32_t>(W);
  std::vector<uint64_t> buf(2 * (nw + 1));
  std::vector<int32_t> cand_buf;
  uint64_t* const bits = buf.data();
  uint64_t* const orig = bits + nw + 1;
  for (int64_t row = begin; row < end; ++row) {
    RowRng rng(seed, static_cast<uint64_t>(row));
    std::memset(bits, 0, (nw + 1) * sizeof(uint64_t));
    for (int64_t j = 0; j < n_centers; ++j) {
      const int64_t r = rng.below(uH), c = rng.below(uW);
      const int64_t t0 = std::max<int64_t>(0, r - off), t1 = std::min<int64_t>(H, r - off + ml);
      const int64_t f0 = std::max<int64_t>(0, c - off), f1 = std::min<int64_t>(W, c - off + ml);
      if (pattern) {  // rows t0..t1-1, columns f0..f1-1 as one pattern, shifted to bit t0 * W + f0
        const uint64_t p = g.rep[t1 - t0] * ((2ULL << (f1 - f0 - 1)) - 1);
        const int64_t s = t0 * W + f0;
        const int sh = static_cast<int>(s & 63);
        bits[s >> 6] |= p << sh;
        bits[(s >> 6) + 1] |= (p >> 1) >> (63 - sh);  // the high part (0 when sh = 0)
      } else {
        for (int64_t t = t0; t < t1; ++t) set_range(bits, t * W + f0, t * W + f1);
      }
    }
    if (keep >= 0) {
      int64_t n = 0;
      for (int64_t w = 0; w < nw; ++w) n += __builtin_popcountll(bits[w]);
      if (n > keep) {
        if (2 * (n - keep) <= n) {  // clear a random (n - keep)-subset of the block tokens
          flip_random(bits, g, true, n, n - keep, rng, cand_buf);
        } else {  // keep a random keep-subset: clear it from a copy, and keep what was cleared
          std::memcpy(orig, bits, nw * sizeof(uint64_t));
          flip_random(bits, g, true, n, keep, rng, cand_buf);
          for (int64_t w = 0; w < nw; ++w) bits[w] ^= orig[w];
        }
      } else if (n < keep) {
        const int64_t m = L - n;  // the free tokens
        if (2 * (keep - n) <= m) {  // set a random (keep - n)-subset of them
          flip_random(bits, g, false, m, keep - n, rng, cand_buf);
        } else {  // leave a random (L - keep)-subset free: mark it in a copy, and set all the others
          std::memcpy(orig, bits, nw * sizeof(uint64_t));
          flip_random(bits, g, false, m, L - keep, rng, cand_buf);
          for (int64_t w = 0; w < nw; ++w) bits[w] = ~(bits[w] ^ orig[w]);
          bits[nw - 1] &= g.last_mask;
        }
      }
    }
    uint8_t* const dst = out_base + row * L;
#if SSLAM_X86
    if constexpr (kSpreadIsa == Spread::kAvx512) {
      spread_avx512(dst, bits, L);
      continue;
    } else if constexpr (kSpreadIsa == Spread::kAvx2) {
      spread_avx2(dst, bits, L);
      continue;
    }
#endif
    spread_from(dst, bits, 0, L);
  }
}

using RowsFn = void (*)(uint8_t*, int64_t, int64_t, const Grid&, uint64_t);

#if SSLAM_X86
SSLAM_TARGET_AVX512 void fill_rows_avx512(uint8_t* out, int64_t begin, int64_t end, const Grid& g, uint64_t seed) {
  fill_rows<Spread::kAvx512>(out, begin, end, g, seed);
}
SSLAM_TARGET_AVX2 void fill_rows_avx2(uint8_t* out, int64_t begin, int64_t end, const Grid& g, uint64_t seed) {
  fill_rows<Spread::kAvx2>(out, begin, end, g, seed);
}
#endif
void fill_rows_baseline(uint8_t* out, int64_t begin, int64_t end, const Grid& g, uint64_t seed) {
  fill_rows<Spread::kTable>(out, begin, end, g, seed);
}

RowsFn rows_kernel() {
#if SSLAM_X86
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return &fill_rows_avx512;
    case Isa::kAvx2:
      return &fill_rows_avx2;
    case Isa::kBaseline:
      break;
  }
#endif
  return &fill_rows_baseline;
}

at::Tensor inverse_block_mask_cpu(int64_t rows, int64_t H, int64_t W, int64_t n_centers, int64_t mask_length,
                                  int64_t keep, int64_t seed) {
  constexpr const char* op = "inverse_block_mask";
  // Each factor in range before any product (csrc/checks.h): H * W of two int64 can wrap to a small or zero L that
  // passes a "< INT32_MAX" test, and the block fill then writes past the bitsets (or below(0) divides by 0).
  check_size(op, "rows", rows, 0);
  check_size(op, "H", H, 1);
  check_size(op, "W", W, 1);
  // L <= int32: tokens are listed as int32 and drawn with a 32-bit bound (RowRng::below).
  const int64_t L = checked_mul(op, "the grid H * W", H, W, kMaxSize);
  check_size(op, "n_centers", n_centers, 0, L);  // more centres than cells only repeats them: a runaway loop
  check_size(op, "mask_length", mask_length, 1);
  check_size(op, "keep", keep, -1, L);  // -1: no fix-up (the raw union, a diagnostic)
  checked_mul(op, "the output rows * (H * W)", rows, L);
  at::Tensor out = at::empty({rows, L}, at::TensorOptions().dtype(at::kBool));
  uint8_t* const out_base = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const Grid g = make_grid(H, W, n_centers, mask_length, keep);
  const RowsFn kernel = rows_kernel();
  const uint64_t useed = static_cast<uint64_t>(seed);
  at::parallel_for(0, rows, kGrainRows,
                   [=, &g](int64_t begin, int64_t end) { kernel(out_base, begin, end, g, useed); });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslam_fast_C, m) {
  m.def(
      "inverse_block_mask(int rows, int H, int W, int n_centers, int mask_length, int keep, int seed) -> Tensor");
}

// The op has no tensor arguments, so the dispatcher cannot derive a backend key from them: a CPU-key kernel would
// never be reached ("no tensor arguments ... no fallback function"). CompositeExplicitAutograd is the kernel the
// dispatcher uses for an empty key set; the op always produces a CPU tensor.
TORCH_LIBRARY_IMPL(sslam_fast_C, CompositeExplicitAutograd, m) {
  m.impl("inverse_block_mask", &inverse_block_mask_cpu);
}

}  // namespace sslam_fast
