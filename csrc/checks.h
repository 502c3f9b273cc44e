// Size-argument validation shared by the C++ and CUDA ops (host code only).
//
// Every int argument that sizes a buffer or a loop is checked in range before anything is allocated, and products of
// sizes are formed with overflow detection (c10::mul_overflows): a wrapped product would otherwise pass a "< limit"
// test and size a buffer smaller than the loops that then write into it. The limits are those of
// sslam_fast/_checks.py (MAX_SIZE, MAX_ELEMENTS): int32, the width the kernels index rows and grids with, and far
// beyond any real batch. Failures are TORCH_CHECKs (RuntimeError in Python) naming the op and the argument.

#pragma once

#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <limits>

namespace sslam_fast {

constexpr int64_t kMaxSize = std::numeric_limits<int32_t>::max();      // largest value of any size argument
constexpr int64_t kMaxElements = std::numeric_limits<int32_t>::max();  // largest output sized by int arguments

// lo <= value <= hi, or a RuntimeError naming `name`.
inline int64_t check_size(const char* op, const char* name, int64_t value, int64_t lo, int64_t hi = kMaxSize) {
  TORCH_CHECK(value >= lo && value <= hi, op, ": ", name, " must lie in [", lo, ", ", hi, "], got ", value);
  return value;
}

// a * b for non-negative a, b, or a RuntimeError naming `what` when the product overflows int64 or exceeds `limit`.
inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b, int64_t limit = kMaxElements) {
  TORCH_CHECK(a >= 0 && b >= 0, op, ": ", what, ": negative factor (", a, " x ", b, ")");
  int64_t product = 0;
  const bool overflow = c10::mul_overflows(a, b, &product);
  TORCH_CHECK(!overflow && product <= limit, op, ": ", what, " = ", a, " x ", b, " exceeds the limit of ", limit,
              overflow ? " (the product overflows int64)" : "");
  return product;
}

}  // namespace sslam_fast
