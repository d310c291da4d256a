// Paged decode attention on CPU: one pass over each sequence's K and V, read in place from the paged
// cache (no gather copy, no padding, no mask). fp32, or bf16 (the dtype of the int4 path and of CPUs with
// native bf16): bf16 K/V rows are widened to fp32 as they are loaded, scores, softmax and the output are
// fp32, the output is rounded to bf16 once. Parallel over sequences (or sequence x kv head) with ATen's own
// thread pool (the same OpenMP team as every other op, so threads never fight a second runtime).
//
// q            [T, Hq, D]   fp32 or bf16 (the caches and out in the same dtype), head_dim contiguous;
//                           this step's queries (decode rows picked by `rows`)
// k/v_cache    [num_blocks, block_size, Hkv, D], contiguous
// block_tables [B, max_blocks] int32 (B = decode sequences)
// seq_lens     [B] int32: context length including this step's token (already written to the cache)
// rows         [B] int64: each sequence's row in q / out
// out          [T, Hq, D]; only the `rows` rows are written
// window       sliding window (0: none): a query at position p sees keys p - window < j <= p
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "bf16_cpu.h"

using gearshift::bf16;
using gearshift::data_as;
using gearshift::to_float;

namespace {

template <typename T>
inline float dot(const float* __restrict a, const T* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * to_float(b[i]);
  return s;
}

template <typename T>
inline void axpy(float* __restrict y, float a, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * to_float(x[i]);
}

// 8 floats in one register (AVX; GCC lowers it to pairs of SSE/NEON registers elsewhere). aligned(4): the
// loads and stores through it may be unaligned.
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

// 8 consecutive elements widened to fp32: a plain load for float; for bf16 a zero-extend and a 16-bit
// shift (vpmovzxwd + vpslld on AVX2), the bf16 bits becoming the high half of each float.
inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline v8 load8(const bf16* p) {
  return (v8)(__builtin_convertvector(*reinterpret_cast<const u16x8*>(p), u32x8) << 16);
}

inline float hsum(v8 x) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += x[i];
  return s;
}

// head_dim = 8 * NV known at compile time: a query row and an output accumulator live in NV registers
// while a whole cache block (bs slots) streams past them, so each K/V row is loaded once per query head
// from L1 and every FMA is a full vector.
template <int NV, typename T>
void scores_block(const float* __restrict q, const T* __restrict block, int64_t slot_stride, int64_t n,
                  float* __restrict out) {
  v8 qv[NV];
  for (int k = 0; k < NV; ++k) qv[k] = load8(q + 8 * k);
  for (int64_t j = 0; j < n; ++j) {
    const T* key = block + j * slot_stride;
    v8 a0 = {0}, a1 = {0};
#pragma GCC unroll 16
    for (int k = 0; k < NV; k += 2) {
      a0 += qv[k] * load8(key + 8 * k);
      if (k + 1 < NV) a1 += qv[k + 1] * load8(key + 8 * (k + 1));
    }
    out[j] = hsum(a0 + a1);
  }
}

template <int NV, typename T>
void accumulate_block(float* __restrict acc, const float* __restrict p, const T* __restrict block,
                      int64_t slot_stride, int64_t n) {
  v8 a[NV];
  for (int k = 0; k < NV; ++k) a[k] = load8(acc + 8 * k);
  for (int64_t j = 0; j < n; ++j) {
    const T* val = block + j * slot_stride;
    const float w = p[j];
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) a[k] += w * load8(val + 8 * k);
  }
  for (int k = 0; k < NV; ++k) *reinterpret_cast<v8*>(acc + 8 * k) = a[k];
}

// Blocks sit at random places in the cache, which defeats the hardware prefetcher at every block
// boundary: ask for the next block's rows (this task's heads) while the current one is computed.
// One prefetch per 64-byte line.
template <typename T>
inline void prefetch_block(const T* first_row, int64_t slot_stride, int64_t n, int64_t elems_per_row) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t f = 0; f < elems_per_row; f += line) __builtin_prefetch(first_row + j * slot_stride + f, 0, 3);
}

// Walks one sequence's context through its block table: fn(block, i, n) gets the first row of this task's
// heads in block i (n slots used), with block i + 1 already being prefetched.
// Blocks before `first` (wholly outside a sliding window) are never touched.
template <typename T, typename Fn>
void for_each_block(const T* cache, const int32_t* table, int64_t ctx, int64_t bs, int64_t slot_stride,
                    int64_t head_offset, int64_t elems_per_row, int64_t first, Fn fn) {
  const int64_t nblk = (ctx + bs - 1) / bs;
  for (int64_t i = first; i < nblk; ++i) {
    if (i + 1 < nblk)
      prefetch_block(cache + int64_t(table[i + 1]) * bs * slot_stride + head_offset, slot_stride,
                     std::min(bs, ctx - (i + 1) * bs), elems_per_row);
    fn(cache + int64_t(table[i]) * bs * slot_stride + head_offset, i, std::min(bs, ctx - i * bs));
  }
}

// Any head_dim: the same loops with the vector width left to the compiler.
template <typename T>
void scores_block_any(const float* q, const T* block, int64_t slot_stride, int64_t n, int64_t d, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = dot(q, block + j * slot_stride, d);
}

template <typename T>
void accumulate_block_any(float* acc, const float* p, const T* block, int64_t slot_stride, int64_t n, int64_t d) {
  for (int64_t j = 0; j < n; ++j) axpy(acc, p[j], block + j * slot_stride, d);
}

// Softmax of each query head's scores over positions [skip, span) in place; positions before skip (in
// the first block, outside a sliding window) get probability 0 (skipped, not -inf: -ffast-math).
// simd loops so expf vectorizes (glibc's libmvec).
void softmax_rows(float* scores, int64_t rows, int64_t span, int64_t skip) {
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
    const float inv = 1.f / sum;
    std::fill(sr, sr + skip, 0.f);
#pragma omp simd
    for (int64_t pos = skip; pos < span; ++pos) sr[pos] *= inv;
  }
}

template <typename T>
void paged_decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                       at::Tensor& out, float scale, int64_t window) {
  const int64_t num_seqs = seq_lens.size(0);
  const int64_t hq = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), hkv = k_cache.size(2);
  const int64_t group = hq / hkv;
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1), o_s0 = out.stride(0), o_s1 = out.stride(1);
  const int64_t bt_s0 = block_tables.stride(0);
  const int64_t slot_stride = hkv * d;  // elements between consecutive slots of one head
  const T* qp = data_as<T>(q);
  const T* kp = data_as<T>(k_cache);
  const T* vp = data_as<T>(v_cache);
  const int32_t* btp = block_tables.data_ptr<int32_t>();
  const int32_t* lp = seq_lens.data_ptr<int32_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  T* op = data_as<T>(out);

  // A task is one sequence and a range of its KV heads: all of them when there are enough sequences to
  // keep every thread busy (each cache slot's K/V rows for all heads are then read as one contiguous run),
  // else one head per task.
  const int64_t heads_per_task = num_seqs >= 2 * at::get_num_threads() ? hkv : 1;
  const int64_t tasks_per_seq = hkv / heads_per_task;
  at::parallel_for(0, num_seqs * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_per_task = heads_per_task * group;  // query heads one task serves
    std::vector<float> qs(rows_per_task * d), acc(rows_per_task * d), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_seq, h0 = (task % tasks_per_seq) * heads_per_task;
      const int64_t ctx = lp[b], row = rp[b];
      if (ctx <= 0) continue;
      // A sliding window (window > 0) sees positions [lo, ctx); scores cover blocks first.. only.
      const int64_t lo = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      const int64_t first = lo / bs, base = first * bs, span = ctx - base, skip = lo - base;
      scores.resize(rows_per_task * span);
      for (int64_t r = 0; r < rows_per_task; ++r) {  // query head h0 * group + r
        const T* src = qp + row * q_s0 + (h0 * group + r) * q_s1;
        for (int64_t i = 0; i < d; ++i) qs[r * d + i] = to_float(src[i]) * scale;
      }
      const int32_t* table = btp + b * bt_s0;
      const int64_t row_elems = heads_per_task * d;
      // Pass 1: scores[r][pos] = q_r . k_pos, block by block (one block of one head: bs strided rows).
      for_each_block(kp, table, ctx, bs, slot_stride, h0 * d, row_elems, first, [&](const T* block, int64_t i, int64_t n) {
        for (int64_t r = 0; r < rows_per_task; ++r) {
          const T* kb = block + (r / group) * d;
          float* dst = scores.data() + r * span + (i - first) * bs;
          if (d == 64) scores_block<8>(qs.data() + r * d, kb, slot_stride, n, dst);
          else if (d == 128) scores_block<16>(qs.data() + r * d, kb, slot_stride, n, dst);
          else scores_block_any(qs.data() + r * d, kb, slot_stride, n, d, dst);
        }
      });
      softmax_rows(scores.data(), rows_per_task, span, skip);
      // Pass 2: out_r = sum_pos p[r][pos] * v_pos, block by block.
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_block(vp, table, ctx, bs, slot_stride, h0 * d, row_elems, first, [&](const T* block, int64_t i, int64_t n) {
        for (int64_t r = 0; r < rows_per_task; ++r) {
          const T* vb = block + (r / group) * d;
          const float* p = scores.data() + r * span + (i - first) * bs;
          if (d == 64) accumulate_block<8>(acc.data() + r * d, p, vb, slot_stride, n);
          else if (d == 128) accumulate_block<16>(acc.data() + r * d, p, vb, slot_stride, n);
          else accumulate_block_any(acc.data() + r * d, p, vb, slot_stride, n, d);
        }
      });
      for (int64_t r = 0; r < rows_per_task; ++r) {
        T* dst = op + row * o_s0 + (h0 * group + r) * o_s1;
        for (int64_t i = 0; i < d; ++i) dst[i] = gearshift::from_float<T>(acc[r * d + i]);
      }
    }
  });
}

}  // namespace

void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                  at::Tensor& out, double scale, int64_t window) {
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
              out.scalar_type() == q.scalar_type(), "q, the caches and out must share one dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(block_tables.dtype() == at::kInt && seq_lens.dtype() == at::kInt &&
              rows.dtype() == at::kLong, "index dtypes");
  gearshift::dispatch_float_bf16(q, "q", [&](auto tag) {
    paged_decode_impl<decltype(tag)>(q, k_cache, v_cache, block_tables, seq_lens, rows, out,
                                     static_cast<float>(scale), window);
  });
}
