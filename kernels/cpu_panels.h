// Shared by qserve's native CPU kernels: the bf16 16-column panel layout ("VNNI-16", see cpu_gemm.cpp), its
// register-blocked micro-kernel (which the int4 / int8 kernels reuse on dequantized panels), the checks and
// task split every panel linear has, and the helpers of the quantized code paths.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
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

// One call of a panel linear: x flattened to (M, K), the output (..., N) allocated, the bias checked.
struct PanelCall {
  at::Tensor xc, y;
  const bf16* x;
  const bf16* bias;  // nullptr: none
  bf16* out;
  int64_t M, N, K, panels;
};

// Checks x (..., K) bf16, out_features against `panels` panels and the bias; `op` prefixes every message.
inline PanelCall panel_call(const at::Tensor& x, int64_t K, int64_t panels, const c10::optional<at::Tensor>& bias,
                            int64_t out_features, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, op, ": x must be bf16");
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(out_features > (panels - 1) * kPanel && out_features <= panels * kPanel, op, ": out_features ",
              out_features, " does not match ", panels, " panels");
  const bf16* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == out_features && bias->is_contiguous(), op,
                ": bias must be a contiguous bf16 vector of out_features");
    b = reinterpret_cast<const bf16*>(bias->data_ptr());
  }
  at::Tensor xc = x.reshape({-1, K}).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor y = at::empty(out_shape, x.options());
  return {xc, y, reinterpret_cast<const bf16*>(xc.data_ptr()), b, reinterpret_cast<bf16*>(y.data_ptr()),
          xc.size(0), out_features, K, panels};
}

// One task: panels [p0, p0 + nb) (columns from col0, the last panel masked to `tail`) x rows [r0, r1).
struct Tile {
  int64_t p0, nb, col0, r0, r1;
  __mmask16 tail;
};

// A call of at most this many multiply-adds runs on one thread (at::parallel_for's grain). At batch 1 on 2 cores
// (bf16, us per call, 1 vs 2 threads): 384 x 256 (98K) 5.0 vs 7.6, 256 x 768 (197K) 7.0 vs 7.8, 1536 x 256
// (393K) 12.4 vs 8.5, 4096 x 256 (1M) 33 vs 20 (bench/cpu_linear_w4.py): a second thread pays from ~300K.
// `qserve_cpu::set_min_thread_work` changes it (benchmarks A/B it in one process; results do not depend on it).
inline int64_t& min_thread_work() {
  static int64_t work = int64_t{1} << 18;
  return work;
}

// fn(tile, scratch) for every (64-column group, chunk of up to 64 rows) of the call, in parallel: a task's
// panels stay in L1/L2 across its rows. `scratch` is one buffer per thread chunk (the quantized kernels'
// dequantized panels).
template <typename F>
inline void for_each_tile(const PanelCall& c, const F& fn) {
  const int64_t groups = (c.panels + NB - 1) / NB;
  const int64_t row_chunk = 64, chunks = (c.M + row_chunk - 1) / row_chunk;
  // below min_thread_work() multiply-adds the fork/join costs more than a second thread saves
  const int64_t per_task = std::min(c.M, row_chunk) * NB * kPanel * c.K;
  const int64_t grain = std::max<int64_t>(1, min_thread_work() / std::max<int64_t>(per_task, 1));
  at::parallel_for(0, groups * chunks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<bf16> scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t % groups, ch = t / groups;
      const int64_t p0 = g * NB, nb = std::min<int64_t>(NB, c.panels - p0);
      const int64_t col0 = p0 * kPanel, cols = std::min<int64_t>(nb * kPanel, c.N - col0);
      const __mmask16 tail = (__mmask16)((1u << (cols - (nb - 1) * kPanel)) - 1u);
      fn(Tile{p0, nb, col0, ch * row_chunk, std::min(c.M, (ch + 1) * row_chunk), tail}, scratch);
    }
  });
}

// The bf16 micro-kernel over a tile whose nb panels lie at `panels` (the packed weight or a dequantized copy).
inline void bf16_tile(const PanelCall& c, const Tile& t, const bf16* panels) {
  for (int64_t r = t.r0; r < t.r1; r += MB) {
    const int mb = (int)std::min<int64_t>(MB, t.r1 - r);
    pick(mb, (int)t.nb)(c.x + r * c.K, c.K, panels, c.K, c.bias ? c.bias + t.col0 : nullptr,
                        c.out + r * c.N + t.col0, c.N, t.tail);
  }
}

// fn(r, mb, q, nq, tail) over a tile's register blocks for the quantized code paths: one row x up to 4 panels,
// or 2-4 rows x up to 2 panels (their accumulators fill the 32 registers), `tail` for the block holding the
// tile's last panel. Every block shape sums a row in the same order.
template <typename F>
inline void for_each_code_block(const Tile& t, const F& fn) {
  const int rows = t.r1 - t.r0 == 1 ? 1 : 4, sub = rows == 1 ? 4 : 2;
  for (int64_t r = t.r0; r < t.r1; r += rows) {
    const int mb = (int)std::min<int64_t>(rows, t.r1 - r);
    for (int64_t q = 0; q < t.nb; q += sub) {
      const int nq = (int)std::min<int64_t>(sub, t.nb - q);
      fn(r, mb, q, nq, q + nq == t.nb ? t.tail : (__mmask16)0xFFFF);
    }
  }
}

// ---- quantized panels (cpu_gemm_w4.cpp, cpu_gemm_w8.cpp): up to kSmallM rows a call they multiply the codes,
// above they dequantize each tile into bf16 panels for the micro-kernel. kSmallM is a token bucket of the
// compiled step (1, 2, 4, 8, 16, ...), so eager and compiled steps of one batch take the same path.
constexpr int64_t kSmallM = 8;

// On the code path a byte b of codes becomes the bf16 numbers 128 + (b & 0xF) and 128 + (b >> 4) by OR-ing each
// nibble into 0x4300, the bf16 of 128 (its 7 mantissa bits hold any nibble exactly), so `vdpbf16ps` sums x * (128 + nibble) exactly in fp32 and the 128 is taken
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
