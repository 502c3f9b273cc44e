// Shared by the C++ CPU kernels: the target-attribute macros for the per-ISA copies of a loop, and cpu_isa(), the
// widest instruction set this CPU supports, optionally capped by the environment variable SSLAM_FAST_CPU_ISA
// ("avx512", "avx2" or "baseline"; read once per process) to test the narrower paths or to avoid AVX-512.
//
// The build has no -march flag: each kernel compiles its hot loops once per ISA through target attributes and
// picks one at run time with cpu_isa().

#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if !defined(__GNUC__)
#error "the sslam_fast C++ kernels need GCC or Clang (target attributes, GNU vector extensions)"
#endif

#if defined(__x86_64__) || defined(__i386__)
#define SSLAM_X86 1
#define SSLAM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")))
#define SSLAM_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2")))
#else
#define SSLAM_X86 0
#endif

#define SSLAM_INLINE inline __attribute__((always_inline))

namespace sslam_fast {

enum class Isa { kAvx512, kAvx2, kBaseline };

inline Isa cpu_isa() {
  static const Isa isa = [] {
    const char* cap_env = std::getenv("SSLAM_FAST_CPU_ISA");
    const std::string cap = cap_env == nullptr ? "" : cap_env;
    TORCH_CHECK(cap.empty() || cap == "avx512" || cap == "avx2" || cap == "baseline",
                "SSLAM_FAST_CPU_ISA must be avx512, avx2 or baseline, got '", cap, "'");
#if SSLAM_X86
    __builtin_cpu_init();
    const bool avx2 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (avx512 && (cap.empty() || cap == "avx512")) return Isa::kAvx512;
    if (avx2 && cap != "baseline") return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return isa;
}

}  // namespace sslam_fast
