// bf16 linear for CPUs with AVX512-BF16: y = x W^T (+ b), W packed once into 16-column panels.
//
// Why: at decode batch sizes a linear layer is a GEMV, bound by how fast its weight streams from cache or
// memory. oneDNN's bf16 path costs 15-50 us a call there on this project's machines (a fixed setup cost plus
// 10-30 GB/s), 3-4x what the bytes need; this kernel streams the panels at the cache's pace and has no
// per-call setup beyond the dispatcher. Large M is compute-bound and runs the same register-blocked loop.
//
// Layout ("VNNI-16"): W (N, K) -> P (ceil(N/16), K/2, 16, 2): for every block of 16 output columns, the
// column pairs (k, k+1) of those 16 rows lie side by side, 64 bytes per k-pair. One `vdpbf16ps` multiplies
// such a 64-byte line by a broadcast pair x[m, k:k+2] and adds into 16 fp32 accumulators, so the
// inner loop is one load per 16 columns and one broadcast per row; no horizontal reductions. Rows past N
// are zero; K must be even.
//
// Blocking: MB (<= 4) rows of x times NB (<= 4) panels (64 columns) of accumulators live in registers for
// the whole K loop; fp32 accumulation, then bias, then one round-to-nearest-even to bf16 (as oneDNN does,
// so the results agree with it to bf16 rounding, not bit for bit: the summation order differs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cpu_panels.h"

namespace {

using namespace qserve_cpu_panels;

at::Tensor pack_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_bf16: weight must be 2-D bf16");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 2 == 0, "pack_bf16: in_features must be even, got ", K);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::Tensor padded = at::zeros({panels * kPanel, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  // (panels, 16, K/2, 2) -> (panels, K/2, 16, 2)
  return padded.view({panels, kPanel, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "linear_bf16: x and the packed weight must be bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.size(3) == 2 && packed.is_contiguous(),
              "linear_bf16: weight is not in the packed layout (pack_bf16)");
  const int64_t K = packed.size(1) * 2, panels = packed.size(0);
  TORCH_CHECK(x.size(-1) == K, "linear_bf16: x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(out_features > (panels - 1) * kPanel && out_features <= panels * kPanel,
              "linear_bf16: out_features ", out_features, " does not match ", panels, " panels");
  const bf16* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == out_features && bias->is_contiguous(),
                "linear_bf16: bias must be a contiguous bf16 vector of out_features");
    b = reinterpret_cast<const bf16*>(bias->data_ptr());
  }
  at::Tensor xc = x.reshape({-1, K}).contiguous();
  const int64_t M = xc.size(0), N = out_features;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (M == 0) return y;
  const bf16* xp = reinterpret_cast<const bf16*>(xc.data_ptr());
  const bf16* pp = reinterpret_cast<const bf16*>(packed.data_ptr());
  bf16* yp = reinterpret_cast<bf16*>(y.data_ptr());

  // Tasks: (64-column group, chunk of up to 64 rows); a task's panels stay in L1/L2 across its rows.
  const int64_t groups = (panels + NB - 1) / NB;
  const int64_t row_chunk = 64, chunks = (M + row_chunk - 1) / row_chunk;
  const int64_t tasks = groups * chunks;
  // Below ~64K multiply-adds a task the fork/join costs more than a second thread saves.
  const int64_t per_task = std::min(M, row_chunk) * NB * kPanel * K;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(per_task, 1));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t % groups, c = t / groups;
      const int64_t p0 = g * NB, nb = std::min<int64_t>(NB, panels - p0);
      const int64_t col0 = p0 * kPanel, cols = std::min<int64_t>(nb * kPanel, N - col0);
      const __mmask16 tail = (__mmask16)((1u << (cols - (nb - 1) * kPanel)) - 1u);
      const int64_t r_end = std::min(M, (c + 1) * row_chunk);
      for (int64_t r = c * row_chunk; r < r_end; r += MB) {
        const int mb = (int)std::min<int64_t>(MB, r_end - r);
        pick(mb, (int)nb)(xp + r * K, K, pp + p0 * K * kPanel, K, b ? b + col0 : nullptr, yp + r * N + col0, N,
                          tail);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(qserve_cpu, m) {
  m.def("pack_bf16(Tensor w) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) {
  m.impl("pack_bf16", pack_bf16);
  m.impl("linear_bf16", linear_bf16);
}
