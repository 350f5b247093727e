// Bit-exact replica of Triton's `tl.rand(seed, offset)` (triton/language/random.py, Triton 3.x) for a
// 32-bit offset, usable from host C++ and CUDA device code.
//
//   key     = (seed & 0xffffffff, seed >> 32)          (seed: the int64 read from the seeds tensor)
//   counter = (offset, 0, 0, 0)                         (offset: int32, bit-cast to uint32)
//   10 Philox4x32 rounds, result = first word c0
//   uniform = float(x) * 4.6566127342e-10f  with  x = int32(c0) < 0 ? ~int32(c0) : int32(c0)
//
// The dropout kernels keep an element iff `uniform > p` (p rounded to fp32, as Triton passes it), so the
// extension and the Triton kernels draw the same keep-masks for the same (seed, offset).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SEQPE_HD __host__ __device__ __forceinline__
#else
#define SEQPE_HD inline __attribute__((always_inline))
#endif

namespace seqpe {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton's uint_to_uniform_float scale for 32-bit

SEQPE_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// first output word of Philox4x32-10 with counter (c0, 0, 0, 0) and key (k0, k1)
SEQPE_HD uint32_t philox_c0(uint32_t c0, uint32_t k0, uint32_t k1) {
  uint32_t c1 = 0, c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t _c0 = c0, _c2 = c2;
    c0 = umulhi32(kPhiloxRoundB, _c2) ^ c1 ^ k0;
    c2 = umulhi32(kPhiloxRoundA, _c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * _c2;
    c3 = kPhiloxRoundA * _c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

SEQPE_HD float uint_to_uniform(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// tl.rand(seed, offset) for an int32 offset (passed here already wrapped to uint32)
SEQPE_HD float triton_rand(uint64_t seed, uint32_t offset) {
  return uint_to_uniform(philox_c0(offset, static_cast<uint32_t>(seed & 0xffffffffull),
                                   static_cast<uint32_t>(seed >> 32)));
}

SEQPE_HD bool dropout_keep(uint64_t seed, uint32_t offset, float p) {
  return triton_rand(seed, offset) > p;
}

}  // namespace seqpe
