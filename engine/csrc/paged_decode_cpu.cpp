// Paged decode attention on CPU: one pass over each sequence's K and V, read in place from the paged
// cache (no gather copy, no padding, no mask). fp32, or bf16 (the dtype of the int4 path and of CPUs with
// native bf16): bf16 K/V rows are widened to fp32 as they are loaded, scores, softmax and the output are
// fp32, the output is rounded to bf16 once. Parallel over sequences (or sequence x kv head) with ATen's own
// thread pool (the same OpenMP team as every other op, so threads never fight a second runtime).
//
// q            [T, Hq, D]   fp32 or bf16 (out in the same dtype; the caches too, or bf16 under fp32 q:
//                           --quantization int8's fp32 activations over half the K/V bytes), head_dim
//                           contiguous; this step's queries (decode rows picked by `rows`)
// k/v_cache    [num_blocks, block_size, Hkv, D], contiguous
// block_tables [B, max_blocks] int32 (B = decode sequences)
// seq_lens     [B] int32: context length including this step's token (already written to the cache)
// rows         [B] int64: each sequence's row in q / out
// out          [T, Hq, D]; only the `rows` rows are written
// window       sliding window (0: none): a query at position p sees keys p - window < j <= p
//
// Why it is shaped this way (the kernel is instruction-bound, not memory-bound, when written naively):
// each K and V row is loaded and widened once and used by all the query heads that share its KV head
// (GQA); a key's dot products stay W-lane vectors until W keys are done, then one transpose-add tree
// turns W vectors into W scores (no horizontal sum per score). W = 16 (AVX-512, chosen at run time when
// the CPU has it: the module itself targets x86-64-v3) or 8 (simd_cpu.h). Head dims without a vector
// kernel (GS_VEC_DIMS) take a plain loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "bf16_cpu.h"
#include "simd_cpu.h"

using gearshift::bf16;
using gearshift::simd::load;
using gearshift::simd::reduce_lanes;
using gearshift::simd::store_row;
using gearshift::simd::Vec;
using gearshift::data_as;
using gearshift::to_float;

namespace {

// The largest divisor of n that is <= cap (register blocking along head_dim without a remainder loop).
constexpr int chunk(int n, int cap) { return cap <= 1 ? 1 : (n % cap == 0 ? cap : chunk(n, cap - 1)); }

// scores of G query heads (q: [G][NV * W], pre-scaled) against n <= W keys of one KV head (key j at
// key0 + j * stride): out[g * out_stride + j]. Each key is loaded and widened once for all G heads.
template <int W, int NV, int G, typename T>
GS_INLINE void scores_tile(const float* __restrict q, const T* __restrict key0, int64_t stride, int64_t n,
                           float* __restrict out, int64_t out_stride) {
  using F = typename Vec<W>::f;
  constexpr int D = NV * W, CH = chunk(NV, 8);  // key vectors held in registers at a time
  F part[G][W];
  for (int64_t j = 0; j < n; ++j) {
    const T* key = key0 + j * stride;
    F s[G] = {};
#pragma GCC unroll 32
    for (int c0 = 0; c0 < NV; c0 += CH) {
      F kv[CH];
#pragma GCC unroll 8
      for (int c = 0; c < CH; ++c) kv[c] = load<W>(key, c0 + c);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
        for (int c = 0; c < CH; ++c) s[g] += load<W>(q + g * D, c0 + c) * kv[c];
    }
    for (int g = 0; g < G; ++g) part[g][j] = s[g];
  }
  for (int g = 0; g < G; ++g) {
    for (int64_t j = n; j < W; ++j) part[g][j] = F{};
    const F r = reduce_lanes(part[g]);
    if (n == W) {
      *reinterpret_cast<typename Vec<W>::fu*>(out + g * out_stride) = r;
    } else {
      for (int64_t j = 0; j < n; ++j) out[g * out_stride + j] = r[j];
    }
  }
}

// acc[g] (fp32 [NV * W]) += sum_j p[g * p_stride + j] * v_j for n values of one KV head (v_j at
// val0 + j * stride). Each V row is loaded and widened once for all G heads; accumulators stay in
// registers for a chunk of head_dim at a time (as many as the register file holds beside the weights).
template <int W, int NV, int G, typename T>
GS_INLINE void accumulate_tile(float* __restrict acc, const float* __restrict p, int64_t p_stride,
                               const T* __restrict val0, int64_t stride, int64_t n) {
  using F = typename Vec<W>::f;
  using FU = typename Vec<W>::fu;
  constexpr int D = NV * W, regs = W == 16 ? 32 : 16, CH = chunk(NV, (regs - G - 2) / G);
#pragma GCC unroll 32
  for (int c0 = 0; c0 < NV; c0 += CH) {
    F a[G][CH];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CH; ++c) a[g][c] = load<W>(acc + g * D, c0 + c);
    for (int64_t j = 0; j < n; ++j) {
      const T* val = val0 + j * stride;
      float w[G];
      for (int g = 0; g < G; ++g) w[g] = p[g * p_stride + j];
#pragma GCC unroll 8
      for (int c = 0; c < CH; ++c) {
        const F x = load<W>(val, c0 + c);
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g) a[g][c] += w[g] * x;
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CH; ++c) *reinterpret_cast<FU*>(acc + g * D + (c0 + c) * W) = a[g][c];
  }
}

// One step's shapes and pointers (the same for every task). T: the caches' element type; Q: q's and out's
// (T, or fp32 over a bf16 cache: the fp32 activations of --quantization int8 with half the K/V bytes).
template <typename T, typename Q = T>
struct Args {
  const Q* q;
  const T *k, *v;
  Q* out;
  const int32_t *tables, *lens;
  const int64_t* rows;
  int64_t q_s0, q_s1, o_s0, o_s1, bt_s0, bs, hkv, d, group, slot_stride, window, heads_per_task, tasks_per_seq;
  float scale;
};

// A thread's scratch: the task's scaled queries, output accumulators and scores (all fp32).
struct Scratch {
  std::vector<float> q, acc, scores, inv;
};

// A block's rows of this task's heads, one prefetch per 64-byte line; Hint 3: into L1, 2: into L2.
template <int Hint, typename T>
GS_INLINE void prefetch_block(const T* first_row, int64_t slot_stride, int64_t n, int64_t elems_per_row) {
  constexpr int64_t line = 64 / sizeof(T);
  if (elems_per_row == slot_stride) elems_per_row *= n, n = 1;  // all heads: the block is one run
  for (int64_t j = 0; j < n; ++j)
#pragma GCC unroll 8
    for (int64_t f = 0; f < elems_per_row; f += line) __builtin_prefetch(first_row + j * slot_stride + f, 0, Hint);
}

// Unnormalized softmax of each query head's scores over positions [skip, span) in place: exp(s - max),
// and 1 / their sum into inv (the output is scaled by it once, at the end). Positions before skip (in the
// first block, outside a sliding window) get weight 0 (skipped, not -inf: -ffast-math). simd loops so
// expf vectorizes (glibc's libmvec).
void softmax_rows(float* scores, int64_t rows, int64_t span, int64_t skip, float* inv) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = scores + r * span;
    float m = sr[skip];
#pragma omp simd reduction(max : m)
    for (int64_t pos = skip; pos < span; ++pos) m = std::max(m, sr[pos]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t pos = skip; pos < span; ++pos) {
      sr[pos] = std::exp(sr[pos] - m);
      sum += sr[pos];
    }
    std::fill(sr, sr + skip, 0.f);
    inv[r] = 1.f / sum;
  }
}

// Where one task's work lies: sequence b, KV heads [h0, h0 + heads_per_task), the window's positions
// [lo, ctx) as blocks first.. (scores cover positions base.. of which the first `skip` get weight 0).
struct Span {
  int64_t b, h0, ctx, first, nblk, span, skip, nrows;
};

template <typename T, typename Q>
GS_INLINE Span task_span(const Args<T, Q>& a, int64_t task) {
  Span s;
  s.b = task / a.tasks_per_seq;
  s.h0 = (task % a.tasks_per_seq) * a.heads_per_task;
  s.ctx = a.lens[s.b];
  const int64_t lo = a.window > 0 ? std::max<int64_t>(0, s.ctx - a.window) : 0;
  s.first = lo / a.bs;
  s.nblk = (s.ctx + a.bs - 1) / a.bs;
  s.span = s.ctx - s.first * a.bs;
  s.skip = lo - s.first * a.bs;
  s.nrows = a.heads_per_task * a.group;  // query heads h0 * group ..
  return s;
}

// Scratch sized for the task (outside the vector code: plain calls); accumulators zeroed.
template <typename T, typename Q>
void task_setup(const Args<T, Q>& a, const Span& s, Scratch& sc) {
  sc.q.resize(s.nrows * a.d);
  sc.acc.assign(s.nrows * a.d, 0.f);
  sc.scores.resize(s.nrows * s.span);
  sc.inv.resize(s.nrows);
}

// The task's first query row and output row (query head h0 * group).
template <typename T, typename Q>
GS_INLINE const Q* task_q(const Args<T, Q>& a, const Span& s) {
  return a.q + a.rows[s.b] * a.q_s0 + s.h0 * a.group * a.q_s1;
}
template <typename T, typename Q>
GS_INLINE Q* task_out(const Args<T, Q>& a, const Span& s) {
  return a.out + a.rows[s.b] * a.o_s0 + s.h0 * a.group * a.o_s1;
}

// Calls fn(block, i, n) for blocks first..nblk of one cache (block: the first row of this task's heads in
// block i, n slots used). Blocks sit at random places in the cache, which defeats the hardware prefetcher
// at every block boundary, so while block i is computed block i + 1 is being prefetched into L1 and block
// i + 2 into L2, and the same blocks of `also` (the V cache, walked next; its first two up front) into L2.
template <typename T, typename Q, typename Fn>
GS_INLINE void walk_blocks(const Args<T, Q>& a, const Span& s, const T* cache, const T* also, Fn&& fn) {
  const int32_t* table = a.tables + s.b * a.bt_s0;
  const int64_t row_elems = a.heads_per_task * a.d, off = s.h0 * a.d, blk = a.bs * a.slot_stride;
  auto block = [&](const T* c, int64_t i) { return c + int64_t(table[i]) * blk + off; };
  auto slots = [&](int64_t i) { return std::min(a.bs, s.ctx - i * a.bs); };
  for (int64_t i = s.first; also && i < std::min(s.first + 2, s.nblk); ++i)
    prefetch_block<2>(block(also, i), a.slot_stride, slots(i), row_elems);
  for (int64_t i = s.first; i < s.nblk; ++i) {
    if (i + 1 < s.nblk) prefetch_block<3>(block(cache, i + 1), a.slot_stride, slots(i + 1), row_elems);
    if (also && i + 2 < s.nblk) {
      prefetch_block<2>(block(cache, i + 2), a.slot_stride, slots(i + 2), row_elems);
      prefetch_block<2>(block(also, i + 2), a.slot_stride, slots(i + 2), row_elems);
    }
    fn(block(cache, i), i, slots(i));
  }
}

// Each cache block is walked once per pass for all of the task's query heads: per KV head, its query
// heads in batches of up to 4 (a batch's accumulators stay in registers).
template <int W, int NV, typename T, typename Q, typename Fn>
GS_INLINE void for_head_batches(const Args<T, Q>& a, Fn&& fn) {
  for (int64_t hl = 0; hl < a.heads_per_task; ++hl)
    for (int64_t g0 = 0; g0 < a.group; g0 += 4) {
      const int64_t r0 = hl * a.group + g0;  // first query row of the batch
      switch (std::min<int64_t>(4, a.group - g0)) {
        case 1: fn(std::integral_constant<int, 1>{}, hl, r0); break;
        case 2: fn(std::integral_constant<int, 2>{}, hl, r0); break;
        case 3: fn(std::integral_constant<int, 3>{}, hl, r0); break;
        default: fn(std::integral_constant<int, 4>{}, hl, r0); break;
      }
    }
}

template <int W, int NV, typename T, typename Q>
GS_INLINE void task_vec(const Args<T, Q>& a, int64_t task, Scratch& sc) {
  constexpr int D = NV * W;
  const Span s = task_span(a, task);
  if (s.ctx <= 0) return;
  task_setup(a, s, sc);
  float *q = sc.q.data(), *acc = sc.acc.data(), *scores = sc.scores.data(), *inv = sc.inv.data();
  const Q* src = task_q(a, s);
  for (int64_t r = 0; r < s.nrows; ++r)
    for (int c = 0; c < NV; ++c) {
      typename Vec<W>::f x;  // fp32 q over a bf16 cache: in the order the cache's lanes come in
      if constexpr (std::is_same_v<Q, T>) x = load<W>(src + r * a.q_s1, c);
      else x = gearshift::simd::load_in_order_of<W, T>(src + r * a.q_s1, c);
      *reinterpret_cast<typename Vec<W>::fu*>(q + r * D + c * W) = x * a.scale;
    }
  // Pass 1: scores[r][pos] = q_r . k_pos.
  walk_blocks(a, s, a.k, a.v, [&](const T* block, int64_t i, int64_t n) __attribute__((always_inline)) {
    for_head_batches<W, NV>(a, [&](auto g, int64_t hl, int64_t r0) __attribute__((always_inline)) {
      for (int64_t j0 = 0; j0 < n; j0 += W)
        scores_tile<W, NV, decltype(g)::value, T>(q + r0 * D, block + hl * D + j0 * a.slot_stride, a.slot_stride,
                                                  std::min<int64_t>(W, n - j0),
                                                  scores + r0 * s.span + (i - s.first) * a.bs + j0, s.span);
    });
  });
  softmax_rows(scores, s.nrows, s.span, s.skip, inv);
  // Pass 2: out_r = sum_pos p[r][pos] * v_pos.
  const T* none = nullptr;  // nothing to prefetch beside V
  walk_blocks(a, s, a.v, none, [&](const T* block, int64_t i, int64_t n) __attribute__((always_inline)) {
    for_head_batches<W, NV>(a, [&](auto g, int64_t hl, int64_t r0) __attribute__((always_inline)) {
      accumulate_tile<W, NV, decltype(g)::value, T>(acc + r0 * D, scores + r0 * s.span + (i - s.first) * a.bs,
                                                    s.span, block + hl * D, a.slot_stride, n);
    });
  });
  Q* dst = task_out(a, s);
  for (int64_t r = 0; r < s.nrows; ++r) {
    if constexpr (std::is_same_v<Q, T>) store_row<W, NV>(dst + r * a.o_s1, acc + r * D, inv[r]);
    else gearshift::simd::store_row_in_order_of<W, NV, T>(dst + r * a.o_s1, acc + r * D, inv[r]);
  }
}

// The entry points whose addresses are taken: the W = 16 one compiled for AVX-512 (everything below it is
// inlined into it, so its vectors are zmm registers), called only when the CPU has AVX-512.
template <int NV, typename T, typename Q>
void task_w8(const Args<T, Q>& a, int64_t task, Scratch& sc) { task_vec<8, NV>(a, task, sc); }
template <int NV, typename T, typename Q>
GS_AVX512 void task_w16(const Args<T, Q>& a, int64_t task, Scratch& sc) { task_vec<16, NV>(a, task, sc); }

template <typename T, typename Q>
using TaskFn = void (*)(const Args<T, Q>&, int64_t, Scratch&);

// head_dims with a vector kernel (each a multiple of 16 and of 8).
#define GS_VEC_DIMS(ENTRY, W, T, Q) \
  case 64: return ENTRY<64 / W, T, Q>; \
  case 80: return ENTRY<80 / W, T, Q>; \
  case 96: return ENTRY<96 / W, T, Q>; \
  case 128: return ENTRY<128 / W, T, Q>; \
  case 256: return ENTRY<256 / W, T, Q>;

template <typename T, typename Q>
TaskFn<T, Q> pick_vector_kernel(int64_t d, bool avx512) {
  if (avx512 && (sizeof(T) == 4 || d % 32 == 0)) {  // bf16 unpacks whole 32-element groups
    switch (d) { GS_VEC_DIMS(task_w16, 16, T, Q) }
  }
  switch (d) { GS_VEC_DIMS(task_w8, 8, T, Q) }
  return nullptr;
}

// Any other head_dim: per query head, one dot product per key and one axpy per value.
template <typename T, typename Q>
void task_any(const Args<T, Q>& a, int64_t task, Scratch& sc) {
  const Span s = task_span(a, task);
  if (s.ctx <= 0) return;
  task_setup(a, s, sc);
  const int64_t d = a.d;
  const Q* src = task_q(a, s);
  for (int64_t i = 0; i < s.nrows * d; ++i) sc.q[i] = to_float(src[(i / d) * a.q_s1 + i % d]) * a.scale;
  for (int64_t r = 0; r < s.nrows; ++r) {
    const int64_t off = (r / a.group) * d;
    float *qr = sc.q.data() + r * d, *acc = sc.acc.data() + r * d, *scores = sc.scores.data() + r * s.span;
    walk_blocks(a, s, a.k, a.v, [&](const T* block, int64_t i, int64_t n) {
      for (int64_t j = 0; j < n; ++j) {
        const T* key = block + off + j * a.slot_stride;
        float dot = 0.f;
        for (int64_t x = 0; x < d; ++x) dot += qr[x] * to_float(key[x]);
        scores[(i - s.first) * a.bs + j] = dot;
      }
    });
    softmax_rows(scores, 1, s.span, s.skip, sc.inv.data() + r);
    walk_blocks(a, s, a.v, static_cast<const T*>(nullptr), [&](const T* block, int64_t i, int64_t n) {
      for (int64_t j = 0; j < n; ++j) {
        const T* val = block + off + j * a.slot_stride;
        const float w = scores[(i - s.first) * a.bs + j];
        for (int64_t x = 0; x < d; ++x) acc[x] += w * to_float(val[x]);
      }
    });
  }
  Q* dst = task_out(a, s);
  for (int64_t i = 0; i < s.nrows * d; ++i)
    dst[(i / d) * a.o_s1 + i % d] = gearshift::from_float<Q>(sc.acc[i] * sc.inv[i / d]);
}

// GEARSHIFT_CPU_AVX512=0 keeps the x86-64-v3 (W = 8) kernels on an AVX-512 CPU (tests of that path).
bool has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* env = std::getenv("GEARSHIFT_CPU_AVX512");
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          !(env && std::string(env) == "0");
  return yes;
#else
  return false;
#endif
}

template <typename T, typename Q>
void paged_decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                       at::Tensor& out, float scale, int64_t window) {
  Args<T, Q> a;
  a.q = data_as<Q>(q), a.k = data_as<T>(k_cache), a.v = data_as<T>(v_cache), a.out = data_as<Q>(out);
  a.tables = block_tables.data_ptr<int32_t>(), a.lens = seq_lens.data_ptr<int32_t>();
  a.rows = rows.data_ptr<int64_t>();
  a.q_s0 = q.stride(0), a.q_s1 = q.stride(1), a.o_s0 = out.stride(0), a.o_s1 = out.stride(1);
  a.bt_s0 = block_tables.stride(0), a.bs = k_cache.size(1), a.hkv = k_cache.size(2), a.d = q.size(2);
  a.group = q.size(1) / a.hkv, a.slot_stride = a.hkv * a.d, a.window = window, a.scale = scale;
  const int64_t num_seqs = seq_lens.size(0);
  // A task is one sequence and a range of its KV heads: all of them when there are enough sequences to
  // keep every thread busy (each cache slot's K/V rows for all heads are then read as one contiguous run),
  // else one head per task.
  a.heads_per_task = num_seqs >= 2 * at::get_num_threads() ? a.hkv : 1;
  a.tasks_per_seq = a.hkv / a.heads_per_task;
  TaskFn<T, Q> fn = pick_vector_kernel<T, Q>(a.d, has_avx512());
  if (!fn) fn = task_any<T, Q>;
  at::parallel_for(0, num_seqs * a.tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    Scratch sc;
    for (int64_t task = begin; task < end; ++task) fn(a, task, sc);
  });
}

}  // namespace

void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                  at::Tensor& out, double scale, int64_t window) {
  const bool mixed = q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK((k_cache.scalar_type() == q.scalar_type() || mixed) && v_cache.scalar_type() == k_cache.scalar_type() &&
              out.scalar_type() == q.scalar_type(),
              "q and out share one dtype, the caches q's or (fp32 q) bfloat16");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(block_tables.dtype() == at::kInt && seq_lens.dtype() == at::kInt &&
              rows.dtype() == at::kLong, "index dtypes");
  if (mixed) {
    paged_decode_impl<bf16, float>(q, k_cache, v_cache, block_tables, seq_lens, rows, out, static_cast<float>(scale),
                                   window);
    return;
  }
  gearshift::dispatch_float_bf16(q, "q", [&](auto tag) {
    using T = decltype(tag);
    paged_decode_impl<T, T>(q, k_cache, v_cache, block_tables, seq_lens, rows, out, static_cast<float>(scale),
                            window);
  });
}
