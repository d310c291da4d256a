// Per-token int8 activation quantization around ATen's int8 GEMMs (oneDNN's pre-packed linear, torch._int_mm),
// for --quantization int8.
//
// Why: with eager torch ops a per-token int8 matmul is ~8 dispatched ops (abs, amax, clamp, div, mul,
// round, cast, the GEMM, two multiplies) and as many passes over memory; measured on the 2-core EPYC VM
// they cost ~5x the GEMM itself at a 32-row decode step. Here the quantization is one pass per row (max
// |x|, then the rounding, while the row is in L1) and the dequantization one pass over the int32 result,
// and `int8_linear` runs all three from C++ (one Python dispatch a matmul).
//
// quantize_rows_int8(x [M, K]) -> (xq int8 [M, K], amax fp32 [M, 1])
//     amax = max(max_k |x[m, k]|, 1e-12), xq = round_half_even(x * (127 / amax)); x ~ xq * amax / 127
// dequant_int32(acc int32 [M, N], row [M, 1] fp32, col [N] fp32, bias [N] fp32 or None) -> fp32 [M, N]
//     acc * (row[m] * col[n]) (+ bias[n])
// int8_linear_packed(x, packed, col, bias, unit_scales [N] = 1, zero_points [N] = 0) -> fp32 [M, N]
//     the same with oneDNN's u8 x s8 linear on a weight pre-packed by onednn.qlinear_prepack (xq + 128 as u8,
//     zero point 128); its fp32 sums are scaled as above, so a row's result is the same on either GEMM
// int8_linear(x [M, K], qt int8 [K, N], col [N] fp32, bias or None) -> fp32 [M, N]
//     dequant_int32(_int_mm(xq, qt), amax, col, bias) with (xq, amax) = quantize_rows_int8(x); col carries
//     the weight's per-output-channel scale and the activations' 1/127 (quant_int8.Int8PerTokenWeight)
// Without a bias each result equals the torch expression it replaces (quant_int8.py's fallbacks) bit for bit.
// x: fp32 or bf16 (widened to fp32 by bf16_cpu.h), last dimension contiguous.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bf16_cpu.h"

using gearshift::bf16;
using gearshift::data_as;
using gearshift::to_float;

namespace {

// Below this many elements a row loop stays on one thread: waking the pool costs more than the pass (with
// passive OpenMP waiting, tens of us; py-spy at a 32-row decode step put ~4% of it in these forks at 1 << 15).
constexpr int64_t kParallelElems = 1 << 18;
constexpr float kMinAbsmax = 1e-12f;         // an all-zero row: scale stays finite, xq = 0

int64_t rows_grain(int64_t per_row) { return std::max<int64_t>(1, kParallelElems / std::max<int64_t>(1, per_row)); }

// Q = int8_t (offset 0) or uint8_t (offset 128: oneDNN's u8 source with zero point 128, the same values).
template <typename T, typename Q, int kOffset>
inline void quantize_row(const T* __restrict x, Q* __restrict q, float* __restrict amax_out, int64_t k) {
  float amax = 0.f;
#pragma omp simd reduction(max : amax)
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(to_float(x[i])));
  amax = std::max(amax, kMinAbsmax);
  // As torch computes x.mul(127.0 / amax): its scalar-over-tensor division is reciprocal() * 127, two
  // roundings; `volatile` keeps -ffast-math from folding them into one division (bit-identical to the
  // torch fallback; a one-ulp difference in the scale moves values that sit near a rounding tie).
  volatile float reciprocal = 1.f / amax;
  const float inv = reciprocal * 127.f;
#pragma omp simd
  for (int64_t i = 0; i < k; ++i)
    q[i] = static_cast<Q>(static_cast<int32_t>(std::nearbyint(to_float(x[i]) * inv)) + kOffset);
  *amax_out = amax;
}

template <typename T, typename Q, int kOffset>
void quantize_rows(const at::Tensor& x, at::Tensor& xq, at::Tensor& amax) {
  const int64_t m = x.size(0), k = x.size(1), xs = x.stride(0);
  const T* xp = data_as<T>(x);
  Q* qp = reinterpret_cast<Q*>(xq.data_ptr());
  float* ap = amax.data_ptr<float>();
  at::parallel_for(0, m, rows_grain(k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) quantize_row<T, Q, kOffset>(xp + r * xs, qp + r * k, ap + r, k);
  });
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1,
              "x must be a CPU [M, K] tensor with K contiguous");
}

void check_vector(const at::Tensor& v, int64_t n, const char* name) {
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.numel() == n && v.is_contiguous(), name, " must be ", n,
              " contiguous float32 values");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& x, bool offset_u8) {
  check_x(x);
  auto xq = at::empty({x.size(0), x.size(1)}, x.options().dtype(offset_u8 ? at::kByte : at::kChar));
  auto amax = at::empty({x.size(0), 1}, x.options().dtype(at::kFloat));
  gearshift::dispatch_float_bf16(x, "x", [&](auto tag) {
    using T = decltype(tag);
    if (offset_u8) {
      quantize_rows<T, uint8_t, 128>(x, xq, amax);
    } else {
      quantize_rows<T, int8_t, 0>(x, xq, amax);
    }
  });
  return {xq, amax};
}

namespace {

// out[m, n] = acc[m, n] * (row[m] * col[n]) (+ bias[n]); out may alias acc (same size, each element read
// before it is written). With a bias the multiply-add may be one FMA: within an ulp of torch's two ops.
// A = int32_t (torch._int_mm's result) or float (oneDNN's, the same sums converted to fp32 as torch converts
// an int32 tensor multiplied by a float one: so both GEMMs give a row bit-identical results).
template <typename A>
void dequant_rows(const at::Tensor& acc, const at::Tensor& row, const at::Tensor& col,
                  const c10::optional<at::Tensor>& bias, float* op) {
  TORCH_CHECK(acc.scalar_type() == (sizeof(A) == 4 && std::is_integral<A>::value ? at::kInt : at::kFloat) &&
              acc.dim() == 2 && acc.is_contiguous(), "acc must be contiguous [M, N] int32 (or float32 sums)");
  const int64_t m = acc.size(0), n = acc.size(1);
  check_vector(row, m, "row");
  check_vector(col, n, "col");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_vector(*bias, n, "bias");
  const A* ip = reinterpret_cast<const A*>(acc.data_ptr());
  const float* rp = row.data_ptr<float>();
  const float* cp = col.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, m, rows_grain(n), [&](int64_t begin, int64_t end) {
    // rs * col[n] is stored before it multiplies: -ffast-math would otherwise reassociate the product into
    // (acc * col) * rs, a last-bit difference from torch's acc * (amax * col) (and between the two GEMMs).
    std::vector<float> scale(static_cast<size_t>(n));
    float* sc = scale.data();
    for (int64_t r = begin; r < end; ++r) {
      const A* a = ip + r * n;
      float* o = op + r * n;
      const float rs = rp[r];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) sc[j] = rs * cp[j];
      if (bp) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(a[j]) * sc[j] + bp[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<float>(a[j]) * sc[j];
      }
    }
  });
}

}  // namespace

at::Tensor dequant_int32(const at::Tensor& acc, const at::Tensor& row, const at::Tensor& col,
                         const c10::optional<at::Tensor>& bias) {
  auto out = at::empty(acc.sizes(), acc.options().dtype(at::kFloat));
  dequant_rows<int32_t>(acc, row, col, bias, out.data_ptr<float>());
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qt, const at::Tensor& col,
                       const c10::optional<at::Tensor>& bias) {
  check_x(x);
  TORCH_CHECK(qt.scalar_type() == at::kChar && qt.dim() == 2 && qt.size(0) == x.size(1), "qt must be int8 [K, N]");
  auto [xq, amax] = quantize_rows_int8(x, false);
  at::Tensor acc = at::_int_mm(xq, qt);  // int32 [M, N]
  // Dequantized in place, into the GEMM's own buffer: a prefill-sized result is megabytes, and a second
  // fresh buffer costs its page faults on every call.
  dequant_rows<int32_t>(acc, amax, col, bias, reinterpret_cast<float*>(acc.data_ptr<int32_t>()));
  return acc.view(at::kFloat);
}

at::Tensor int8_linear_packed(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& col,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& unit_scales,
                              const at::Tensor& zero_points) {
  check_x(x);
  auto [xq, amax] = quantize_rows_int8(x, true);
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "");
  // qx, x_scale 1, x_zero_point 128, qw, w_scale 1 (unit_scales [N]), w_zero_point 0: the plain sums in fp32;
  // no bias (it follows the scaling), output scale 1 / zero point 0 in fp32, no post-op.
  torch::jit::Stack stack{xq, 1.0, int64_t{128}, packed, unit_scales, zero_points, c10::IValue(), 1.0, int64_t{0},
                          c10::IValue(at::kFloat), std::string("none"), c10::List<c10::optional<at::Scalar>>(),
                          std::string("")};
  op.callBoxed(&stack);
  at::Tensor acc = stack[0].toTensor();  // fp32 [M, N]
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == x.size(0), "unexpected oneDNN int8 linear output");
  dequant_rows<float>(acc, amax, col, bias, acc.data_ptr<float>());  // in place
  return acc;
}

void register_quant_ops(pybind11::module_& m) {
  m.def("quantize_rows_int8", &quantize_rows_int8, "per-row absmax int8 quantization (fp32 or bf16 x)",
        pybind11::arg("x"), pybind11::arg("offset_u8") = false);
  m.def("int8_linear_packed", &int8_linear_packed,
        "per-token int8 x @ oneDNN-prepacked int8 weight (onednn.qlinear_prepack) -> fp32, scales applied",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("col"), pybind11::arg("bias"),
        pybind11::arg("unit_scales"), pybind11::arg("zero_points"));
  m.def("dequant_int32", &dequant_int32, "int32 [M, N] * row [M] * col [N] (+ bias) -> fp32");
  m.def("int8_linear", &int8_linear, "per-token int8 x @ int8 weight [K, N] -> fp32, scales applied");
}
