// int4 weight-only linear (W4A16) for CPUs with AVX512-BF16: y = x dequant(W)^T (+ b), bf16 in and out.
//
// Why: torch's `_weight_int4pack_mm_for_cpu` is slower per call than qserve's bf16 kernel (cpu_gemm.cpp) at
// decode batch sizes and 2-2.5x slower than bf16 from M = 32 up, so int4 weights saved memory but cost speed.
// This kernel keeps int4 at rest in one layout and has two paths, chosen by M:
//
// * M <= kSmallM (decode): dot products straight on the codes. A code q in [0, 15] becomes the bf16 number
//   128 + q by OR-ing its nibble into 0x4300 (bf16 of 128 has a zero mantissa, and 128 + q needs no more than
//   its 7 bits), so `vdpbf16ps` sums x * (128 + q) exactly in fp32, four codes per byte pair, with two integer
//   ops per 32 weights. Per quantization group g and column n:
//       sum_k x_k * (q_kn - z_gn) * s_gn = s_gn * sum_k x_k * (128 + q_kn) - s_gn * (z_gn + 128) * sum_k x_k
//   so each group's partial sum is scaled once and corrected with the row's sum of x over the group.
//   Weight bytes stream at a quarter of bf16's.
// * M > kSmallM (prefill, large batches): each task dequantizes its 64 output columns once into a bf16 panel
//   scratch (w = fma(128 + q, s, -s (z + 128)), rounded once to bf16, as `QuantizedWeight.dequantize` does)
//   and runs the bf16 micro-kernel over up to 64 rows, so the dequantization is amortized over the rows.
//
// kSmallM is a token bucket of the compiled step (1, 2, 4, 8, 16, ...), so eager (M = the real rows) and
// compiled (M = the padded bucket) always take the same path for the same batch; each row's result is
// independent of M within a path.
//
// Layout: codes (P, K/4, 16, 2) uint8 with P = ceil(N/16): byte [p, t, j, e] holds the codes of column
// 16p + j at k = 4t + e (low nibble) and k = 4t + 2 + e (high nibble), so one 32-byte load widened to 16-bit
// lanes gives the k-pair (4t, 4t+1) of 16 columns in its low nibbles and (4t+2, 4t+3) in its high nibbles,
// lanes 2j + e, the bf16 panel order. Scales (P, K/G, 16) fp32 and zero points (P, K/G, 16) uint8 per group and
// column: 5 bytes per group of G weights (torch's int4 layout: 4, the checkpoint: 3). Padding columns have
// code 0, scale 0 and zero 0. K and the group size must be multiples of 4.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_panels.h"

namespace {

using namespace qserve_cpu_panels;

// One group's 16 scales s and corrections -s (z + 128) of a panel (the kernel reads codes as 128 + q).
struct GroupScale {
  __m512 scale, corr;
};
inline GroupScale group_scale(const float* s, const uint8_t* z) {
  __m512 scale = _mm512_loadu_ps(s);
  __m512 zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z))));
  return {scale, _mm512_mul_ps(scale, _mm512_sub_ps(_mm512_set1_ps(-128.0f), zf))};
}

// y[0:mb, 0:nb*16] from the codes of nb panels; asum (mb, K/G): each row's sum of x over each group.
template <int mb, int nb>
void block_codes(const bf16* x, int64_t ldx, const uint8_t* c, const float* sp, const uint8_t* zp,
                 const float* asum, int64_t K, int64_t G, const bf16* bias, bf16* y, int64_t ldy, __mmask16 tail) {
  const int64_t groups = K / G, cstride = K * 8, sstride = groups * kPanel;  // bytes / scales per panel
  const __m512i magic = _mm512_set1_epi16(0x4300);
  // The high nibbles get their own accumulators: twice the dependency chains of `vdpbf16ps` to hide its
  // latency at one row. Every block shape sums a row in this same order, so a row's result never depends
  // on how many rows the call has (eager and compiled steps pad batches differently).
  __m512 acc[mb][nb];
  for (int m = 0; m < mb; ++m)
    for (int n = 0; n < nb; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[2][mb][nb];  // [low nibbles, high nibbles]
    for (int i = 0; i < 2; ++i)
      for (int m = 0; m < mb; ++m)
        for (int n = 0; n < nb; ++n) part[i][m][n] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
      __m512bh lo[nb], hi[nb];
      for (int n = 0; n < nb; ++n) {
        __m512i raw = widen(c + n * cstride + k * 8);
        lo[n] = low_codes(raw, magic), hi[n] = high_codes(raw, magic);
      }
      for (int m = 0; m < mb; ++m) {
        __m512bh xa = bcast_pair(x + m * ldx + k), xb = bcast_pair(x + m * ldx + k + 2);
        for (int n = 0; n < nb; ++n) {
          part[0][m][n] = _mm512_dpbf16_ps(part[0][m][n], xa, lo[n]);
          part[1][m][n] = _mm512_dpbf16_ps(part[1][m][n], xb, hi[n]);
        }
      }
    }
    for (int n = 0; n < nb; ++n) {
      const GroupScale gs = group_scale(sp + n * sstride + g * kPanel, zp + n * sstride + g * kPanel);
      for (int m = 0; m < mb; ++m) {
        __m512 p = _mm512_add_ps(part[0][m][n], part[1][m][n]);
        acc[m][n] = _mm512_fmadd_ps(p, gs.scale, acc[m][n]);
        acc[m][n] = _mm512_fmadd_ps(gs.corr, _mm512_set1_ps(asum[m * groups + g]), acc[m][n]);
      }
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

using CodesFn = void (*)(const bf16*, int64_t, const uint8_t*, const float*, const uint8_t*, const float*,
                         int64_t, int64_t, const bf16*, bf16*, int64_t, __mmask16);

// Register blocks on codes (2 mb nb partial sums + mb nb totals + 2 nb code registers <= 28 of 32): the shapes
// `for_each_code_block` asks for, so the nibble unpacking is shared by up to 4 rows.
CodesFn pick_codes(int mb, int nb) {
  switch (mb) {
    case 4: return nb == 2 ? block_codes<4, 2> : block_codes<4, 1>;
    case 3: return nb == 2 ? block_codes<3, 2> : block_codes<3, 1>;
    case 2: return nb == 2 ? block_codes<2, 2> : block_codes<2, 1>;
    default:
      return nb == 4 ? block_codes<1, 4> : nb == 3 ? block_codes<1, 3> : nb == 2 ? block_codes<1, 2>
                                                                               : block_codes<1, 1>;
  }
}

// nb panels of codes -> bf16 panels (nb, K/2, 16, 2) in `out` (the bf16 kernel's layout).
void dequant_panels(const uint8_t* c, const float* sp, const uint8_t* zp, int64_t K, int64_t G, int nb,
                    bf16* out) {
  const int64_t groups = K / G, cstride = K * 8, sstride = groups * kPanel;
  const __m512i magic = _mm512_set1_epi16(0x4300);
  // lane i of an fp32 half holds column i / 2 (+ 8 in the upper half): the panel's (j, e) interleave
  const __m512i dup_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i dup_hi = _mm512_add_epi32(dup_lo, _mm512_set1_epi32(8));
  for (int n = 0; n < nb; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const GroupScale gs = group_scale(sp + n * sstride + g * kPanel, zp + n * sstride + g * kPanel);
      const __m512 scale = gs.scale, corr = gs.corr;
      __m512 s_lo = _mm512_permutexvar_ps(dup_lo, scale), s_hi = _mm512_permutexvar_ps(dup_hi, scale);
      __m512 c_lo = _mm512_permutexvar_ps(dup_lo, corr), c_hi = _mm512_permutexvar_ps(dup_hi, corr);
      for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
        __m512i raw = widen(c + n * cstride + k * 8);
        __m512i pairs[2] = {(__m512i)low_codes(raw, magic), (__m512i)high_codes(raw, magic)};  // k, k + 2
        for (int h = 0; h < 2; ++h) {
          // bf16 (128 + q) -> fp32: the 16 bits become an fp32's top half
          __m512 f_lo = _mm512_castsi512_ps(
              _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(pairs[h])), 16));
          __m512 f_hi = _mm512_castsi512_ps(
              _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(pairs[h], 1)), 16));
          __m512bh w = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(f_hi, s_hi, c_hi), _mm512_fmadd_ps(f_lo, s_lo, c_lo));
          _mm512_storeu_si512(out + n * K * kPanel + (k + 2 * h) * kPanel, (__m512i)w);
        }
      }
    }
  }
}

void check_layout(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t K, int64_t G,
                  const char* op) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.size(2) == kPanel &&
                  codes.size(3) == 2 && codes.is_contiguous(),
              op, ": codes are not in the packed int4 layout (P, K/4, 16, 2) uint8");
  TORCH_CHECK(G > 0 && G % 4 == 0 && K % G == 0, op, ": group size ", G, " must be a multiple of 4 dividing ", K);
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == codes.size(0) && t->size(1) == K / G && t->size(2) == kPanel &&
                    t->is_contiguous(),
                op, ": scales and zeros must be (P, K/G, 16) matching the codes");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kByte, op,
              ": scales must be fp32 and zeros uint8");
}

at::Tensor linear_w4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                     const c10::optional<at::Tensor>& bias, int64_t out_features, int64_t group_size) {
  const int64_t K = codes.size(1) * 4, G = group_size, groups = K / std::max<int64_t>(G, 1);
  check_layout(codes, scales, zeros, K, G, "linear_w4");
  const PanelCall c = panel_call(x, K, codes.size(0), bias, out_features, "linear_w4");
  if (c.M == 0) return c.y;
  const bool small = c.M <= kSmallM;
  std::vector<float> asum;  // (M, K/G): fp32 sums of the bf16 x over each group, for the code path
  if (small) asum = group_sums(c.x, c.M, K, G);
  for_each_tile(c, [&](const Tile& t, std::vector<bf16>& scratch) {
    const uint8_t* cp = codes.data_ptr<uint8_t>() + t.p0 * K * 8;  // bytes of panel p0 on
    const float* sp = scales.data_ptr<float>() + t.p0 * groups * kPanel;
    const uint8_t* zp = zeros.data_ptr<uint8_t>() + t.p0 * groups * kPanel;
    if (!small) {
      scratch.resize(t.nb * K * kPanel);
      dequant_panels(cp, sp, zp, K, G, (int)t.nb, scratch.data());
      return bf16_tile(c, t, scratch.data());
    }
    for_each_code_block(t, [&](int64_t r, int mb, int64_t q, int nq, __mmask16 tail) {
      const int64_t sq = q * groups * kPanel, col = t.col0 + q * kPanel;
      pick_codes(mb, nq)(c.x + r * K, K, cp + q * K * 8, sp + sq, zp + sq, asum.data() + r * groups, K, G,
                         c.bias ? c.bias + col : nullptr, c.out + r * c.N + col, c.N, tail);
    });
  });
  return c.y;
}

// The large-M path's dequantized bf16 panels of the whole weight (for tests: what that path multiplies by).
at::Tensor dequant_w4(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                      int64_t group_size) {
  TORCH_CHECK(codes.dim() == 4, "dequant_w4: codes are not in the packed int4 layout (P, K/4, 16, 2) uint8");
  const int64_t K = codes.size(1) * 4, panels = codes.size(0), groups = K / std::max<int64_t>(group_size, 1);
  check_layout(codes, scales, zeros, K, group_size, "dequant_w4");
  at::Tensor out = at::empty({panels, K / 2, kPanel, 2}, codes.options().dtype(at::kBFloat16));
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      dequant_panels(codes.data_ptr<uint8_t>() + p * K * 8, scales.data_ptr<float>() + p * groups * kPanel,
                     zeros.data_ptr<uint8_t>() + p * groups * kPanel, K, group_size, 1,
                     reinterpret_cast<bf16*>(out.data_ptr()) + p * K * kPanel);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qserve_cpu, m) {
  m.def(
      "linear_w4(Tensor x, Tensor codes, Tensor scales, Tensor zeros, Tensor? bias, int out_features, "
      "int group_size) -> Tensor");
  m.def("dequant_w4(Tensor codes, Tensor scales, Tensor zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) {
  m.impl("linear_w4", linear_w4);
  m.impl("dequant_w4", dequant_w4);
}
