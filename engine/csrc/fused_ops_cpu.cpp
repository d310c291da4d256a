// Fused elementwise ops of the Llama block on CPU, fp32 or bf16, and the module's Python bindings.
//
// Why: at decode batch sizes each torch op costs more in dispatch and memory passes than in arithmetic
// (SmolLM2: [64, 576] activations; F.rms_norm took ~105 us a call, SiLU and the SwiGLU product ~3.5 s of a
// 55 s benchmark; the bf16 int4 path paid ~2.6 of its ~6.7 ms a token in such ops). Each op here is one
// pass over its rows, parallel over rows only when there are enough. bf16 tensors are computed in fp32
// and rounded once on store (bf16_cpu.h); every tensor of one call has the same dtype.
//
// add_rms_norm_(x [T, D], delta [T, D], w [D], eps) -> [T, D]   x += delta (in place), returns rmsnorm(x) * w
// rms_norm(x [T, D], w [D], eps) -> [T, D]
// silu_mul(gate_up [T, 2F]) -> [T, F]                           silu(gate) * up, gate = first F columns
// rope_(x [T, H, D], cos [T, D/2], sin [T, D/2])                NeoX rotation of pairs (i, i + D/2), in place
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "bf16_cpu.h"

using gearshift::bf16;
using gearshift::data_as;
using gearshift::from_float;
using gearshift::to_float;

void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                  at::Tensor& out, double scale, int64_t window);
void register_quant_ops(pybind11::module_& m);  // quant_cpu.cpp: per-token int8 matmul ops

namespace {

constexpr int64_t kParallelFloats = 1 << 15;  // below this much work a row loop stays on one thread

int64_t grain(int64_t floats_per_row) { return std::max<int64_t>(1, kParallelFloats / std::max<int64_t>(1, floats_per_row)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2 && t.stride(-1) == 1, name, " needs a contiguous last dimension");
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name, " must have the dtype of x (", a.scalar_type(), "), got ",
              b.scalar_type());
}

// out = x * rsqrt(mean(x^2) + eps) * w. bf16: the normalized x is rounded to bf16 before the weight
// multiplies it, as the torch path (and HF) do: weight * x_normalized.to(bf16).
template <typename T>
inline void norm_row(const T* __restrict x, const T* __restrict w, T* __restrict out, int64_t d, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += to_float(x[i]) * to_float(x[i]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i)
    out[i] = from_float<T>(gearshift::round_to<T>(to_float(x[i]) * inv) * to_float(w[i]));
}

template <typename T>
void add_rms_norm_rows(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, at::Tensor& out, float eps) {
  const int64_t t = x.size(0), d = x.size(1), xs = x.stride(0), ds = delta.stride(0);
  T* xp = data_as<T>(x);
  const T* dp = data_as<T>(delta);
  const T* wp = data_as<T>(weight);
  T* op = data_as<T>(out);
  at::parallel_for(0, t, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = xp + r * xs;
      const T* add = dp + r * ds;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) row[i] = from_float<T>(to_float(row[i]) + to_float(add[i]));
      norm_row(row, wp, op + r * d, d, eps);
    }
  });
}

template <typename T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, float eps) {
  const int64_t t = x.size(0), d = x.size(1), xs = x.stride(0);
  const T* xp = data_as<T>(x);
  const T* wp = data_as<T>(weight);
  T* op = data_as<T>(out);
  at::parallel_for(0, t, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * xs, wp, op + r * d, d, eps);
  });
}

template <typename T>
void silu_mul_rows(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t t = gate_up.size(0), f = gate_up.size(1) / 2, gs = gate_up.stride(0);
  const T* gp = data_as<T>(gate_up);
  T* op = data_as<T>(out);
  at::parallel_for(0, t, grain(2 * f), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * gs;
      const T* u = g + f;
      T* o = op + r * f;
#pragma omp simd
      for (int64_t i = 0; i < f; ++i) {
        const float gi = to_float(g[i]);
        o[i] = from_float<T>(gi / (1.f + std::exp(-gi)) * to_float(u[i]));
      }
    }
  });
}

template <typename T>
void rope_rows(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t t = x.size(0), h = x.size(1), half = x.size(2) / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1), cs = cos.stride(0), ss = sin.stride(0);
  T* xp = data_as<T>(x);
  const T* cp = data_as<T>(cos);
  const T* sp = data_as<T>(sin);
  at::parallel_for(0, t, grain(h * 2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cp + r * cs;
      const T* s = sp + r * ss;
      for (int64_t head = 0; head < h; ++head) {
        T* a = xp + r * s0 + head * s1;
        T* b = a + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_float(a[i]), x2 = to_float(b[i]), ci = to_float(c[i]), si = to_float(s[i]);
          a[i] = from_float<T>(x1 * ci - x2 * si);
          b[i] = from_float<T>(x2 * ci + x1 * si);
        }
      }
    }
  });
}

}  // namespace

at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(delta, "delta");
  check_same_dtype(x, delta, "delta");
  check_same_dtype(x, weight, "weight");
  TORCH_CHECK(x.dim() == 2 && delta.sizes() == x.sizes() && weight.numel() == x.size(1), "shapes");
  const at::Tensor w = weight.contiguous();
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  gearshift::dispatch_float_bf16(x, "x", [&](auto tag) {
    add_rms_norm_rows<decltype(tag)>(x, delta, w, out, static_cast<float>(eps));
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_same_dtype(x, weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.numel() == x.size(1), "shapes");
  const at::Tensor w = weight.contiguous();
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  gearshift::dispatch_float_bf16(x, "x", [&](auto tag) {
    rms_norm_rows<decltype(tag)>(x, w, out, static_cast<float>(eps));
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2F]");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  gearshift::dispatch_float_bf16(gate_up, "gate_up", [&](auto tag) { silu_mul_rows<decltype(tag)>(gate_up, out); });
  return out;
}

void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [T, H, D] with D contiguous");
  const int64_t t = x.size(0), half = x.size(2) / 2;
  check_same_dtype(x, cos, "cos");
  check_same_dtype(x, sin, "sin");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == t && cos.size(1) == half && cos.sizes() == sin.sizes() &&
              cos.stride(1) == 1 && sin.stride(1) == 1, "cos/sin must be [T, D/2]");
  gearshift::dispatch_float_bf16(x, "x", [&](auto tag) { rope_rows<decltype(tag)>(x, cos, sin); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (fp32 or bf16 cache)");
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta; return rmsnorm(x) * w (fp32 or bf16)");
  m.def("rms_norm", &rms_norm, "rmsnorm(x) * w (fp32 or bf16)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up from [T, 2F] (fp32 or bf16)");
  m.def("rope_", &rope_, "NeoX rotary embedding in place (fp32 or bf16)");
  register_quant_ops(m);
}
