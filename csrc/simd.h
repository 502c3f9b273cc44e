// SIMD helpers shared by the C++ CPU kernels: GNU vector types of L float lanes (L = 16 for AVX-512, 8 for AVX2, 4
// for the baseline), loads with conversion from float16 / bfloat16, stores, splats, lane selects, a horizontal sum
// and an in-register L x L transpose.
//
// Every helper is SSLAM_INLINE (always inlined): it is compiled with the instruction set of the kernel that calls it
// (the per-ISA copies of cpu_isa.h's target attributes), so one definition serves the AVX-512, AVX2 and baseline
// builds of a loop. The helpers only move, convert and add lanes; the order of every addition is fixed here, so a
// kernel's results do not depend on which file defines its helpers.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu_isa.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace sslam_fast {

// Vec<L>::F: L float lanes; Vec<L>::I: L int32 lanes (the masks that vector comparisons of F produce).
template <int L>
struct Vec;
template <>
struct Vec<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};
template <>
struct Vec<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct Vec<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};
template <int L>
using VecF = typename Vec<L>::F;
template <int L>
using VecI = typename Vec<L>::I;

// --- scalar conversions ----------------------------------------------------------------------------------------------

SSLAM_INLINE float to_float(float v) { return v; }
SSLAM_INLINE float to_float(c10::Half v) { return static_cast<float>(v); }
SSLAM_INLINE float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
SSLAM_INLINE T from_float(float v) {
  return static_cast<T>(v);
}

// --- loads, stores, constants ----------------------------------------------------------------------------------------

// L consecutive values at p (unaligned), converted to float lanes.
template <int L, typename T>
SSLAM_INLINE VecF<L> vload(const T* p) {
  VecF<L> v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int i = 0; i < L; ++i) v[i] = to_float(p[i]);
  }
  return v;
}

// The L lanes of v to p (unaligned).
template <int L>
SSLAM_INLINE void vstore(float* p, VecF<L> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int L>
SSLAM_INLINE VecF<L> vsplat(float x) {
  return VecF<L>{} + x;
}

// mask ? a : b, with mask lanes all-ones or zero (as vector comparisons produce).
template <int L>
SSLAM_INLINE VecF<L> vselect(VecI<L> mask, VecF<L> a, VecF<L> b) {
  using I = VecI<L>;
  using F = VecF<L>;
  return (F)((mask & (I)a) | (~mask & (I)b));
}

// --- reductions and shuffles -----------------------------------------------------------------------------------------

// The sum of the L lanes as a tree of halves: for L = 8, ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)).
template <int L>
SSLAM_INLINE float hsum(VecF<L> v) {
  if constexpr (L == 16) {
    return hsum<8>(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  } else if constexpr (L == 8) {
    return hsum<4>(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
  } else {
    static_assert(L == 4);
    const VecF<4> h = v + __builtin_shufflevector(v, v, 2, 3, 0, 1);
    return h[0] + h[1];
  }
}

// One stage of the in-register L x L transpose: swaps the off-diagonal H x H blocks.
template <int L, int H, int... Is>
SSLAM_INLINE void transpose_stage(VecF<L>* r, std::integer_sequence<int, Is...>) {
  for (int i = 0; i < L; ++i) {
    if (i & H) continue;
    const auto a = r[i];
    const auto b = r[i | H];
    r[i] = __builtin_shufflevector(a, b, ((Is & H) == 0 ? Is : L + Is - H)...);
    r[i | H] = __builtin_shufflevector(a, b, ((Is & H) == 0 ? Is + H : L + Is)...);
  }
}

// Transpose the L x L tile held in r[0..L) (row i = r[i]) in place.
template <int L>
SSLAM_INLINE void transpose(VecF<L>* r) {
  using S = std::make_integer_sequence<int, L>;
  if constexpr (L >= 16) transpose_stage<L, 8>(r, S{});
  if constexpr (L >= 8) transpose_stage<L, 4>(r, S{});
  transpose_stage<L, 2>(r, S{});
  transpose_stage<L, 1>(r, S{});
}

}  // namespace sslam_fast
