// The forward of torch.ao's per-tensor activation fake quant, compiled (`torch.ops.kdqat_C`).
//
// torch's CPU kernel (`_fake_quantize_per_tensor_affine_cachemask_tensor_qparams`) runs a scalar
// loop that converts every element to int64 and calls `nearbyint`; on an AVX2-only CPU it took
// 15 ns per element, a quarter of a QAT training step (PointNeXt-S width 32, batch 32, 1 thread,
// torch profiler). This computes the same output and in-range mask, bit for bit, in one
// vectorizable pass: the arithmetic is torch's, operation by operation (tests compare bits on
// random values, rounding ties, the clamp limits, huge values, infinities and NaN):
//   q    = float(zero_point) + nearbyint(x * (1 / scale))     float, as torch's integer + float
//   mask = quant_min <= q <= quant_max
//   out  = (clamp(q, quant_min, quant_max) - zero_point) * scale
// torch clamps in double (`fmax` then `fmin`: NaN becomes quant_min), converts to int64 and back,
// and multiplies in float; every value it clamps to is a small integer, exact in float, so the
// float clamp here gives the same number.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "vector_clones.h"

namespace kdqat {
namespace {

KDQAT_VECTOR_CLONES
void fake_quant_rows(const float* __restrict__ x, float* __restrict__ out, bool* __restrict__ mask, int64_t n,
                     float scale, float inv_scale, float zero_point, float quant_min, float quant_max) {
  for (int64_t i = 0; i < n; ++i) {
    // rint: nearbyint's result (round half to even in the default rounding mode), minus its promise
    // not to raise the inexact flag, which keeps the compiler from inlining it as one vector round
    const float q = zero_point + std::rint(x[i] * inv_scale);
    // fmax then fmin, written as comparisons the compiler vectorizes: NaN fails both tests and
    // becomes quant_min, as in torch's `fmax(NaN, quant_min)`
    const float above_min = q > quant_min ? q : quant_min;
    const float clamped = above_min < quant_max ? above_min : quant_max;
    out[i] = (clamped - zero_point) * scale;
    mask[i] = (quant_min <= q) & (q <= quant_max);  // `&`, not `&&`: no branch in the loop
  }
}

// (out, mask) as torch's kernel returns them, for a contiguous float32 CPU input and one-element
// scale (float32) and zero point (int32) tensors, as torch.ao's fused fake quant keeps them.
std::tuple<at::Tensor, at::Tensor> fake_quant_cachemask(const at::Tensor& input, const at::Tensor& scale,
                                                         const at::Tensor& zero_point, int64_t quant_min,
                                                         int64_t quant_max) {
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.is_contiguous(),
              "kdqat_C::fake_quant_cachemask: a contiguous float32 CPU tensor, got ", input.scalar_type(), " on ",
              input.device(), input.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(scale.numel() == 1 && zero_point.numel() == 1 && scale.scalar_type() == at::kFloat &&
                  zero_point.scalar_type() == at::kInt,
              "kdqat_C::fake_quant_cachemask: one float32 scale and one int32 zero point");
  TORCH_CHECK(quant_min <= quant_max && quant_max - quant_min < (int64_t{1} << 24),
              "kdqat_C::fake_quant_cachemask: quant_min <= quant_max, at most 2^24 levels");
  at::Tensor out = at::empty_like(input);
  at::Tensor mask = at::empty_like(input, input.options().dtype(at::kBool));
  const float s = scale.item<float>();
  const float inv_scale = 1.0f / s;
  const float zp = static_cast<float>(zero_point.item<int32_t>());
  const float* x = input.data_ptr<float>();
  float* y = out.data_ptr<float>();
  bool* m = mask.data_ptr<bool>();
  at::parallel_for(0, input.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    fake_quant_rows(x + begin, y + begin, m + begin, end - begin, s, inv_scale, zp, static_cast<float>(quant_min),
                    static_cast<float>(quant_max));
  });
  return {out, mask};
}

}  // namespace
}  // namespace kdqat

TORCH_LIBRARY_FRAGMENT(kdqat_C, m) {
  m.def("fake_quant_cachemask(Tensor input, Tensor scale, Tensor zero_point, int quant_min, int quant_max) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdqat_C, CPU, m) { m.impl("fake_quant_cachemask", &kdqat::fake_quant_cachemask); }
