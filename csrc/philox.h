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

#if !defined(__CUDACC__) && defined(__AVX2__)
#include <immintrin.h>
#endif

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

#if !defined(__CUDACC__)
// keep[i] = dropout_keep(seed, off0 + i, p) ? ~0u : 0u for i < n (offsets wrap as uint32), bit for bit. With
// AVX2, 8 offsets per Philox evaluation (the scalar one above costs ~75 instructions per element, most of the
// CPU dropout kernels' time); the tail and other CPUs take the scalar path.
#if defined(__AVX2__)
inline __m256i mulhi8(__m256i a, __m256i b) {  // per 32-bit lane: the high word of the 64-bit product
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, b), 32);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  return _mm256_blend_epi32(even, odd, 0xAA);
}

inline __m256i dropout_keep8(uint64_t seed, uint32_t off0, float p) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(off0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_setzero_si256(), c2 = c1, c3 = c1;
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i ra = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i rb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int r = 0; r < 10; ++r) {
    const __m256i hb = mulhi8(rb, c2), ha = mulhi8(ra, c0);
    const __m256i lb = _mm256_mullo_epi32(rb, c2), la = _mm256_mullo_epi32(ra, c0);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lb;
    c3 = la;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m256i x = _mm256_xor_si256(c0, _mm256_srai_epi32(c0, 31));  // x < 0 ? ~x : x
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
  return _mm256_castps_si256(_mm256_cmp_ps(u, _mm256_set1_ps(p), _CMP_GT_OQ));
}
#endif

inline void dropout_keep_block(uint64_t seed, uint32_t off0, float p, int64_t n, uint32_t* keep) {
  int64_t i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + i),
                        dropout_keep8(seed, off0 + static_cast<uint32_t>(i), p));
#endif
  for (; i < n; ++i) keep[i] = dropout_keep(seed, off0 + static_cast<uint32_t>(i), p) ? ~0u : 0u;
}
#endif

}  // namespace seqpe
