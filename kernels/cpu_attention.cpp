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

// lane i of the result = the sum of a[i]'s 16 lanes: a transpose-and-add tree, 45 shuffles and adds for 16
// sums where one `_mm512_reduce_add_ps` each costs ~8 dependent ones.
inline __m512 hsum16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit quarter: lanes 0, 2 partial sums of a[2i], lanes 1, 3 of a[2i+1]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // lane 4q + j: quarter q's sum of a[4i + j]
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, 0x88), _mm512_shuffle_f32x4(e01, e23, 0xDD));
}

inline __mmask16 prefix_mask(int64_t n) {  // the first min(n, 16) lanes
  return static_cast<__mmask16>(n >= kLanes ? 0xFFFF : (1u << n) - 1);
}

// fn(i, token_row, scale, zero) for the keys [start, n) of K (kv 0) or V (kv 1), walking the block table
// block by block (no division per token)
template <int kind, typename F>
inline void for_each_token(const Cache& cache, int64_t kv, int64_t h, const int32_t* table, int64_t start,
                           int64_t n, const F& fn) {
  int64_t blk = start / cache.bs, off = start % cache.bs, i = 0;
  for (int64_t t = start; t < n; ++blk, off = 0) {
    const uint8_t* r = cache.row(kv, h, table[blk]);
    const uint8_t* tok = r + off * cache.tok_bytes;
    const uint16_t* sz = reinterpret_cast<const uint16_t*>(r + cache.bs * cache.tok_bytes);  // scales, zeros
    const int64_t stop = std::min(cache.bs, off + (n - t));
    for (; off < stop; ++off, ++t, ++i, tok += cache.tok_bytes) {
      if constexpr (kind == 8 || kind == 4)
        fn(i, tok, _cvtsh_ss(sz[off]), _cvtsh_ss(sz[cache.bs + off]));
      else
        fn(i, tok, 0.0f, 0.0f);
    }
  }
}

// One (sequence, KV head) task for G query heads of C 16-lane chunks (G, C known at compile time so the
// accumulators live in registers; C 0: runtime C, accumulators in memory): out = softmax(q K^T) V over keys
// [start, n), q pre-scaled.
template <int kind, int G, int CT>
void attend(const Cache& cache, int64_t C_rt, const float* q, const int32_t* table, int64_t start, int64_t n,
            int64_t h, float* out, std::vector<float>& scores_buf, std::vector<__m512>& scratch) {
  const int64_t C = CT ? CT : C_rt, D = cache.D, L = n - start;
  const __mmask16 tail = prefix_mask(D - (C - 1) * kLanes);
  auto lane_mask = [&](int64_t c) { return c == C - 1 ? tail : static_cast<__mmask16>(0xFFFF); };
  scores_buf.resize(static_cast<size_t>(G * (L + kLanes)));
  float* scores = scores_buf.data();
  // scores: q . k for every key; each key row is read once for the G heads, the 16-lane products of 16 keys
  // are summed together (hsum16)
  __m512 prod[G][kLanes];
  auto flush = [&](int64_t i0, int64_t count) {
    for (int g = 0; g < G; ++g) {
      for (int64_t j = count; j < kLanes; ++j) prod[g][j] = _mm512_setzero_ps();
      _mm512_storeu_ps(scores + g * (L + kLanes) + i0, hsum16(prod[g]));
    }
  };
  for_each_token<kind>(cache, 0, h, table, start, n, [&](int64_t i, const uint8_t* row, float sv, float zv) {
    const __m512 s = _mm512_set1_ps(sv), z = _mm512_set1_ps(zv);
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const __m512 k = load_lanes<kind>(row, c, lane_mask(c), s, z);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (g * C + c) * kLanes), k, acc[g]);
    }
    for (int g = 0; g < G; ++g) prod[g][i % kLanes] = acc[g];
    if (i % kLanes == kLanes - 1) flush(i - (kLanes - 1), kLanes);
  });
  if (L % kLanes) flush(L - L % kLanes, L % kLanes);
  // softmax numerators in place, and the reciprocals of their sums
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sc = scores + g * (L + kLanes);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < L; t += kLanes) {
      const __mmask16 m = prefix_mask(L - t);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, sc + t));
    }
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t += kLanes) {
      const __mmask16 m = prefix_mask(L - t);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + t), vmax));
      _mm512_mask_storeu_ps(sc + t, m, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    inv[g] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  // out = sum_t p_t v_t; each value row read once for the G heads
  scratch.resize(static_cast<size_t>(G * C));  // runtime C: the accumulators live here (zeroed below)
  __m512 reg[G * (CT ? CT : 1)];
  __m512* o = CT ? reg : scratch.data();
  for (int64_t j = 0; j < G * C; ++j) o[j] = _mm512_setzero_ps();
  for_each_token<kind>(cache, 1, h, table, start, n, [&](int64_t i, const uint8_t* row, float sv, float zv) {
    const __m512 s = _mm512_set1_ps(sv), z = _mm512_set1_ps(zv);
    for (int64_t c = 0; c < C; ++c) {
      const __m512 v = load_lanes<kind>(row, c, lane_mask(c), s, z);
      for (int g = 0; g < G; ++g)
        o[g * C + c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * (L + kLanes) + i]), v, o[g * C + c]);
    }
  });
  for (int g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c)
      _mm512_storeu_ps(out + (g * C + c) * kLanes, _mm512_mul_ps(o[g * C + c], _mm512_set1_ps(inv[g])));
}

using AttendFn = void (*)(const Cache&, int64_t, const float*, const int32_t*, int64_t, int64_t, int64_t, float*,
                          std::vector<float>&, std::vector<__m512>&);

template <int kind, int G>
AttendFn pick_chunks(int64_t C) {
  switch (C) {
    case 1: return attend<kind, G, 1>;
    case 2: return attend<kind, G, 2>;
    case 4: return attend<kind, G, 4>;
    case 8: return attend<kind, G, 8>;
    default: return attend<kind, G, 0>;
  }
}

template <int kind>
AttendFn pick_heads(int G, int64_t C) {
  switch (G) {
    case 8: return pick_chunks<kind, 8>(C);
    case 4: return pick_chunks<kind, 4>(C);
    case 2: return pick_chunks<kind, 2>(C);
    default: return pick_chunks<kind, 1>(C);
  }
}

// The kernel for a sub-group of `G` (1, 2, 4 or 8) query heads of cache kind `kind`.
AttendFn pick(int64_t kind, int G, int64_t C) {
  switch (kind) {
    case 0: return pick_heads<0>(G, C);
    case 1: return pick_heads<1>(G, C);
    case 2: return pick_heads<2>(G, C);
    case 8: return pick_heads<8>(G, C);
    default: return pick_heads<4>(G, C);
  }
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
  const int64_t G = hq / hkv, chunks = (D + kLanes - 1) / kLanes;
  const float qscale = static_cast<float>(scale);
  at::Tensor out = at::zeros_like(q_in, q_in.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor qc = q_in.contiguous();
  const void* qp = qc.data_ptr();
  void* op = out.data_ptr();
  // a group of G query heads runs as sub-groups of 8, 4, 2, 1 heads (each a compiled-size kernel)
  const int64_t kind = bits ? bits : cache.dtype == at::kFloat ? 0 : cache.dtype == at::kBFloat16 ? 1 : 2;
  std::vector<std::pair<int64_t, AttendFn>> subgroups;  // (first head in the group, kernel)
  for (int64_t g0 = 0; g0 < G;) {
    const int size = G - g0 >= 8 ? 8 : G - g0 >= 4 ? 4 : G - g0 >= 2 ? 2 : 1;
    subgroups.emplace_back(g0, pick(kind, size, chunks));
    g0 += size;
  }
  at::parallel_for(0, B * hkv, 1, [&](int64_t begin, int64_t end) {
    const int64_t width = chunks * kLanes;  // a head's lanes, D padded to whole chunks
    std::vector<float> qf(static_cast<size_t>(G * width)), of(qf.size()), scores;
    std::vector<__m512> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / hkv, h = task % hkv, n = len[b];
      if (n == 0) continue;  // padding sequence: output stays 0
      const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, n - sliding_window) : 0;
      // the group's queries, pre-scaled, padded with zeros
      std::fill(qf.begin(), qf.end(), 0.0f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * width + d] = to_float(qp, qt, (b * hq + h * G + g) * D + d) * qscale;
      for (const auto& [g0, fn] : subgroups)
        fn(cache, chunks, qf.data() + g0 * width, tab + b * nblk, start, n, h, of.data() + g0 * width, scores,
           scratch);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) from_float(op, qt, (b * hq + h * G + g) * D + d, of[g * width + d]);
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
