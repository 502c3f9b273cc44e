// Inverse block masks on CPU: torch.ops.sslam_fast.inverse_block_mask_cpu.
//
// The distribution of upstream compute_block_mask_2d with inverse_mask=True, require_same_masks=True (ALGORITHM §3), for
// all rows of a batch at once, parallel over rows. Per row:
//   1. n_centers centres drawn uniformly from the H*W tokens, with replacement (duplicates collapse);
//   2. each centre (r, c) kept-marks the block [r - o, r - o + mask_length) x [c - o, c - o + mask_length) cut to the
//      grid, o = mask_length / 2: the same set as upstream's clamped expansion (clamping folds the outside cells onto
//      cells that the cut block already contains);
//   3. the exact fix-up to `keep` kept tokens: a row with n > keep keeps a uniformly random keep-subset of its block
//      tokens, a row with n < keep adds a uniformly random (keep - n)-subset of the others. Upstream draws these with
//      torch.multinomial without replacement on the 0/1 row, which is a uniformly random subset of the given size;
//      here the same distribution comes from a partial Fisher-Yates shuffle of the listed candidates, or from
//      sequential rejection sampling over the grid when the candidates are the majority (see fill_rows).
// Output: (rows, H*W) bool, true = masked (not kept).
//
// RNG: a splitmix64 stream per row, started from mix(seed ^ mix(row + gamma)), so a row's tokens depend only on
// (seed, row): the result is deterministic for a seed and independent of the thread count and of the batch split.
// Uniform integers in [0, m) use Lemire's multiply-and-reject (exactly uniform). The reference draws centres with
// torch.randint, so the bits differ from the reference; the distribution is the same (tests/test_masks.py).
//
// keep = -1 skips step 3 and returns the raw union of blocks (a diagnostic used by the tests).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "checks.h"

namespace sslam_fast {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;  // splitmix64 increment (golden ratio)
// Rows per parallel chunk; fewer rows run inline on the calling thread. A row costs ~0.3 us, so one EAT batch
// (12 x 16 = 192 rows, ~60 us) stays on one thread: an OpenMP fork/join costs ~5-10 us on an idle machine, and when
// the other cores are busy (DataLoader workers, other jobs) waking a worker was measured at ~8 ms (median, 2 cores,
// loaded), 100x the work. Larger batches split into chunks of >= 256 rows (>= ~80 us each).
constexpr int64_t kGrainRows = 256;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

class RowRng {
 public:
  RowRng(uint64_t seed, uint64_t row) : state_(mix64(seed ^ mix64(row + kGamma))) {}

  uint32_t next32() {
    if (have_low_) {
      have_low_ = false;
      return low_;
    }
    state_ += kGamma;
    const uint64_t x = mix64(state_);
    low_ = static_cast<uint32_t>(x);
    have_low_ = true;
    return static_cast<uint32_t>(x >> 32);
  }

  // Uniform in [0, m), 1 <= m < 2^32, exactly (Lemire 2019, "Fast random integer generation in an interval").
  uint32_t below(uint32_t m) {
    uint64_t prod = static_cast<uint64_t>(next32()) * m;
    uint32_t low = static_cast<uint32_t>(prod);
    if (low < m) {
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

// List the tokens i with blk[i] == value (blk holds 0/1 bytes) in cand, ascending; returns how many. Eight bytes at
// a time: multiplying a word of 0/1 bytes by 0x0102040810204080 gathers byte k into bit 56 + k (no carries reach the
// top byte), and the set bits are walked with ctz. A byte-by-byte branch-free compaction was measured 3x slower: its
// stores, at addresses that depend on the previous compare, serialise the loop.
inline int64_t list_tokens(const uint8_t* blk, int32_t* cand, int64_t L, uint8_t value) {
  const uint64_t flip = value ? 0 : 0x0101010101010101ULL;
  int64_t m = 0, i = 0;
  for (; i + 8 <= L; i += 8) {
    uint64_t w;
    std::memcpy(&w, blk + i, 8);
    uint64_t bits = ((w ^ flip) * 0x0102040810204080ULL) >> 56;
    while (bits) {
      cand[m++] = static_cast<int32_t>(i + __builtin_ctzll(bits));
      bits &= bits - 1;
    }
  }
  for (; i < L; ++i) {
    cand[m] = static_cast<int32_t>(i);
    m += blk[i] == value;
  }
  return m;
}

// A uniformly random `picks`-subset of cand[0..m), moved to cand[0..picks): a partial Fisher-Yates shuffle.
inline void shuffle_prefix(int32_t* cand, int64_t m, int64_t picks, RowRng& rng) {
  for (int64_t j = 0; j < picks; ++j) {
    const int64_t s = j + rng.below(static_cast<uint32_t>(m - j));
    std::swap(cand[j], cand[s]);
  }
}

// Set `value` on a uniformly random `count`-subset of the m tokens in cand[0..m) (cand is permuted). Draws
// min(count, m - count) numbers: when count > m / 2 the complement is drawn and the rest is marked.
inline void mark_random_subset(uint8_t* blk, int32_t* cand, int64_t m, int64_t count, uint8_t value, RowRng& rng) {
  const bool complement = count > m - count;
  const int64_t picks = complement ? m - count : count;
  shuffle_prefix(cand, m, picks, rng);
  for (int64_t j = complement ? picks : 0; j < (complement ? m : picks); ++j) blk[cand[j]] = value;
}

// Rows [begin, end) of the output (L bytes a row, 1 = masked). Every value arrives as a scalar parameter, i.e. a
// local: stores through uint8_t pointers may alias anything (char aliasing), so values reached through a pointer
// (a lambda's captures, a struct by reference) would be reloaded after every store and the byte loops would not
// vectorize (measured: 2x slower).
//
// Per row: the blocks are memset row by row (duplicate and overlapping centres simply rewrite ones), n is a
// vectorized byte sum, then the fix-up:
//   * n > keep: clear a random (n - keep)-subset of the block tokens, listed by list_tokens (eight bytes a step);
//   * n < keep: set a random (keep - n)-subset of the other tokens. When they are the majority of the grid (the EAT
//     case: ~420 of 512), by sequential rejection sampling over the grid (each accepted draw is uniform over the
//     tokens not yet picked, so the picked set is a uniformly random subset; acceptance >= 1/2, ~15 draws); else
//     from a list of them.
// Rejection for n > keep would accept ~1 draw in 5 behind an unpredictable branch; listing the tokens cell by cell
// while writing the blocks (no count pass) measured slower than memset + count + list_tokens (its stores at
// addresses carried from cell to cell serialise ~125 cells a row).
void fill_rows(uint8_t* const out_base, int64_t begin, int64_t end, int64_t H, int64_t W, int64_t n_centers,
               int64_t mask_length, int64_t keep, uint64_t useed) {
  const int64_t L = H * W;
  const int64_t off = mask_length / 2;
  std::vector<uint8_t> blk_buf(L);
  std::vector<int32_t> cand_buf(L);
  uint8_t* const blk = blk_buf.data();
  int32_t* const cand = cand_buf.data();
  for (int64_t row = begin; row < end; ++row) {
    RowRng rng(useed, static_cast<uint64_t>(row));
    std::memset(blk, 0, L);
    for (int64_t j = 0; j < n_centers; ++j) {
      const int64_t c = rng.below(static_cast<uint32_t>(L));
      const int64_t r = c / W, f = c - r * W;
      const int64_t t0 = std::max<int64_t>(0, r - off), t1 = std::min<int64_t>(H, r - off + mask_length);
      const int64_t f0 = std::max<int64_t>(0, f - off), f1 = std::min<int64_t>(W, f - off + mask_length);
      for (int64_t t = t0; t < t1; ++t) std::memset(blk + t * W + f0, 1, f1 - f0);
    }
    if (keep >= 0) {
      uint32_t count = 0;  // 32-bit: the byte sum vectorizes with fewer widening steps than into int64
      for (int64_t i = 0; i < L; ++i) count += blk[i];
      const int64_t n = count;
      if (n > keep) {  // clear a random (n - keep)-subset of the block tokens
        list_tokens(blk, cand, L, 1);
        mark_random_subset(blk, cand, n, n - keep, 0, rng);
      } else if (n < keep && 2 * (L - n) >= L) {  // set keep - n of the others, the majority: rejection sampling
        for (int64_t done = 0; done < keep - n;) {
          const int64_t i = rng.below(static_cast<uint32_t>(L));
          done += 1 - blk[i];
          blk[i] = 1;
        }
      } else if (n < keep) {  // set keep - n of the others, a minority: list them
        const int64_t m = list_tokens(blk, cand, L, 0);
        mark_random_subset(blk, cand, m, keep - n, 1, rng);
      }
    }
    uint8_t* const dst = out_base + row * L;
    for (int64_t i = 0; i < L; ++i) dst[i] = static_cast<uint8_t>(1 - blk[i]);
  }
}

at::Tensor inverse_block_mask_cpu(int64_t rows, int64_t H, int64_t W, int64_t n_centers, int64_t mask_length,
                                  int64_t keep, int64_t seed) {
  constexpr const char* op = "inverse_block_mask_cpu";
  // Each factor in range before any product (csrc/checks.h): H * W of two int64 can wrap to a small or zero L that
  // passes a "< INT32_MAX" test, and the block fill then writes past the L-byte buffers (or below(0) divides by 0).
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
  at::parallel_for(0, rows, kGrainRows, [=](int64_t begin, int64_t end) {
    fill_rows(out_base, begin, end, H, W, n_centers, mask_length, keep, static_cast<uint64_t>(seed));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslam_fast, m) {
  m.def(
      "inverse_block_mask_cpu(int rows, int H, int W, int n_centers, int mask_length, int keep, int seed) -> Tensor");
}

// The op has no tensor arguments, so the dispatcher cannot derive a backend key from them: a CPU-key kernel would
// never be reached ("no tensor arguments ... no fallback function"). CompositeExplicitAutograd is the kernel the
// dispatcher uses for an empty key set; the op always produces a CPU tensor.
TORCH_LIBRARY_IMPL(sslam_fast, CompositeExplicitAutograd, m) {
  m.impl("inverse_block_mask_cpu", &inverse_block_mask_cpu);
}

}  // namespace sslam_fast
