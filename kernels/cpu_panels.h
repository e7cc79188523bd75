// Shared by qserve's native CPU kernels: the bf16 16-column panel layout ("VNNI-16", see cpu_gemm.cpp) and
// its register-blocked micro-kernel, which the int4 kernel (cpu_gemm_w4.cpp) reuses on dequantized panels.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace qserve_cpu_panels {

using bf16 = uint16_t;
constexpr int64_t kPanel = 16;  // output columns per panel
constexpr int MB = 4;           // rows of x per register block
constexpr int NB = 4;           // panels per register block

// (16,) bf16 bias -> fp32 lanes (bf16 is the top half of an fp32)
inline __m512 load_bias(const bf16* b, __mmask16 mask) {
  __m256i raw = _mm256_maskz_loadu_epi16(mask, b);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// y[0:mb, 0:nb*16] = x[0:mb] @ panels[0:nb]^T (+ bias); the last panel is masked to `tail` columns.
template <int mb, int nb>
void block(const bf16* x, int64_t ldx, const bf16* p, int64_t K, const bf16* bias, bf16* y, int64_t ldy,
           __mmask16 tail) {
  __m512 acc[mb][nb];
  for (int m = 0; m < mb; ++m)
    for (int n = 0; n < nb; ++n) acc[m][n] = _mm512_setzero_ps();
  const int64_t pstride = K * kPanel;  // elements from one panel to the next
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh w[nb];
    for (int n = 0; n < nb; ++n) w[n] = (__m512bh)_mm512_loadu_si512(p + n * pstride + k * kPanel);
    for (int m = 0; m < mb; ++m) {
      int32_t pair;  // x[m, k], x[m, k + 1] as one 32-bit lane, broadcast to all 16
      __builtin_memcpy(&pair, x + m * ldx + k, sizeof(pair));
      __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int n = 0; n < nb; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv, w[n]);
    }
  }
  for (int n = 0; n < nb; ++n) {
    __mmask16 mask = n == nb - 1 ? tail : (__mmask16)0xFFFF;
    __m512 b = bias ? load_bias(bias + n * kPanel, mask) : _mm512_setzero_ps();
    for (int m = 0; m < mb; ++m) {
      __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][n], b));
      _mm256_mask_storeu_epi16(y + m * ldy + n * kPanel, mask, (__m256i)out);
    }
  }
}

using BlockFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, const bf16*, bf16*, int64_t, __mmask16);

template <int mb>
constexpr BlockFn pick_nb(int nb) {
  return nb == 4 ? block<mb, 4> : nb == 3 ? block<mb, 3> : nb == 2 ? block<mb, 2> : block<mb, 1>;
}

inline BlockFn pick(int mb, int nb) {
  switch (mb) {
    case 4: return pick_nb<4>(nb);
    case 3: return pick_nb<3>(nb);
    case 2: return pick_nb<2>(nb);
    default: return pick_nb<1>(nb);
  }
}

// ---- quantized panels (cpu_gemm_w4.cpp, cpu_gemm_w8.cpp): a byte b of codes becomes the bf16 numbers
// 128 + (b & 0xF) and 128 + (b >> 4) by OR-ing each nibble into 0x4300, the bf16 of 128 (its 7 mantissa bits
// hold any nibble exactly), so `vdpbf16ps` sums x * (128 + nibble) exactly in fp32 and the 128 is taken
// back out with the row's sum of x.

inline __m512i widen(const uint8_t* c) {  // 32 bytes -> 32 16-bit lanes
  return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
}
// (lanes & 0xF) | 0x4300 and (lanes >> 4) | 0x4300: the bf16 numbers 128 + q of both nibbles
inline __m512bh low_codes(__m512i raw, __m512i magic) {
  return (__m512bh)_mm512_ternarylogic_epi32(raw, _mm512_set1_epi16(0x000F), magic, 0xEA);  // (A & B) | C
}
inline __m512bh high_codes(__m512i raw, __m512i magic) {
  return (__m512bh)_mm512_or_si512(_mm512_srli_epi16(raw, 4), magic);
}
inline __m512bh bcast_pair(const bf16* x) {
  int32_t pair;
  __builtin_memcpy(&pair, x, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

// (M, K / G) fp32 sums of each row of x (M, K) bf16 over each group of G columns
inline std::vector<float> group_sums(const bf16* x, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  std::vector<float> out(M * groups);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      __m512 s = _mm512_setzero_ps();
      const bf16* xr = x + r * K + g * G;
      for (int64_t k = 0; k < G; k += 16) {
        __mmask16 mask = (__mmask16)(G - k >= 16 ? 0xFFFF : (1u << (G - k)) - 1u);
        __m256i raw = _mm256_maskz_loadu_epi16(mask, xr + k);
        s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
      }
      out[r * groups + g] = _mm512_reduce_add_ps(s);
    }
  return out;
}

}  // namespace qserve_cpu_panels
