// The backward of torch.ao's QAT conv+BN division, compiled (`torch.ops.kdqat_C`).
//
// torch.ao's fused conv+BN (`_ConvBnNd._forward_approximate`) trains on the BN-folded weight and
// divides the folded scale back out of every activation: `out = conv / s`, s per output channel.
// Autograd's derivative of that division makes five passes over the activation (`grad / s` for
// the input; `-grad * ((conv / s) / s)` for s, as a division, a division, a negation and a
// product), the largest item of a QAT step on an AVX2-only CPU (2.8 of 12.6 s, PointNeXt-S width
// 32, batch 32, torch profiler). This makes one pass that reads the gradient and the forward's
// output and writes both results, with torch's operations per element, in its order:
//   grad_input  = grad / s
//   grad_s_each = (-grad) * (out / s)        out / s is torch's (conv / s) / s: out is conv / s
// so the bits are torch's; the caller sums `grad_s_each` to s's shape with torch's own sum, as
// autograd does, because the sum's order of accumulation is torch's business.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "vector_clones.h"

namespace kdqat {
namespace {

// One run of elements that share a channel (the channel's stride apart from the next run).
KDQAT_VECTOR_CLONES
void divide_run(const float* __restrict__ grad, const float* __restrict__ out, float* __restrict__ grad_input,
                float* __restrict__ grad_s_each, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) {
    grad_input[i] = grad[i] / s;
    grad_s_each[i] = -grad[i] * (out[i] / s);
  }
}

// One row of channels (channels-last: the channel is the innermost dimension).
KDQAT_VECTOR_CLONES
void divide_row(const float* __restrict__ grad, const float* __restrict__ out, float* __restrict__ grad_input,
                float* __restrict__ grad_s_each, int64_t channels, const float* __restrict__ s) {
  for (int64_t c = 0; c < channels; ++c) {
    grad_input[c] = grad[c] / s[c];
    grad_s_each[c] = -grad[c] * (out[c] / s[c]);
  }
}

// (grad_input, grad_s_each) for `out = input / s` with s of one value per channel (dimension 1).
// grad and out: float32 CPU tensors of one shape and one dense layout (any order of dimensions);
// both results come in that layout, the one torch's element-wise ops give them.
std::tuple<at::Tensor, at::Tensor> bn_fold_divide_backward(const at::Tensor& grad, const at::Tensor& out,
                                                            const at::Tensor& scale) {
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  scale.scalar_type() == at::kFloat,
              "kdqat_C::bn_fold_divide_backward: float32 CPU tensors");
  TORCH_CHECK(grad.dim() >= 2 && grad.sizes() == out.sizes() && grad.strides() == out.strides() &&
                  grad.is_non_overlapping_and_dense(),
              "kdqat_C::bn_fold_divide_backward: grad and out of one shape and one dense layout");
  const int64_t channels = grad.size(1);
  TORCH_CHECK(scale.numel() == channels, "kdqat_C::bn_fold_divide_backward: one scale per channel (dimension 1)");
  const at::Tensor s_contiguous = scale.contiguous();
  at::Tensor grad_input = at::empty_like(grad);
  at::Tensor grad_s_each = at::empty_like(grad);
  if (grad.numel() == 0) {
    return {grad_input, grad_s_each};
  }
  const float* g = grad.data_ptr<float>();
  const float* o = out.data_ptr<float>();
  const float* s = s_contiguous.data_ptr<float>();
  float* gi = grad_input.data_ptr<float>();
  float* gs = grad_s_each.data_ptr<float>();
  const int64_t channel_stride = grad.stride(1);
  const int64_t numel = grad.numel();
  if (channels == 1 || channel_stride > 1) {
    // Dense, so memory holds runs of `channel_stride` elements of one channel, the channels in turn.
    const int64_t run = channels == 1 ? numel : channel_stride;
    const int64_t runs = numel / run;
    at::parallel_for(0, runs, std::max<int64_t>(1, (1 << 15) / run), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        divide_run(g + r * run, o + r * run, gi + r * run, gs + r * run, run, s[r % channels]);
      }
    });
  } else {
    // Channels innermost: memory holds rows of all channels.
    const int64_t rows = numel / channels;
    at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 15) / channels), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        divide_row(g + r * channels, o + r * channels, gi + r * channels, gs + r * channels, channels, s);
      }
    });
  }
  return {grad_input, grad_s_each};
}

}  // namespace
}  // namespace kdqat

TORCH_LIBRARY_FRAGMENT(kdqat_C, m) {
  m.def("bn_fold_divide_backward(Tensor grad, Tensor out, Tensor scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdqat_C, CPU, m) { m.impl("bn_fold_divide_backward", &kdqat::bn_fold_divide_backward); }
