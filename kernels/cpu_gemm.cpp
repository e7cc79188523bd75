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
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 && packed.size(2) == kPanel &&
                  packed.size(3) == 2 && packed.is_contiguous(),
              "linear_bf16: weight is not in the packed layout (pack_bf16)");
  const PanelCall c = panel_call(x, packed.size(1) * 2, packed.size(0), bias, out_features, "linear_bf16");
  if (c.M == 0) return c.y;
  const bf16* pp = reinterpret_cast<const bf16*>(packed.data_ptr());
  for_each_tile(c, [&](const Tile& t, std::vector<bf16>&) { bf16_tile(c, t, pp + t.p0 * c.K * kPanel); });
  return c.y;
}

// Sets the panel linears' one-thread threshold (cpu_panels.h min_thread_work); returns the previous value.
int64_t set_min_thread_work(int64_t work) {
  TORCH_CHECK(work >= 1, "set_min_thread_work: work must be at least 1, got ", work);
  const int64_t previous = min_thread_work();
  min_thread_work() = work;
  return previous;
}

}  // namespace

TORCH_LIBRARY(qserve_cpu, m) {
  m.def("pack_bf16(Tensor w) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("set_min_thread_work(int work) -> int", &set_min_thread_work);
}

TORCH_LIBRARY_IMPL(qserve_cpu, CPU, m) {
  m.impl("pack_bf16", pack_bf16);
  m.impl("linear_bf16", linear_bf16);
}
