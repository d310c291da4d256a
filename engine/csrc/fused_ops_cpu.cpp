// Fused elementwise ops of the Llama block on CPU, fp32, and the module's Python bindings.
//
// Why: at decode batch sizes each torch op costs more in dispatch and memory passes than in arithmetic
// (SmolLM2: [64, 576] activations; F.rms_norm took ~105 us a call, SiLU and the SwiGLU product ~3.5 s of a
// 55 s benchmark). Each op here is one pass over its rows, parallel over rows only when there are enough.
//
// add_rms_norm_(x [T, D], delta [T, D], w [D], eps) -> [T, D]   x += delta (in place), returns rmsnorm(x) * w
// rms_norm(x [T, D], w [D], eps) -> [T, D]
// silu_mul(gate_up [T, 2F]) -> [T, F]                           silu(gate) * up, gate = first F columns
// rope_(x [T, H, D], cos [T, D/2], sin [T, D/2])                NeoX rotation of pairs (i, i + D/2), in place
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                  at::Tensor& out, double scale, int64_t window);

namespace {

constexpr int64_t kParallelFloats = 1 << 15;  // below this much work a row loop stays on one thread

int64_t grain(int64_t floats_per_row) { return std::max<int64_t>(1, kParallelFloats / std::max<int64_t>(1, floats_per_row)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() >= 2 && t.stride(-1) == 1, name, " needs a contiguous last dimension");
}

inline void norm_row(const float* __restrict x, const float* __restrict w, float* __restrict out, int64_t d,
                     float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] = x[i] * inv * w[i];
}

}  // namespace

at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(delta, "delta");
  TORCH_CHECK(x.dim() == 2 && delta.sizes() == x.sizes() && weight.numel() == x.size(1), "shapes");
  const int64_t t = x.size(0), d = x.size(1), xs = x.stride(0), ds = delta.stride(0);
  auto out = at::empty({t, d}, x.options());
  float* xp = x.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.contiguous().data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, t, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = xp + r * xs;
      const float* add = dp + r * ds;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) row[i] += add[i];
      norm_row(row, wp, op + r * d, d, e);
    }
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && weight.numel() == x.size(1), "shapes");
  const int64_t t = x.size(0), d = x.size(1), xs = x.stride(0);
  auto out = at::empty({t, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.contiguous().data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * xs, wp, op + r * d, d, static_cast<float>(eps));
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2F]");
  const int64_t t = gate_up.size(0), f = gate_up.size(1) / 2, gs = gate_up.stride(0);
  auto out = at::empty({t, f}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t, grain(2 * f), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = gp + r * gs;
      const float* u = g + f;
      float* o = op + r * f;
#pragma omp simd
      for (int64_t i = 0; i < f; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1, "x must be fp32 [T, H, D]");
  const int64_t t = x.size(0), h = x.size(1), half = x.size(2) / 2;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.dim() == 2 && cos.size(0) == t && cos.size(1) == half &&
              cos.sizes() == sin.sizes() && cos.stride(1) == 1 && sin.stride(1) == 1, "cos/sin must be fp32 [T, D/2]");
  const int64_t s0 = x.stride(0), s1 = x.stride(1), cs = cos.stride(0), ss = sin.stride(0);
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, t, grain(h * 2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cp + r * cs;
      const float* s = sp + r * ss;
      for (int64_t head = 0; head < h; ++head) {
        float* a = xp + r * s0 + head * s1;
        float* b = a + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = a[i], x2 = b[i];
          a[i] = x1 * c[i] - x2 * s[i];
          b[i] = x2 * c[i] + x1 * s[i];
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (fp32)");
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta; return rmsnorm(x) * w (fp32)");
  m.def("rms_norm", &rms_norm, "rmsnorm(x) * w (fp32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up from [T, 2F] (fp32)");
  m.def("rope_", &rope_, "NeoX rotary embedding in place (fp32)");
}
