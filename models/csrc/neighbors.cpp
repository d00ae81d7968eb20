// Neighbour search of PointNet++ / PointNeXt as compiled CPU operators (`torch.ops.kdqat_C`).
//
// These are loop-for-loop CPU versions of `models/neighbors.py`'s pure-PyTorch reference, which
// itself reproduces the pointnet2 CUDA kernels (OpenPoints' `pointnet2_batch`). Every index they
// return must equal the reference's, so the arithmetic is the reference's, operation by
// operation: squared distances are ((dx*dx + dy*dy) + dz*dz) in the input's dtype, never fused
// into multiply-adds (setup.py compiles with -ffp-contract=off), and comparisons are the same
// strict ones. Why a compiled version at all: farthest point sampling is npoint sequential
// steps, ~1000 small torch ops per call in Python, and neighbour search dominated int8
// inference time. The int8 grouping (`_dp_fj_quantized`) is here because torch ops moved its
// output, the largest tensor of the network, three times; this writes each byte once.
//
// Registered with the dispatcher (TORCH_LIBRARY below), so the ops work from Python, from
// TorchScript (once this library is loaded with `torch.ops.load_library`), and through
// torch.export / torch.compile with the fake kernels that `models/_kernels.py` registers.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vector_clones.h"

// The hot loops below are KDQAT_VECTOR_CLONES (vector_clones.h): one build per vector width.

namespace kdqat {
namespace {

// Point indices in the order the CUDA FPS kernel prefers them on exact ties.
//
// The kernel runs T threads (largest power of two <= N, at most 1024); thread t scans points
// t, t+T, t+2T, ... keeping its first maximum, then a tree reduction keeps the lower slot unless
// the upper one is strictly larger. Among equal distances the winner is the point whose thread
// number, bit-reversed, is smallest, then the lowest index. Listing threads by increasing
// bit-reversed number, each with its points in index order, gives that preference directly.
std::vector<int64_t> cuda_tie_order(int64_t num_points) {
  int bits = 0;
  while (bits < 10 && (int64_t{2} << bits) <= num_points) {
    ++bits;
  }
  const int64_t threads = int64_t{1} << bits;
  std::vector<int64_t> order;
  order.reserve(num_points);
  for (int64_t rank = 0; rank < threads; ++rank) {
    int64_t thread = 0;
    for (int bit = 0; bit < bits; ++bit) {
      thread |= ((rank >> bit) & 1) << (bits - 1 - bit);
    }
    for (int64_t k = thread; k < num_points; k += threads) {
      order.push_back(k);
    }
  }
  return order;
}

// Signed integer of the same width as a float type, to order distances by their bits.
template <typename scalar_t>
struct Bits;
template <>
struct Bits<float> {
  using type = int32_t;
};
template <>
struct Bits<double> {
  using type = int64_t;
};

// One FPS step over a cloud's coordinate planes: lowers each point's distance to the picked set
// by its distance to the last pick and returns the next pick (its position in the planes).
//
// Split into simple loops that the compiler vectorises (for float32; one fused loop does not
// vectorise): update the distances, turn them into integer keys, take the largest key, find its
// first occurrence. Keys: distances are sums of squares, +0 or more (never -0), and
// non-negative floats order like their bit patterns read as signed integers; every NaN gets the
// largest key, so NaN wins and the first NaN is taken, as torch.argmax does.
template <typename scalar_t>
KDQAT_VECTOR_CLONES int64_t fps_step(const scalar_t* __restrict px, const scalar_t* __restrict py,
                                     const scalar_t* __restrict pz, int64_t num_points, int64_t last,
                                     scalar_t* __restrict min_dist, typename Bits<scalar_t>::type* __restrict keys) {
  using key_t = typename Bits<scalar_t>::type;
  const scalar_t x1 = px[last], y1 = py[last], z1 = pz[last];
  for (int64_t i = 0; i < num_points; ++i) {
    const scalar_t dx = px[i] - x1, dy = py[i] - y1, dz = pz[i] - z1;
    const scalar_t d = dx * dx + dy * dy + dz * dz;
    const scalar_t previous = min_dist[i];
    min_dist[i] = ((d < previous) | (d != d)) ? d : previous;  // torch.minimum: a NaN sticks
  }
  for (int64_t i = 0; i < num_points; ++i) {
    const scalar_t m = min_dist[i];
    const key_t nan = -static_cast<key_t>(m != m);
    keys[i] = std::bit_cast<key_t>(m) | (nan & std::numeric_limits<key_t>::max());
  }
  key_t best = 0;
  for (int64_t i = 0; i < num_points; ++i) {
    best = keys[i] > best ? keys[i] : best;
  }
  int64_t i = 0;
  while (keys[i] != best) {
    ++i;
  }
  return i;
}

// One cloud: picks `npoint` indices into `out` (see furthest_point_sample for the semantics).
template <typename scalar_t>
void fps_cloud(const scalar_t* xyz, int64_t num_points, int64_t npoint, const std::vector<int64_t>& order,
               int64_t* out) {
  using key_t = typename Bits<scalar_t>::type;
  // Coordinates as three planes in tie-preference order: "first maximum" then is the kernel's winner.
  std::vector<scalar_t> planes(3 * num_points);
  scalar_t* px = planes.data();
  scalar_t* py = px + num_points;
  scalar_t* pz = py + num_points;
  for (int64_t i = 0; i < num_points; ++i) {
    const scalar_t* p = xyz + 3 * order[i];
    px[i] = p[0];
    py[i] = p[1];
    pz[i] = p[2];
  }
  std::vector<scalar_t> min_dist(num_points, static_cast<scalar_t>(1e10));  // the kernel's `temp`
  std::vector<key_t> keys(num_points);
  int64_t last = 0;  // point 0 is first in `order`
  out[0] = 0;
  for (int64_t step = 1; step < npoint; ++step) {
    last = fps_step(px, py, pz, num_points, last, min_dist.data(), keys.data());
    out[step] = order[last];
  }
}

at::Tensor furthest_point_sample(const at::Tensor& xyz, int64_t npoint) {
  TORCH_CHECK(xyz.dim() == 3 && xyz.size(2) == 3, "furthest_point_sample: xyz must be (B, N, 3), got ",
              xyz.sizes());
  const int64_t batch = xyz.size(0), num_points = xyz.size(1);
  TORCH_CHECK_VALUE(1 <= npoint && npoint <= num_points, "furthest_point_sample: npoint=", npoint,
                    " must be in [1, ", num_points, "]");
  const at::Tensor points = xyz.contiguous();
  at::Tensor out = at::empty({batch, npoint}, xyz.options().dtype(at::kLong));
  const std::vector<int64_t> order = cuda_tie_order(num_points);
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "furthest_point_sample", [&] {
    const scalar_t* data = points.const_data_ptr<scalar_t>();
    int64_t* picked = out.mutable_data_ptr<int64_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        fps_cloud(data + b * num_points * 3, num_points, npoint, order, picked + b * npoint);
      }
    });
  });
  return out;
}

// One ball: the first `nsample` support indices within the radius (see ball_query).
//
// Support points come as three coordinate planes; blocks of them are tested by a vectorised
// loop into a byte mask (1 inside, 0 outside), then the mask is read 8 bytes at a time and
// only its set bytes are visited, lowest first (index order), stopping once the ball is full.
// A ball holds a few points of a block, so most words are zero: visiting every mask entry
// instead took twice as long (1024 support points, 512 centres, radius 0.15, 32 neighbours).
template <typename scalar_t>
KDQAT_VECTOR_CLONES void ball_one(const scalar_t* __restrict px, const scalar_t* __restrict py,
                                  const scalar_t* __restrict pz, int64_t num_support, const scalar_t* centre, scalar_t r2,
                                  int64_t nsample, int64_t* out) {
  constexpr int64_t kBlock = 64;
  alignas(64) uint8_t inside[kBlock];
  const scalar_t cx = centre[0], cy = centre[1], cz = centre[2];
  int64_t count = 0;
  for (int64_t start = 0; start < num_support && count < nsample; start += kBlock) {
    const int64_t size = std::min(kBlock, num_support - start);
    for (int64_t j = 0; j < size; ++j) {
      const scalar_t dx = cx - px[start + j], dy = cy - py[start + j], dz = cz - pz[start + j];
      inside[j] = static_cast<uint8_t>(dx * dx + dy * dy + dz * dz < r2);
    }
    std::fill(inside + size, inside + kBlock, uint8_t{0});  // the last, short block
    for (int64_t word_start = 0; word_start < kBlock && count < nsample; word_start += 8) {
      uint64_t word;
      std::memcpy(&word, inside + word_start, 8);
      while (word != 0 && count < nsample) {
        const int64_t j = start + word_start + std::countr_zero(word) / 8;  // the lowest set byte
        word &= word - 1;  // clears that byte's only set bit
        if (count == 0) {
          std::fill(out, out + nsample, j);  // padding: the first neighbour found
        }
        out[count++] = j;
      }
    }
  }
  if (count == 0) {
    std::fill(out, out + nsample, int64_t{0});  // the kernel's zero-initialised output
  }
}

at::Tensor ball_query(const at::Tensor& support_xyz, const at::Tensor& query_xyz, double radius, int64_t nsample) {
  TORCH_CHECK(support_xyz.dim() == 3 && support_xyz.size(2) == 3 && query_xyz.dim() == 3 && query_xyz.size(2) == 3 &&
                  support_xyz.size(0) == query_xyz.size(0),
              "ball_query: support_xyz must be (B, N, 3) and query_xyz (B, M, 3), got ", support_xyz.sizes(), " and ",
              query_xyz.sizes());
  TORCH_CHECK(support_xyz.scalar_type() == query_xyz.scalar_type(), "ball_query: support_xyz and query_xyz dtypes ",
              "differ (", support_xyz.scalar_type(), " vs ", query_xyz.scalar_type(), ")");
  TORCH_CHECK_VALUE(nsample >= 0, "ball_query: nsample=", nsample, " must be >= 0");
  const int64_t batch = support_xyz.size(0), num_support = support_xyz.size(1), num_query = query_xyz.size(1);
  const at::Tensor planes = support_xyz.transpose(1, 2).contiguous();  // (B, 3, N)
  const at::Tensor query = query_xyz.contiguous();
  at::Tensor out = at::empty({batch, num_query, nsample}, support_xyz.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "ball_query", [&] {
    // radius² in double, then rounded to the input dtype: what `sq_dist < radius * radius` does in torch.
    const scalar_t r2 = static_cast<scalar_t>(radius * radius);
    const scalar_t* s = planes.const_data_ptr<scalar_t>();
    const scalar_t* q = query.const_data_ptr<scalar_t>();
    int64_t* idx = out.mutable_data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, num_support));
    at::parallel_for(0, batch * num_query, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / num_query;
        const scalar_t* px = s + b * num_support * 3;
        ball_one(px, px + num_support, px + 2 * num_support, num_support, q + row * 3, r2, nsample,
                 idx + row * nsample);
      }
    });
  });
  return out;
}


// Quantizes one relative-position value onto (scale, zero_point) as `torch.quantize_per_tensor`
// does on CPU (fbgemm, non-legacy): zero_point + round-half-even(x * (1/scale)) in float32,
// clamped to [0, 255]; `inv_scale` is 1.0f / float(scale), a product, not a division, like
// fbgemm's (the two round differently on exact halves). Identical for |x / scale| < 2^31; past
// that torch's own result depends on whether the element falls in its vectorised body (an
// int32 conversion that wraps) or its scalar tail, and NaN maps to 0 here.
//
// Rounding: std::nearbyint is a libm call here (x86-64 baseline has no `roundss`) and was
// most of this op's time. Adding and subtracting 1.5 * 2^23 rounds instead: for |v| <= 2^22
// the sum lies where floats are exactly the integers, so the addition rounds v half to even
// (the default rounding mode; -ffp-contract=off and no -ffast-math keep both operations), and
// the subtraction is exact. Larger |v| keeps its sign and a magnitude >= 2^22, so it clamps
// as nearbyint's result would.
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

inline uint8_t quantize_uint8(float x, float inv_scale, float zero_point) {
  const float q = round_half_even(x * inv_scale) + zero_point;
  return q >= 255.0f ? uint8_t{255} : (q > 0.0f ? static_cast<uint8_t>(q) : uint8_t{0});
}

// memcpy of a short row (tens of bytes) in fixed 16-byte pieces, which the compiler inlines as
// vector moves; a memcpy of runtime length is a library call per row (int8 op at B=32, 1 thread:
// 13.1 ms with it, 8.5 ms with this; a plain copy of the output takes 7.4).
inline void copy_bytes(const void* src, int64_t size, void* dst) {
  const char* from = static_cast<const char*>(src);
  char* to = static_cast<char*>(dst);
  int64_t i = 0;
  for (; i + 16 <= size; i += 16) {
    std::memcpy(to + i, from + i, 16);
  }
  for (; i < size; ++i) {
    to[i] = from[i];
  }
}

// One centre's neighbourhood as K rows of (3 + C) values: dp = (neighbour − centre), divided by
// the radius when asked (`dp_fn` then turns it into the output type), then the neighbour's C
// feature values copied whole. Each output value is written once.
template <typename scalar_t, typename out_t, typename DpFn>
void group_one(const scalar_t* support, const scalar_t* centre, const out_t* feats, const int64_t* idx,
               int64_t num_support, int64_t nsample, int64_t channels, bool normalize, scalar_t radius,
               DpFn dp_fn, out_t* out) {
  const int64_t width = 3 + channels;
  for (int64_t k = 0; k < nsample; ++k) {
    const int64_t j = idx[k];
    TORCH_CHECK_INDEX(0 <= j && j < num_support, "group_points: index ", j, " out of range for ", num_support,
                      " support points");
    out_t* row = out + k * width;
    for (int c = 0; c < 3; ++c) {
      scalar_t d = support[3 * j + c] - centre[c];
      if (normalize) {
        d = d / radius;
      }
      row[c] = dp_fn(d);
    }
    copy_bytes(feats + j * channels, channels * sizeof(out_t), row + 3);
  }
}

// Shape checks shared by both grouping ops; returns (B, N, M, K, C).
using GroupSizes = std::array<int64_t, 5>;

GroupSizes group_sizes(const at::Tensor& support_xyz, const at::Tensor& query_xyz,
                                   const at::Tensor& feats, const at::Tensor& idx) {
  TORCH_CHECK(support_xyz.dim() == 3 && support_xyz.size(2) == 3 && query_xyz.dim() == 3 && query_xyz.size(2) == 3 &&
                  feats.dim() == 3 && idx.dim() == 3,
              "group_points: expected support_xyz (B, N, 3), query_xyz (B, M, 3), feats (B, N, C), idx (B, M, K), got ",
              support_xyz.sizes(), ", ", query_xyz.sizes(), ", ", feats.sizes(), ", ", idx.sizes());
  const int64_t batch = support_xyz.size(0), num_support = support_xyz.size(1), num_query = query_xyz.size(1);
  TORCH_CHECK(query_xyz.size(0) == batch && feats.size(0) == batch && feats.size(1) == num_support &&
                  idx.size(0) == batch && idx.size(1) == num_query,
              "group_points: mismatched shapes ", support_xyz.sizes(), ", ", query_xyz.sizes(), ", ", feats.sizes(),
              ", ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "group_points: idx must be int64, got ", idx.scalar_type());
  return {batch, num_support, num_query, idx.size(2), feats.size(2)};
}

// Runs `group_one` over every (batch, centre) pair in parallel.
template <typename scalar_t, typename out_t, typename DpFn>
void group_all_rows(const GroupSizes& sizes, const at::Tensor& support_xyz, const at::Tensor& query_xyz,
                    const at::Tensor& feats, const at::Tensor& idx, bool normalize, double radius, DpFn dp_fn,
                    out_t* out) {
  const auto [batch, num_support, num_query, nsample, channels] = sizes;
  const at::Tensor support = support_xyz.contiguous(), query = query_xyz.contiguous();
  const at::Tensor table = feats.contiguous(), index = idx.contiguous();
  const scalar_t* s = support.const_data_ptr<scalar_t>();
  const scalar_t* q = query.const_data_ptr<scalar_t>();
  const out_t* f = static_cast<const out_t*>(table.const_data_ptr());
  const int64_t* i = index.const_data_ptr<int64_t>();
  const scalar_t r = static_cast<scalar_t>(radius);  // what `dp / radius` rounds the Python float to
  const int64_t row_values = nsample * (3 + channels);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_values));
  at::parallel_for(0, batch * num_query, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / num_query;
      group_one(s + b * num_support * 3, q + row * 3, f + b * num_support * channels, i + row * nsample, num_support,
                nsample, channels, normalize, r, dp_fn, out + row * row_values);
    }
  });
}

// Float grouping, for inference only (no autograd): see `_dp_fj` in models/neighbors.py.
at::Tensor group_points(const at::Tensor& support_xyz, const at::Tensor& query_xyz, const at::Tensor& feats,
                        const at::Tensor& idx, double radius, bool normalize_dp) {
  TORCH_CHECK(support_xyz.scalar_type() == query_xyz.scalar_type() && feats.scalar_type() == query_xyz.scalar_type(),
              "group_points: support_xyz, query_xyz and feats must share one dtype, got ", support_xyz.scalar_type(),
              ", ", query_xyz.scalar_type(), ", ", feats.scalar_type());
  const GroupSizes sizes = group_sizes(support_xyz, query_xyz, feats, idx);
  const auto [batch, num_support, num_query, nsample, channels] = sizes;
  at::Tensor out = at::empty({batch, num_query, nsample, 3 + channels}, feats.options());
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "group_points", [&] {
    group_all_rows<scalar_t, scalar_t>(sizes, support_xyz, query_xyz, feats, idx, normalize_dp, radius,
                                       [](scalar_t d) { return d; }, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// int8 grouping: see `_dp_fj_quantized` in models/neighbors.py, which this replaces bit for bit.
at::Tensor group_points_quantized(const at::Tensor& support_xyz, const at::Tensor& query_xyz, const at::Tensor& feats,
                                  const at::Tensor& idx, double radius, bool normalize_dp, double scale,
                                  int64_t zero_point) {
  TORCH_CHECK(support_xyz.scalar_type() == at::kFloat && query_xyz.scalar_type() == at::kFloat &&
                  feats.scalar_type() == at::kByte,
              "group_points_quantized: expects float32 coordinates and uint8 features, got ",
              support_xyz.scalar_type(), ", ", query_xyz.scalar_type(), ", ", feats.scalar_type());
  TORCH_CHECK_VALUE(0 <= zero_point && zero_point <= 255, "group_points_quantized: zero_point=", zero_point,
                    " must be in [0, 255] (quint8)");
  const GroupSizes sizes = group_sizes(support_xyz, query_xyz, feats, idx);
  const auto [batch, num_support, num_query, nsample, channels] = sizes;
  at::Tensor out = at::_empty_affine_quantized({batch, num_query, nsample, 3 + channels},
                                               support_xyz.options().dtype(at::kQUInt8), scale, zero_point);
  const float inv_scale = 1.0f / static_cast<float>(scale);
  const float zp = static_cast<float>(zero_point);
  group_all_rows<float, uint8_t>(sizes, support_xyz, query_xyz, feats, idx, normalize_dp, radius,
                                 [=](float d) { return quantize_uint8(d, inv_scale, zp); },
                                 reinterpret_cast<uint8_t*>(out.data_ptr<c10::quint8>()));
  return out;
}

}  // namespace
}  // namespace kdqat

TORCH_LIBRARY(kdqat_C, m) {
  m.def("furthest_point_sample(Tensor xyz, int npoint) -> Tensor");
  m.def("ball_query(Tensor support_xyz, Tensor query_xyz, float radius, int nsample) -> Tensor");
  m.def("group_points(Tensor support_xyz, Tensor query_xyz, Tensor feats, Tensor idx, float radius, "
        "bool normalize_dp) -> Tensor");
  m.def("group_points_quantized(Tensor support_xyz, Tensor query_xyz, Tensor feats, Tensor idx, float radius, "
        "bool normalize_dp, float scale, int zero_point) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdqat_C, CPU, m) {
  m.impl("furthest_point_sample", &kdqat::furthest_point_sample);
  m.impl("ball_query", &kdqat::ball_query);
  m.impl("group_points", &kdqat::group_points);
  m.impl("group_points_quantized", &kdqat::group_points_quantized);
}

// `import models._C` only has to load this library (which registers the ops above); it
// defines no Python functions. `torch.ops.load_library` loads the same file without Python.
static struct PyModuleDef kdqat_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kdqat_module); }
