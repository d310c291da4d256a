// Fixed-width float vectors for the native CPU kernels (GCC vector extensions, no intrinsics, so one
// template serves 8 lanes (x86-64-v3, the module's target) and 16 (AVX-512: only ever inlined into
// functions marked GS_AVX512, which the caller picks at run time when the CPU has it).
//
// Rows are head_dim elements of float or bf16 read as vectors c = 0, 1, ... (load), reduced across W
// vectors (reduce_lanes) and written back (store_row).
#pragma once

#include <cstdint>

#include "bf16_cpu.h"

// 64-byte vectors in functions without AVX-512 are only ever inlined into the AVX-512 entry points.
#pragma GCC diagnostic ignored "-Wpsabi"

#define GS_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__)
#define GS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else  // other CPUs: plain code, never called (has_avx512() is false there)
#define GS_AVX512
#endif

namespace gearshift::simd {

// W floats in one register. `u` types may sit at any address (loads/stores of cache rows and scratch).
template <int W>
struct Vec;
template <>
struct Vec<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef float fu __attribute__((vector_size(32), aligned(4)));
  typedef uint16_t hu __attribute__((vector_size(16), aligned(2)));
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
};
template <>
struct Vec<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef float fu __attribute__((vector_size(64), aligned(4)));
  typedef uint16_t hu __attribute__((vector_size(32), aligned(2)));
  typedef uint32_t u __attribute__((vector_size(64)));
  typedef int32_t i __attribute__((vector_size(64)));
};

// Vector c (W lanes) of a row of head_dim elements, widened to fp32. float: elements cW..cW+W-1. bf16 at
// W = 8: the same, by a zero-extend and a 16-bit shift (vpmovzxwd + vpslld). bf16 at W = 16: one unpack
// of the 32 elements around it with zeros (vpunpck{l,h}wd, the bf16 bits becoming each float's high half,
// one instruction where a widening load takes three on GCC 12), which leaves each 32-element group in
// the order of its 128-bit lanes' 4-element runs, even runs first (vector 2k), then odd (2k + 1): q and
// the output accumulators are loaded through the same function, so they are in that order too (dot
// products and sums do not care), and store_row puts the output back in place.
template <int W>
GS_INLINE typename Vec<W>::f load(const float* row, int c) {
  return *reinterpret_cast<const typename Vec<W>::fu*>(row + c * W);
}
template <int W>
GS_INLINE typename Vec<W>::f load(const bf16* row, int c) {
  using V = Vec<W>;
  if constexpr (W == 8) {
    return (typename V::f)(__builtin_convertvector(*reinterpret_cast<const typename V::hu*>(row + c * W),
                                                   typename V::u) << 16);
  } else {
    typedef uint16_t h32 __attribute__((vector_size(64), aligned(2)));
    typedef int16_t m32 __attribute__((vector_size(64)));
    const m32 lo = {0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10, 42, 11, 43,
                    16, 48, 17, 49, 18, 50, 19, 51, 24, 56, 25, 57, 26, 58, 27, 59};
    const m32 hi = lo + 4;
    const h32 x = *reinterpret_cast<const h32*>(row + 32 * (c / 2)), zero = {};
    return (typename V::f)__builtin_shuffle(zero, x, c % 2 ? hi : lo);
  }
}

// x[j] (W lanes each, j < W) -> r with r[j] = sum of x[j]'s lanes: a transpose-add tree, log2(W) levels of
// pairwise unpack + add, instead of W horizontal sums.
GS_INLINE Vec<8>::f reduce_lanes(const Vec<8>::f* x) {
  typedef Vec<8>::i I;
  const I lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
  const I lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const I lo3 = {0, 1, 2, 3, 8, 9, 10, 11}, hi3 = {4, 5, 6, 7, 12, 13, 14, 15};
  Vec<8>::f a[4], b[2];
  for (int k = 0; k < 4; ++k)
    a[k] = __builtin_shuffle(x[2 * k], x[2 * k + 1], lo1) + __builtin_shuffle(x[2 * k], x[2 * k + 1], hi1);
  for (int k = 0; k < 2; ++k)
    b[k] = __builtin_shuffle(a[2 * k], a[2 * k + 1], lo2) + __builtin_shuffle(a[2 * k], a[2 * k + 1], hi2);
  return __builtin_shuffle(b[0], b[1], lo3) + __builtin_shuffle(b[0], b[1], hi3);
}

GS_INLINE Vec<16>::f reduce_lanes(const Vec<16>::f* x) {
  typedef Vec<16>::i I;
  const I lo1 = {0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29};
  const I hi1 = {2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31};
  const I lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const I hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  // 128-bit lanes {0, 2} of each input, then {1, 3}: after two rounds lane L holds keys 4L..4L+3.
  const I lo3 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const I hi3 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  Vec<16>::f a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)
    a[k] = __builtin_shuffle(x[2 * k], x[2 * k + 1], lo1) + __builtin_shuffle(x[2 * k], x[2 * k + 1], hi1);
  for (int k = 0; k < 4; ++k)
    b[k] = __builtin_shuffle(a[2 * k], a[2 * k + 1], lo2) + __builtin_shuffle(a[2 * k], a[2 * k + 1], hi2);
  for (int k = 0; k < 2; ++k)
    c[k] = __builtin_shuffle(b[2 * k], b[2 * k + 1], lo3) + __builtin_shuffle(b[2 * k], b[2 * k + 1], hi3);
  return __builtin_shuffle(c[0], c[1], lo3) + __builtin_shuffle(c[0], c[1], hi3);
}

// dst[0, NV * W) = acc * inv in T, acc in load<W>'s order (so a permuted row lands back in place).
template <int W, int NV, typename T>
GS_INLINE void store_row(T* dst, const float* acc, float inv) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  if constexpr (sizeof(T) == 4) {
    for (int c = 0; c < NV; ++c) *reinterpret_cast<typename Vec<W>::fu*>(dst + c * W) = load<W>(acc, c) * inv;
  } else {
    auto round = [](F x) __attribute__((always_inline)) {  // to nearest even, as gearshift::from_float
      U u = (U)x;
      return u + 0x7FFFu + ((u >> 16) & 1u);  // bf16 bits in the high half
    };
    if constexpr (W == 8) {
      for (int c = 0; c < NV; ++c)
        *reinterpret_cast<typename Vec<8>::hu*>(dst + 8 * c) =
            __builtin_convertvector(round(load<8>(acc, c) * inv) >> 16, typename Vec<8>::hu);
    } else {  // the inverse of load<16>'s unpacks: each 128-bit lane takes 4 high halves of each of a pair
      typedef uint16_t h32 __attribute__((vector_size(64)));
      typedef uint16_t h32u __attribute__((vector_size(64), aligned(2)));
      typedef int16_t m32 __attribute__((vector_size(64)));
      const m32 pick = {1,  3,  5,  7,  33, 35, 37, 39, 9,  11, 13, 15, 41, 43, 45, 47,
                        17, 19, 21, 23, 49, 51, 53, 55, 25, 27, 29, 31, 57, 59, 61, 63};
      for (int c = 0; c < NV; c += 2)
        *reinterpret_cast<h32u*>(dst + 16 * c) = __builtin_shuffle((h32)round(load<16>(acc, c) * inv),
                                                                   (h32)round(load<16>(acc, c + 1) * inv), pick);
    }
  }
}

// An fp32 row (q, or the output) beside a cache of element type T: vector c of the row in the lane order
// load<W>(const T*) gives cache rows, so dot products and accumulators line up lane by lane. Only bf16 at
// W = 16 permutes (see load): vector 2k holds elements {0-3, 8-11, 16-19, 24-27} of the 32-element
// group k, vector 2k + 1 the same plus 4.
template <int W, typename T>
GS_INLINE typename Vec<W>::f load_in_order_of(const float* row, int c) {
  if constexpr (W == 8 || sizeof(T) == 4) {
    return load<W>(row, c);
  } else {
    typedef Vec<16>::i I;
    const I even = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}, odd = even + 4;
    const Vec<16>::f x0 = load<16>(row + 32 * (c / 2), 0), x1 = load<16>(row + 32 * (c / 2), 1);
    return __builtin_shuffle(x0, x1, c % 2 ? odd : even);
  }
}

// dst[0, NV * W) = acc * inv in fp32, acc in load_in_order_of<W, T>'s order (put back in place).
template <int W, int NV, typename T>
GS_INLINE void store_row_in_order_of(float* dst, const float* acc, float inv) {
  if constexpr (W == 8 || sizeof(T) == 4) {
    store_row<W, NV, float>(dst, acc, inv);
  } else {  // the inverse of load_in_order_of: runs of 4 alternate between the even and the odd vector
    typedef Vec<16>::i I;
    typedef Vec<16>::fu FU;
    const I first = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23}, second = first + 8;
    for (int c = 0; c < NV; c += 2) {
      const Vec<16>::f e = load<16>(acc, c) * inv, o = load<16>(acc, c + 1) * inv;
      *reinterpret_cast<FU*>(dst + 16 * c) = __builtin_shuffle(e, o, first);
      *reinterpret_cast<FU*>(dst + 16 * c + 16) = __builtin_shuffle(e, o, second);
    }
  }
}

}  // namespace gearshift::simd
