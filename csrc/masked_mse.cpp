// The masked patch loss on CPU: torch.ops.sslam_fast_C.masked_mse and masked_mse_backward (ALGORITHM §4, §5.4).
//
// Forward: loss = sum over rows r, tokens n with mask[r, n], channels d of (pred[r, n, d] - target[r / clones, n, d])^2,
// times 1 / sqrt(D); fp32 0-dim. Backward: grad_pred = mask ? (pred - target) * (2 / sqrt(D) * grad) : 0, (R, N, D)
// contiguous in pred's dtype (the gradient of target is formed from it in Python).
//
// No gather and no repeat-interleave: row r reads target row r / clones in place, and unmasked tokens are never read
// (a NaN there does not reach the loss or the gradient), as in upstream, which gathers the masked tokens first.
//
// Summation order. Each token's D squares are summed in float with 2 x 8 lanes (GNU vector extensions; D = 64 to 768
// here, so each lane adds at most ~50 terms), each token sum is added to its row's double total, and the row totals
// are added in row order at the end: the result does not depend on the thread count or the chunking, and it is more
// accurate than float32 sums of the whole tensor.
//
// Inputs: pred (R, N, D) float32 / float16 / bfloat16 with any strides over R and N (a non-unit channel stride is
// copied first); target (B, N, D), R = B * clones, any of the three dtypes (read as float32: converted first when it
// is not); mask (R, N) bool, any strides. The loops are memory-bound (two loads and one FMA an element), so they are
// compiled once, for the baseline instruction set.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "simd.h"

namespace sslam_fast {
namespace {

constexpr int kLanes = 8;
using Vec8 = VecF<kLanes>;  // csrc/simd.h
// Elements per parallel chunk: smaller problems run on the calling thread (an OpenMP fork/join costs ~5-10 us).
constexpr int64_t kGrainElems = 1 << 16;

// sum_d (p[d] - t[d])^2.
template <typename T>
SSLAM_INLINE float token_sum(const T* __restrict p, const float* __restrict t, int64_t D) {
  Vec8 a0 = {}, a1 = {};
  int64_t d = 0;
  for (; d + 2 * kLanes <= D; d += 2 * kLanes) {
    const Vec8 e0 = vload<kLanes>(p + d) - vload<kLanes>(t + d);
    const Vec8 e1 = vload<kLanes>(p + d + kLanes) - vload<kLanes>(t + d + kLanes);
    a0 += e0 * e0;
    a1 += e1 * e1;
  }
  if (d + kLanes <= D) {
    const Vec8 e0 = vload<kLanes>(p + d) - vload<kLanes>(t + d);
    a0 += e0 * e0;
    d += kLanes;
  }
  float tail = 0.0f;
  for (; d < D; ++d) {
    const float e = to_float(p[d]) - t[d];
    tail += e * e;
  }
  return hsum<kLanes>(a0 + a1) + tail;
}

struct Layout {
  int64_t N, D, clones;
  int64_t p_sr, p_sn, t_sr, t_sn, m_sr, m_sn;
};

template <typename T>
double forward(const T* pred, const float* target, const uint8_t* mask, int64_t R, const Layout& l) {
  std::vector<double> row_total(R, 0.0);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, l.N * l.D));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* pr = pred + r * l.p_sr;
      const float* tr = target + (r / l.clones) * l.t_sr;
      const uint8_t* mr = mask + r * l.m_sr;
      double total = 0.0;
      for (int64_t n = 0; n < l.N; ++n) {
        if (mr[n * l.m_sn]) total += token_sum(pr + n * l.p_sn, tr + n * l.t_sn, l.D);
      }
      row_total[r] = total;
    }
  });
  double total = 0.0;
  for (int64_t r = 0; r < R; ++r) total += row_total[r];
  return total;
}

template <typename T>
void backward(float c, const T* pred, const float* target, const uint8_t* mask, T* out, int64_t R, const Layout& l) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, l.N * l.D));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* pr = pred + r * l.p_sr;
      const float* tr = target + (r / l.clones) * l.t_sr;
      const uint8_t* mr = mask + r * l.m_sr;
      for (int64_t n = 0; n < l.N; ++n) {
        T* __restrict o = out + (r * l.N + n) * l.D;
        if (!mr[n * l.m_sn]) {
          std::fill(o, o + l.D, T(0.0f));
          continue;
        }
        const T* __restrict p = pr + n * l.p_sn;
        const float* __restrict t = tr + n * l.t_sn;
#pragma omp simd
        for (int64_t d = 0; d < l.D; ++d) o[d] = static_cast<T>((to_float(p[d]) - t[d]) * c);
      }
    }
  });
}

// Validates the arguments; returns pred with a unit channel stride, target as float32 with a unit channel stride.
void prepare(const char* op, const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& mask,
             int64_t clones, at::Tensor& pred, at::Tensor& target, Layout& l) {
  for (const auto* t : {&pred_in, &target_in, &mask}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": expected CPU tensors, got one on ", t->device());
  }
  TORCH_CHECK(pred_in.dim() == 3, op, ": pred must be (R, N, D), got ", pred_in.dim(), " dims");
  TORCH_CHECK(target_in.dim() == 3, op, ": target must be (B, N, D), got ", target_in.dim(), " dims");
  const auto pt = pred_in.scalar_type(), tt = target_in.scalar_type();
  TORCH_CHECK(pt == at::kFloat || pt == at::kHalf || pt == at::kBFloat16, op,
              ": pred must be float32, float16 or bfloat16, got ", pt);
  TORCH_CHECK(tt == at::kFloat || tt == at::kHalf || tt == at::kBFloat16, op,
              ": target must be float32, float16 or bfloat16, got ", tt);
  const int64_t R = pred_in.size(0), N = pred_in.size(1), D = pred_in.size(2);
  check_size(op, "clones", clones, 1);
  // The loss divides by sqrt(D): with no channel the sum is 0 and the result 0 * inf = NaN.
  TORCH_CHECK(D >= 1, op, ": pred must have at least one channel (D >= 1), got shape ", pred_in.sizes());
  // B * clones with overflow detection: a wrapped product could equal R and pass the shape check.
  int64_t rows = 0;
  const bool overflow = c10::mul_overflows(target_in.size(0), clones, &rows);
  TORCH_CHECK(!overflow && target_in.size(1) == N && target_in.size(2) == D && rows == R, op,
              ": target must have shape (R / clones, N, D) = (", R / clones, ", ", N, ", ", D, ") for pred ",
              pred_in.sizes(), " and clones ", clones, ", got ", target_in.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == R && mask.size(1) == N, op, ": mask must have shape (", R, ", ", N,
              "), got ", mask.sizes());
  pred = (pred_in.stride(2) == 1 || D == 1) ? pred_in : pred_in.contiguous();
  target = target_in.to(at::kFloat);
  if (target.stride(2) != 1 && D != 1) target = target.contiguous();
  l = Layout{N, D, clones, pred.stride(0), pred.stride(1), target.stride(0), target.stride(1), mask.stride(0),
             mask.stride(1)};
}

at::Tensor masked_mse_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& mask,
                          int64_t clones) {
  at::Tensor pred, target;
  Layout l;
  prepare("masked_mse", pred_in, target_in, mask, clones, pred, target, l);
  const int64_t R = pred.size(0);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const float* t = target.const_data_ptr<float>();
  double total = 0.0;
  if (pred.numel() > 0) {
    switch (pred.scalar_type()) {
      case at::kFloat:
        total = forward(pred.const_data_ptr<float>(), t, m, R, l);
        break;
      case at::kHalf:
        total = forward(pred.const_data_ptr<c10::Half>(), t, m, R, l);
        break;
      default:
        total = forward(pred.const_data_ptr<c10::BFloat16>(), t, m, R, l);
        break;
    }
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(l.D));
  return at::scalar_tensor(static_cast<float>(total * scale), at::TensorOptions().dtype(at::kFloat));
}

at::Tensor masked_mse_backward_cpu(const at::Tensor& grad, const at::Tensor& pred_in, const at::Tensor& target_in,
                                   const at::Tensor& mask, int64_t clones) {
  at::Tensor pred, target;
  Layout l;
  prepare("masked_mse_backward", pred_in, target_in, mask, clones, pred, target, l);
  TORCH_CHECK(grad.numel() == 1 && grad.device().is_cpu(), "masked_mse_backward: grad must be a CPU scalar, got ",
              grad.sizes(), " on ", grad.device());
  at::Tensor out = at::empty(pred.sizes(), pred.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  // As the reference rounds it: float32(2 / sqrt(D)) * grad, in float32.
  const float c = static_cast<float>(2.0 / std::sqrt(static_cast<double>(l.D))) * grad.item<float>();
  const int64_t R = pred.size(0);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const float* t = target.const_data_ptr<float>();
  switch (pred.scalar_type()) {
    case at::kFloat:
      backward(c, pred.const_data_ptr<float>(), t, m, out.mutable_data_ptr<float>(), R, l);
      break;
    case at::kHalf:
      backward(c, pred.const_data_ptr<c10::Half>(), t, m, out.mutable_data_ptr<c10::Half>(), R, l);
      break;
    default:
      backward(c, pred.const_data_ptr<c10::BFloat16>(), t, m, out.mutable_data_ptr<c10::BFloat16>(), R, l);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sslam_fast_C, m) {
  m.def("masked_mse(Tensor pred, Tensor target, Tensor mask, int clones) -> Tensor");
  m.def("masked_mse_backward(Tensor grad, Tensor pred, Tensor target, Tensor mask, int clones) -> Tensor");
}

TORCH_LIBRARY_IMPL(sslam_fast_C, CPU, m) {
  m.impl("masked_mse", &masked_mse_cpu);
  m.impl("masked_mse_backward", &masked_mse_backward_cpu);
}

}  // namespace sslam_fast
