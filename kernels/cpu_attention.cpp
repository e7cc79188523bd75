// Paged decode attention for the compiled CPU decode step: store this step's K/V into the paged cache, then
// attend, one query per sequence, for float (fp32 / bf16 / fp16) and int8 / int4 caches.
//
// Why: inductor's fusion of the same math (kernels/attention_graph.py) gathers and dequantizes every key
// element through generic indexing code, so an int8 layer cost ~2x a bf16 one (73 vs 39 us at batch 1 on the
// demo model) and the quantized store added an extern `cat` and slices; at a 1.3 ms step that was a third of
// the token. Here a (sequence, KV head) task reads each key and value row once, dequantizes it in registers
// (16 lanes of `code * scale + zero`) and uses it for all G query heads of the group.
//
// Contract (same as `store_kv_graph` + `decode_attention_graph`):
//   q (B, Hq, D), k / v (B, Hkv, D): this step's query and new K/V, one token per sequence;
//   kv_cache: float (2, Hkv, num_blocks, block_size, D) or uint8 (2, Hkv, num_blocks, block_bytes) in the
//     kernels/kv_quant.py block format (codes, then fp16 scales, then fp16 zeros; int4: element 2j in the low
//     nibble of byte j);
//   slot_mapping (B,) int64, -1: write nothing; block_tables (B, nblk) int32; seq_lens (B,) int32, 0: padding
//   (output 0). Quantization matches kv_quant.quantize bit for bit (fp16 scale and zero rounded to nearest
//   even, codes rounded half to even against them); attention runs in fp32, with the softmax's exp a
//   degree-6 polynomial (relative error ~1e-7).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

// e^x for x <= 0 (scores minus their max): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for exactness
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline float to_float(const void* p, at::ScalarType t, int64_t i) {
  switch (t) {
    case at::kFloat: return static_cast<const float*>(p)[i];
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    default: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
  }
}

inline void from_float(void* p, at::ScalarType t, int64_t i, float v) {
  switch (t) {
    case at::kFloat: static_cast<float*>(p)[i] = v; break;
    case at::kBFloat16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
    default: static_cast<c10::Half*>(p)[i] = c10::Half(v);
  }
}

// One layer's cache: where the (K|V, head, block) rows are and how a token's row reads.
struct Cache {
  uint8_t* base;
  at::ScalarType dtype;  // float caches: the element type; quantized: Byte
  int64_t hkv, num_blocks, bs, D, bits;
  int64_t row_bytes;  // bytes of one (K|V, head, block) row
  int64_t tok_bytes;  // bytes of one token's values in that row
  int64_t elem;       // bytes per element (float caches)

  uint8_t* row(int64_t kv, int64_t h, int64_t blk) const {
    return base + ((kv * hkv + h) * num_blocks + blk) * row_bytes;
  }
  // fp16 scale and zero of token `off` in a quantized row
  float scale(const uint8_t* r, int64_t off) const {
    c10::Half s;
    std::memcpy(&s, r + bs * tok_bytes + 2 * off, 2);
    return static_cast<float>(s);
  }
  float zero(const uint8_t* r, int64_t off) const {
    c10::Half z;
    std::memcpy(&z, r + bs * tok_bytes + 2 * bs + 2 * off, 2);
    return static_cast<float>(z);
  }
};

// Lanes [16c, 16c + 16) of a token's row as fp32 (`mask`: the lanes < D); quantized rows dequantized with
// kv_quant.dequantize's float32 arithmetic, code * scale + zero.
template <int kind>  // 0 fp32, 1 bf16, 2 fp16, 8 int8, 4 int4
inline __m512 load_lanes(const uint8_t* t, int64_t c, __mmask16 mask, __m512 s, __m512 z) {
  if constexpr (kind == 0) {
    return _mm512_maskz_loadu_ps(mask, reinterpret_cast<const float*>(t) + c * kLanes);
  } else if constexpr (kind == 1) {
    __m256i raw = _mm256_maskz_loadu_epi16(mask, reinterpret_cast<const uint16_t*>(t) + c * kLanes);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else if constexpr (kind == 2) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, reinterpret_cast<const uint16_t*>(t) + c * kLanes));
  } else if constexpr (kind == 8) {
    __m128i raw = _mm_maskz_loadu_epi8(mask, t + c * kLanes);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(raw)), s, z);
  } else {
    // 8 bytes -> 16 codes: widen each byte to 16 bits, then low nibble | high nibble << 8 lays the codes
    // out in element order (2j low, 2j + 1 high), one per byte
    const __mmask16 bytes = static_cast<__mmask16>((1u << ((__builtin_popcount(mask) + 1) / 2)) - 1);
    __m128i w = _mm_cvtepu8_epi16(_mm_maskz_loadu_epi8(bytes, t + c * kLanes / 2));
    __m128i codes = _mm_or_si128(_mm_and_si128(w, _mm_set1_epi16(0xF)),
                                 _mm_slli_epi16(_mm_srli_epi16(w, 4), 8));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), s, z);
  }
}

struct Shapes {
  int64_t B, hq, hkv, G, D, chunks, nblk, window;
  float scale;
};

// One (sequence, KV head) task: out[b, h*G : (h+1)*G] = softmax(q K^T * scale) V over keys [start, n).
template <int kind>
void attend(const Cache& cache, const Shapes& sh, const float* q, const int32_t* table, int64_t n, int64_t h,
            float* out, std::vector<float>& scores) {
  const int64_t G = sh.G, D = sh.D, C = sh.chunks;
  const int64_t start = sh.window > 0 ? std::max<int64_t>(0, n - sh.window) : 0, L = n - start;
  const __mmask16 tail = static_cast<__mmask16>(D % kLanes ? (1u << (D % kLanes)) - 1 : 0xFFFF);
  auto lane_mask = [&](int64_t c) { return c == C - 1 ? tail : static_cast<__mmask16>(0xFFFF); };
  scores.resize(static_cast<size_t>(G * L));
  std::vector<__m512> acc(static_cast<size_t>(G));
  // token t's row in the cache and, for quantized caches, its scale and zero as 16 lanes each
  auto locate = [&](int64_t kv, int64_t t, __m512& s, __m512& z) -> const uint8_t* {
    const uint8_t* r = cache.row(kv, h, table[t / cache.bs]);
    const int64_t off = t % cache.bs;
    if constexpr (kind == 8 || kind == 4) {
      s = _mm512_set1_ps(cache.scale(r, off));
      z = _mm512_set1_ps(cache.zero(r, off));
    }
    return r + off * cache.tok_bytes;
  };
  __m512 s = _mm512_setzero_ps(), z = _mm512_setzero_ps();
  // scores: q (already scaled) . k for every key, all G heads of the group per key row read
  for (int64_t t = 0; t < L; ++t) {
    const uint8_t* row = locate(0, start + t, s, z);
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m512 kv = load_lanes<kind>(row, c, lane_mask(c), s, z);
      for (int64_t g = 0; g < G; ++g)
        acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (g * C + c) * kLanes), kv, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) scores[g * L + t] = _mm512_reduce_add_ps(acc[g]);
  }
  // softmax numerators in place, and their sums
  std::vector<float> inv(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores.data() + g * L;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < L; t += kLanes) {
      const __mmask16 m = static_cast<__mmask16>(L - t >= kLanes ? 0xFFFF : (1u << (L - t)) - 1);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, sc + t));
    }
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t += kLanes) {
      const __mmask16 m = static_cast<__mmask16>(L - t >= kLanes ? 0xFFFF : (1u << (L - t)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + t), vmax));
      _mm512_mask_storeu_ps(sc + t, m, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    inv[g] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  // out = sum_t p_t v_t, every value row read once for the G heads
  std::vector<__m512> o(static_cast<size_t>(G * C), _mm512_setzero_ps());
  for (int64_t t = 0; t < L; ++t) {
    const uint8_t* row = locate(1, start + t, s, z);
    for (int64_t c = 0; c < C; ++c) {
      const __m512 kv = load_lanes<kind>(row, c, lane_mask(c), s, z);
      for (int64_t g = 0; g < G; ++g)
        o[g * C + c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * L + t]), kv, o[g * C + c]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c)
      _mm512_storeu_ps(out + (g * C + c) * kLanes, _mm512_mul_ps(o[g * C + c], _mm512_set1_ps(inv[g])));
}

// Quantize one token's head row x (D) into a quantized cache row at token `off` (kv_quant.quantize).
void store_quant(const Cache& cache, uint8_t* r, int64_t off, const void* x, at::ScalarType xt, int64_t x0) {
  const int64_t D = cache.D, qmax = (1 << cache.bits) - 1;
  float lo = INFINITY, hi = -INFINITY;
  std::vector<float> xf(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) {
    xf[d] = to_float(x, xt, x0 + d);
    lo = std::min(lo, xf[d]);
    hi = std::max(hi, xf[d]);
  }
  const c10::Half scale((hi - lo) / static_cast<float>(qmax)), zero(lo);
  const float s = std::max(static_cast<float>(scale), 1e-8f), z = static_cast<float>(zero);
  uint8_t* codes = r + off * cache.tok_bytes;
  for (int64_t d = 0; d < D; ++d) {
    const float qv = std::min(std::max(std::nearbyint((xf[d] - z) / s), 0.0f), static_cast<float>(qmax));
    const auto code = static_cast<uint8_t>(qv);
    if (cache.bits == 8)
      codes[d] = code;
    else if (d % 2 == 0)
      codes[d / 2] = code;
    else
      codes[d / 2] |= static_cast<uint8_t>(code << 4);
  }
  std::memcpy(r + cache.bs * cache.tok_bytes + 2 * off, &scale, 2);
  std::memcpy(r + cache.bs * cache.tok_bytes + 2 * cache.bs + 2 * off, &zero, 2);
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            at::Tensor& kv_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale, int64_t block_size, int64_t head_dim,
                            int64_t bits, int64_t sliding_window) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3, "decode_attention: q, k, v must be 3-D");
  const at::ScalarType qt = q_in.scalar_type();
  TORCH_CHECK(qt == at::kFloat || qt == at::kBFloat16 || qt == at::kHalf,
              "decode_attention: q must be fp32, bf16 or fp16");
  TORCH_CHECK(k_in.scalar_type() == qt && v_in.scalar_type() == qt, "decode_attention: q, k, v dtypes differ");
  const int64_t B = q_in.size(0), hq = q_in.size(1), D = head_dim;
  TORCH_CHECK(q_in.size(2) == D && k_in.size(2) == D && v_in.size(2) == D, "decode_attention: head_dim mismatch");
  TORCH_CHECK(D > 0 && D <= 512, "decode_attention: head_dim must be in [1, 512], got ", D);
  TORCH_CHECK(bits == 0 || bits == 8 || bits == 4, "decode_attention: bits must be 0, 8 or 4, got ", bits);
  TORCH_CHECK(bits != 4 || D % 2 == 0, "decode_attention: int4 needs an even head_dim");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.size(0) == 2, "decode_attention: bad cache tensor");
  const int64_t hkv = kv_cache.size(1), num_blocks = kv_cache.size(2);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0 && k_in.size(1) == hkv && v_in.size(1) == hkv,
              "decode_attention: heads do not match the cache (", hq, " query, ", hkv, " KV)");
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B && slot_mapping.numel() == B && seq_lens.numel() == B &&
                  block_tables.dim() == 2 && block_tables.size(0) == B,
              "decode_attention: one query, one new K/V, one slot, one length and one table row per sequence");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && block_tables.scalar_type() == at::kInt &&
                  seq_lens.scalar_type() == at::kInt,
              "decode_attention: slot_mapping int64, block_tables and seq_lens int32");
  Cache cache{static_cast<uint8_t*>(kv_cache.data_ptr()), kv_cache.scalar_type(), hkv, num_blocks, block_size, D,
              bits, 0, 0, 0};
  if (bits) {
    TORCH_CHECK(kv_cache.dim() == 4 && cache.dtype == at::kByte &&
                    kv_cache.size(3) == block_size * (D * bits / 8 + 4),
                "decode_attention: a quantized cache is uint8 (2, Hkv, num_blocks, block_bytes)");
    cache.tok_bytes = D * bits / 8;
    cache.row_bytes = kv_cache.size(3);
  } else {
    TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(3) == block_size && kv_cache.size(4) == D &&
                    (cache.dtype == at::kFloat || cache.dtype == at::kBFloat16 || cache.dtype == at::kHalf),
                "decode_attention: a float cache is fp32/bf16/fp16 (2, Hkv, num_blocks, block_size, D)");
    cache.elem = kv_cache.element_size();
    cache.tok_bytes = D * cache.elem;
    cache.row_bytes = block_size * cache.tok_bytes;
  }
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous(), tables = block_tables.contiguous();
  const at::Tensor slots = slot_mapping.contiguous(), lens = seq_lens.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int32_t* len = lens.data_ptr<int32_t>();
  const int64_t nblk = tables.size(1);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slot[b] < num_blocks * block_size, "decode_attention: slot ", slot[b], " is past the cache");
    TORCH_CHECK(len[b] >= 0 && len[b] <= nblk * block_size, "decode_attention: sequence length ", len[b],
                " does not fit its block table (", nblk, " blocks)");
  }
  const int32_t* tab = tables.data_ptr<int32_t>();
  for (int64_t i = 0; i < tables.numel(); ++i)
    TORCH_CHECK(tab[i] >= 0 && tab[i] < num_blocks, "decode_attention: block id ", tab[i], " is past the cache");

  // 1. the new K/V rows (slot -1: padding, nothing written)
  for (int64_t b = 0; b < B; ++b) {
    if (slot[b] < 0) continue;
    const int64_t blk = slot[b] / block_size, off = slot[b] % block_size;
    for (int64_t kv = 0; kv < 2; ++kv) {
      const at::Tensor& src = kv ? v : k;
      for (int64_t h = 0; h < hkv; ++h) {
        uint8_t* r = cache.row(kv, h, blk);
        const int64_t x0 = (b * hkv + h) * D;
        if (bits) {
          store_quant(cache, r, off, src.data_ptr(), qt, x0);
        } else {
          for (int64_t d = 0; d < D; ++d)
            from_float(r + off * cache.tok_bytes, cache.dtype, d, to_float(src.data_ptr(), qt, x0 + d));
        }
      }
    }
  }

  // 2. attention, one task per (sequence, KV head)
  Shapes sh{B, hq, hkv, hq / hkv, D, (D + kLanes - 1) / kLanes, nblk, sliding_window, static_cast<float>(scale)};
  at::Tensor out = at::zeros_like(q_in, q_in.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor qc = q_in.contiguous();
  const void* qp = qc.data_ptr();
  void* op = out.data_ptr();
  at::parallel_for(0, B * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(static_cast<size_t>(sh.G * sh.chunks * kLanes)), of(qf.size()), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / hkv, h = task % hkv, n = len[b];
      if (n == 0) continue;  // padding sequence: output stays 0
      // the group's queries, pre-scaled, padded to whole 16-lane chunks with zeros
      std::fill(qf.begin(), qf.end(), 0.0f);
      for (int64_t g = 0; g < sh.G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * sh.chunks * kLanes + d] = to_float(qp, qt, (b * hq + h * sh.G + g) * D + d) * sh.scale;
      const int32_t* table = tab + b * nblk;
      switch (bits ? bits : cache.dtype == at::kFloat ? 0 : cache.dtype == at::kBFloat16 ? 1 : 2) {
        case 0: attend<0>(cache, sh, qf.data(), table, n, h, of.data(), scores); break;
        case 1: attend<1>(cache, sh, qf.data(), table, n, h, of.data(), scores); break;
        case 2: attend<2>(cache, sh, qf.data(), table, n, h, of.data(), scores); break;
        case 8: attend<8>(cache, sh, qf.data(), table, n, h, of.data(), scores); break;
        default: attend<4>(cache, sh, qf.data(), table, n, h, of.data(), scores);
      }
      for (int64_t g = 0; g < sh.G; ++g)
        for (int64_t d = 0; d < D; ++d)
          from_float(op, qt, (b * hq + h * sh.G + g) * D + d, of[g * sh.chunks * kLanes + d]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qserve_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping, "
      "Tensor block_tables, Tensor seq_lens, float scale, int block_size, int head_dim, int bits, "
      "int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) { m.impl("decode_attention", decode_attention); }
