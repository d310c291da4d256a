// bf16 <-> fp32 for the native CPU kernels, by bit shifts: the build targets x86-64-v3 (AVX2), which has no
// bf16 instructions, and these loops vectorize to AVX2 shifts and adds. Rounding is to nearest even, as
// torch's own casts round (NaN payloads are not preserved: the module builds with -ffast-math anyway).
//
// Kernels are templates over the element type T: `float` (the fp32 path, where load/store/round are the
// identity, so its arithmetic is exactly what it was before bf16) or `bf16` (16-bit storage, fp32 math).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace gearshift {

struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 is 16 bits");

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline bf16 from_float<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16{uint16_t(u >> 16)};
}

// f rounded to T and back: the value a T tensor would hold (the identity for float).
template <typename T>
inline float round_to(float f) { return to_float(from_float<T>(f)); }

// The tensor's data as T (float: kFloat, bf16: kBFloat16; the caller has checked the dtype).
template <typename T>
inline T* data_as(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

template <typename T>
constexpr at::ScalarType scalar_type_of() { return sizeof(T) == 4 ? at::kFloat : at::kBFloat16; }

// Calls fn(T{}) with T = float or bf16 as `t` holds; any other dtype is refused with `what`.
template <typename Fn>
decltype(auto) dispatch_float_bf16(const at::Tensor& t, const char* what, Fn fn) {
  if (t.scalar_type() == at::kFloat) return fn(float{});
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, what, " must be float32 or bfloat16, got ", t.scalar_type());
  return fn(bf16{});
}

}  // namespace gearshift
