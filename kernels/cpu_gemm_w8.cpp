// int8 weight-only linear (W8A16, one scale per output column) for CPUs with AVX512-BF16:
// y = x (s * Q)^T (+ b), bf16 in and out.
//
// Why: torch's `_weight_int8pack_mm` runs 1.5-3.5x slower than qserve's bf16 kernel at batch 1 on the demo
// model's shapes, so int8 weights halved the bytes and lost speed. This kernel mirrors cpu_gemm_w4.cpp:
//
// * M <= kSmallM: dot products on the codes. A weight is stored as u = q + 128 in [0, 255] and split into its
//   nibbles u = 16 h + l; each nibble becomes the bf16 number 128 + nibble (cpu_panels.h), so per column
//       sum_k x_k q_k = 16 sum_k x_k (128 + h_k) + sum_k x_k (128 + l_k) - 2304 sum_k x_k
//   with two `vdpbf16ps` per 32 weights on one 32-byte load (bf16: one per 64-byte load) and one correction
//   per column at the end.
// * M > kSmallM: each task dequantizes its 64 columns once into a bf16 tile (s * q rounded once, as
//   `QuantizedWeight.dequantize(bf16)` does) and runs the bf16 micro-kernel over up to 64 rows.
// A row's result never depends on how many rows the call has, within a path; kSmallM is a token bucket.
//
// Layout: codes (P, K/2, 16, 2) uint8, P = ceil(N/16): byte [p, t, j, e] = q[16p + j, 2t + e] + 128, the bf16
// panel order; scales (P, 16) fp32. Padding columns have code 128 (q = 0) and scale 0. K must be even.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_panels.h"

namespace {

using namespace qserve_cpu_panels;

// y[0:mb, 0:nb*16] from the codes of nb panels; asum (mb,): each row's sum of x.
template <int mb, int nb>
void block_codes8(const bf16* x, int64_t ldx, const uint8_t* c, const float* sp, const float* asum, int64_t K,
                  const bf16* bias, bf16* y, int64_t ldy, __mmask16 tail) {
  const int64_t cstride = K * kPanel;  // bytes per panel
  const __m512i magic = _mm512_set1_epi16(0x4300);
  __m512 part[2][mb][nb];  // [high nibbles, low nibbles]
  for (int i = 0; i < 2; ++i)
    for (int m = 0; m < mb; ++m)
      for (int n = 0; n < nb; ++n) part[i][m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh hi[nb], lo[nb];
    for (int n = 0; n < nb; ++n) {
      __m512i raw = widen(c + n * cstride + k * kPanel);
      hi[n] = high_codes(raw, magic), lo[n] = low_codes(raw, magic);
    }
    for (int m = 0; m < mb; ++m) {
      __m512bh xv = bcast_pair(x + m * ldx + k);
      for (int n = 0; n < nb; ++n) {
        part[0][m][n] = _mm512_dpbf16_ps(part[0][m][n], xv, hi[n]);
        part[1][m][n] = _mm512_dpbf16_ps(part[1][m][n], xv, lo[n]);
      }
    }
  }
  const __m512 sixteen = _mm512_set1_ps(16.0f);
  for (int n = 0; n < nb; ++n) {
    __mmask16 mask = n == nb - 1 ? tail : (__mmask16)0xFFFF;
    __m512 scale = _mm512_loadu_ps(sp + n * kPanel);
    __m512 b = bias ? load_bias(bias + n * kPanel, mask) : _mm512_setzero_ps();
    for (int m = 0; m < mb; ++m) {
      __m512 dot = _mm512_fmadd_ps(part[0][m][n], sixteen, part[1][m][n]);
      dot = _mm512_sub_ps(dot, _mm512_set1_ps(2304.0f * asum[m]));  // 16 * 128 + 128 + 128
      __m256bh out = _mm512_cvtneps_pbh(_mm512_fmadd_ps(dot, scale, b));
      _mm256_mask_storeu_epi16(y + m * ldy + n * kPanel, mask, (__m256i)out);
    }
  }
}

using Codes8Fn = void (*)(const bf16*, int64_t, const uint8_t*, const float*, const float*, int64_t, const bf16*,
                          bf16*, int64_t, __mmask16);

// Register blocks (2 mb nb partial sums + 2 nb code registers <= 24): the shapes `for_each_code_block` asks for.
Codes8Fn pick_codes8(int mb, int nb) {
  switch (mb) {
    case 4: return nb == 2 ? block_codes8<4, 2> : block_codes8<4, 1>;
    case 3: return nb == 2 ? block_codes8<3, 2> : block_codes8<3, 1>;
    case 2: return nb == 2 ? block_codes8<2, 2> : block_codes8<2, 1>;
    default:
      return nb == 4 ? block_codes8<1, 4> : nb == 3 ? block_codes8<1, 3> : nb == 2 ? block_codes8<1, 2>
                                                                                 : block_codes8<1, 1>;
  }
}

// nb panels of codes -> bf16 panels (nb, K/2, 16, 2) in `out`: w = s * u - 128 s, rounded once.
void dequant_panels8(const uint8_t* c, const float* sp, int64_t K, int nb, bf16* out) {
  const __m512i dup_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);  // lane i: column i/2
  const __m512i dup_hi = _mm512_add_epi32(dup_lo, _mm512_set1_epi32(8));
  for (int n = 0; n < nb; ++n) {
    const __m512 scale = _mm512_loadu_ps(sp + n * kPanel);
    const __m512 corr = _mm512_mul_ps(scale, _mm512_set1_ps(-128.0f));
    const __m512 s_lo = _mm512_permutexvar_ps(dup_lo, scale), s_hi = _mm512_permutexvar_ps(dup_hi, scale);
    const __m512 c_lo = _mm512_permutexvar_ps(dup_lo, corr), c_hi = _mm512_permutexvar_ps(dup_hi, corr);
    for (int64_t k = 0; k < K; k += 2) {
      const uint8_t* src = c + n * K * kPanel + k * kPanel;  // 32 bytes: the k-pair of 16 columns
      __m512 f_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
      __m512 f_hi =
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
      __m512bh w = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(f_hi, s_hi, c_hi), _mm512_fmadd_ps(f_lo, s_lo, c_lo));
      _mm512_storeu_si512(out + n * K * kPanel + k * kPanel, (__m512i)w);
    }
  }
}

void check_layout8(const at::Tensor& codes, const at::Tensor& scales, const char* op) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.size(2) == kPanel &&
                  codes.size(3) == 2 && codes.is_contiguous(),
              op, ": codes are not in the packed int8 layout (P, K/2, 16, 2) uint8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == codes.size(0) &&
                  scales.size(1) == kPanel && scales.is_contiguous(),
              op, ": scales must be fp32 (P, 16) matching the codes");
}

at::Tensor linear_w8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, int64_t out_features) {
  check_layout8(codes, scales, "linear_w8");
  const int64_t K = codes.size(1) * 2;
  const PanelCall c = panel_call(x, K, codes.size(0), bias, out_features, "linear_w8");
  if (c.M == 0) return c.y;
  const bool small = c.M <= kSmallM;
  std::vector<float> asum;  // (M,): each row's fp32 sum of x, for the code path
  if (small) asum = group_sums(c.x, c.M, K, K);
  for_each_tile(c, [&](const Tile& t, std::vector<bf16>& scratch) {
    const uint8_t* cp = codes.data_ptr<uint8_t>() + t.p0 * K * kPanel;  // bytes of panel p0 on
    const float* sp = scales.data_ptr<float>() + t.p0 * kPanel;
    if (!small) {
      scratch.resize(t.nb * K * kPanel);
      dequant_panels8(cp, sp, K, (int)t.nb, scratch.data());
      return bf16_tile(c, t, scratch.data());
    }
    for_each_code_block(t, [&](int64_t r, int mb, int64_t q, int nq, __mmask16 tail) {
      const int64_t col = t.col0 + q * kPanel;
      pick_codes8(mb, nq)(c.x + r * K, K, cp + q * K * kPanel, sp + q * kPanel, asum.data() + r, K,
                          c.bias ? c.bias + col : nullptr, c.out + r * c.N + col, c.N, tail);
    });
  });
  return c.y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qserve_cpu, m) {
  m.def("linear_w8(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) { m.impl("linear_w8", linear_w8); }
