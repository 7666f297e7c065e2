// select on CUDA: per-row cumulative-theta and top-k selection by block-level radix select.
//
// The CPU kernel's algorithm (csrc/cpu/select.cpp), one thread block per row: non-negative IEEE
// floats order like their bit patterns, so the row is narrowed 11 bits at a time from the top.
// Each pass builds a shared-memory histogram of (count, double sum) over the candidates, finds
// the bucket where the weight taken in descending order (sum for theta, count for top-k)
// reaches the target, marks every candidate above it and keeps the bucket's members as the next
// candidates. After the last digit the candidates share one value and the first ones in index
// order are taken: the tie rule (lower index first). Sums are in double, as in the reference.
// f32 rows take 3 passes (11+11+9 bits), f64 rows 6.
//
// Bytes moved: the row is read from DRAM once (R*N*e bytes, e = 4 or 8); the re-reads of the
// passes (two per pass: histogram, then marking) hit L1/L2, since one block works on one row
// (16 KiB for N = 4096 in f32). Written: R*N bytes of bool, once per element plus the selected.
// Bound: not DRAM. Per pass the block synchronises a few times and scans 2048 buckets, so a row
// costs a fixed latency of a few microseconds; rows run concurrently (about 8 blocks of 256
// threads per SM, 28 KiB of shared memory each), so R = 1000 rows fill a 132-SM H100 once.
//
// Why it suits Hopper: loads of the row are coalesced across the block (consecutive threads,
// consecutive elements; strided rows are served by the same code through L1). Histogram
// updates are shared-memory atomics aggregated per warp over equal keys (__match_any_sync), so
// ties (zero scores of dead neurons, repeated values) cost one atomic per warp instead of 32
// serialised ones. The bucket arrays are padded by one slot every 8 buckets, so the per-thread
// scan over 8 consecutive buckets (thread t reads slot 9t + j) is free of bank conflicts.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "neuslice/select.h"

namespace neuslice {
namespace {

using cuda::kFullMask;

constexpr int kThreads = 256;
constexpr int kDigitBits = 11;
constexpr int kBuckets = 1 << kDigitBits;
constexpr int kPerThread = kBuckets / kThreads;  // buckets each thread scans: 8
constexpr int kSlots = kBuckets + kBuckets / 8;

__device__ __forceinline__ int slot(int d) { return d + (d >> 3); }

template <typename V> struct Key;
template <> struct Key<float> {
  using type = unsigned int;
  static __device__ __forceinline__ unsigned int of(float v) { return __float_as_uint(v); }
  static __device__ __forceinline__ float value(unsigned int k) { return __uint_as_float(k); }
};
template <> struct Key<double> {
  using type = unsigned long long;
  static __device__ __forceinline__ unsigned long long of(double v) {
    return static_cast<unsigned long long>(__double_as_longlong(v));
  }
  static __device__ __forceinline__ double value(unsigned long long k) {
    return __longlong_as_double(static_cast<long long>(k));
  }
};

template <typename V>
__device__ __forceinline__ V load(const V* row, int64_t i, int64_t s_n) {
  return __ldg(row + i * s_n) + V(0);  // -0.0 becomes +0.0, as on the CPU
}

template <typename V, bool BySum>
__global__ void __launch_bounds__(kThreads) k_select(const V* scores, int64_t N, int64_t s_r,
                                                     int64_t s_n, bool* out, double theta,
                                                     int64_t k, int* status) {
  using K = typename Key<V>::type;
  constexpr int kBits = sizeof(K) * 8 - 1;  // the sign bit is 0 for every valid score
  __shared__ int s_cnt[kSlots];
  __shared__ double s_sum[BySum ? kSlots : 1];
  __shared__ double s_dscan[33];
  __shared__ int s_iscan[33];
  __shared__ int s_cross;
  __shared__ double s_accb;

  const int tid = threadIdx.x, lane = tid & 31;
  const int64_t row = blockIdx.x;
  const V* p = scores + row * s_r;
  bool* o = out + row * N;

  // Pass 0: clear the output row, row total (double), validity.
  double t = 0;
  int bad = 0;
  for (int64_t i = tid; i < N; i += kThreads) {
    const V v = load(p, i, s_n);
    bad |= !(v >= V(0) && isfinite(v));
    t += static_cast<double>(v);
    o[i] = false;
  }
  bad = __syncthreads_or(bad);
  if (bad) {
    if (tid == 0) atomicOr(status, kBadScore);
    return;
  }
  double total;
  cuda::block_exclusive_scan(t, s_dscan, total);
  const double target = BySum ? theta * total : static_cast<double>(k);
  if (BySum ? !(total > 0) : k <= 0) return;

  K prefix = 0;      // the digits fixed so far
  double base = 0;   // weight of what is selected so far
  int nc = 0;        // candidates left after the last pass
  for (int hi = kBits; hi > 0;) {
    const int width = hi < kDigitBits ? hi : kDigitBits;
    const int shift = hi - width;
    const K mask = (K(1) << width) - 1;
    for (int j = tid; j < kSlots; j += kThreads) {
      s_cnt[j] = 0;
      if constexpr (BySum) s_sum[j] = 0;
    }
    if (tid == 0) s_cross = -1;
    __syncthreads();

    // Histogram of the candidates' digit; equal keys in a warp share one atomic.
    for (int64_t i0 = 0; i0 < N; i0 += kThreads) {
      const int64_t i = i0 + tid;
      bool cand = false;
      K key = ~K(0);
      V v = 0;
      if (i < N) {
        v = load(p, i, s_n);
        key = Key<V>::of(v);
        cand = (key >> hi) == prefix;
      }
      const unsigned grp = __match_any_sync(kFullMask, cand ? key : ~K(0));
      if (cand && lane == __ffs(grp) - 1) {
        const int d = slot(static_cast<int>((key >> shift) & mask));
        const int c = __popc(grp);
        atomicAdd(&s_cnt[d], c);
        if constexpr (BySum) atomicAdd(&s_sum[d], static_cast<double>(c) * static_cast<double>(v));
      }
    }
    __syncthreads();

    // Crossing bucket: thread t scans buckets 2047-8t down to 2040-8t; a block scan gives the
    // weight of every higher bucket. The crossing is the highest non-empty bucket d with
    // base + weight(above d) + weight(d) >= target (monotone in d, so a max over threads).
    double w[kPerThread];
    double local = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int d = kBuckets - 1 - (kPerThread * tid + j);
      if constexpr (BySum) {
        w[j] = s_sum[slot(d)];
      } else {
        w[j] = static_cast<double>(s_cnt[slot(d)]);
      }
      local += w[j];
    }
    double unused;
    double run = cuda::block_exclusive_scan(local, s_dscan, unused);
    int mine = -1;
    double accb = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int d = kBuckets - 1 - (kPerThread * tid + j);
      if (mine < 0 && s_cnt[slot(d)] > 0 && base + run + w[j] >= target) {
        mine = d;
        accb = run;
      }
      if (mine < 0) run += w[j];
    }
    if (mine >= 0) atomicMax(&s_cross, mine);
    __syncthreads();
    const int cross = s_cross;
    if (cross >= 0 && mine == cross) s_accb = accb;
    __syncthreads();

    if (cross < 0) {  // rounding left the target just out of reach: keep every positive candidate
      for (int64_t i = tid; i < N; i += kThreads) {
        const V v = load(p, i, s_n);
        if ((Key<V>::of(v) >> hi) == prefix && (!BySum || v > V(0))) o[i] = true;
      }
      return;
    }
    for (int64_t i = tid; i < N; i += kThreads) {
      const K key = Key<V>::of(load(p, i, s_n));
      if ((key >> hi) == prefix && static_cast<int>((key >> shift) & mask) > cross) o[i] = true;
    }
    nc = s_cnt[slot(cross)];
    base += s_accb;
    prefix = (prefix << width) | static_cast<K>(cross);
    hi = shift;
    __syncthreads();  // every thread has read s_cnt, s_cross and s_accb before the next clear
  }

  // The candidates share the value of `prefix`: take the first `take` of them in index order.
  const double wv = BySum ? static_cast<double>(Key<V>::value(prefix)) : 1.0;
  int64_t take;
  if (!(base < target)) {
    take = 0;
  } else if (!(wv > 0)) {
    take = nc;
  } else {
    const double need = ceil((target - base) / wv);
    take = need >= static_cast<double>(nc) ? nc : (need < 1 ? 1 : static_cast<int64_t>(need));
    while (take > 1 && base + static_cast<double>(take - 1) * wv >= target) --take;
    while (take < nc && base + static_cast<double>(take) * wv < target) ++take;
  }
  if (take == nc) {  // the common case (distinct values: one candidate, taken): no ranking needed
    for (int64_t i = tid; i < N; i += kThreads)
      if (Key<V>::of(load(p, i, s_n)) == prefix) o[i] = true;
    return;
  }
  int64_t taken = 0;  // identical in every thread
  for (int64_t i0 = 0; i0 < N && taken < take; i0 += kThreads) {
    const int64_t i = i0 + tid;
    const int f = i < N && Key<V>::of(load(p, i, s_n)) == prefix;
    int tot;
    const int rank = cuda::block_exclusive_scan(f, s_iscan, tot);
    if (f && taken + rank < take) o[i] = true;
    taken += tot;
  }
}

template <typename V, bool BySum>
int launch(const SelectArgs& a, double theta, int64_t k, int* status, void* stream) {
  cudaGetLastError();  // clear an error left by an earlier runtime call
  k_select<V, BySum><<<static_cast<unsigned>(a.R), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const V*>(a.scores), a.N, a.s_r, a.s_n, a.out, theta, k, status);
  NEUSLICE_CHECK_LAUNCH();
  return kOk;
}

int dispatch(const SelectArgs& a, bool cumulative, double theta, int64_t k, int* status, void* stream) {
  if (a.R < 0 || a.N < 0 || a.N > INT32_MAX || a.R > INT32_MAX || status == nullptr) return kBadArgument;
  // Nothing to select (before the pointer test: an empty tensor's data pointer is null; found by
  // tests/test_cuda_backend.py::test_select_empty_shapes on the first GPU run).
  if (a.R == 0 || a.N == 0) return kOk;
  if (a.out == nullptr) return kBadArgument;
  if (a.dtype == DType::f64) {
    return cumulative ? launch<double, true>(a, theta, 0, status, stream)
                      : launch<double, false>(a, 0.0, k, status, stream);
  }
  if (a.dtype == DType::f32) {
    return cumulative ? launch<float, true>(a, theta, 0, status, stream)
                      : launch<float, false>(a, 0.0, k, status, stream);
  }
  return kBadArgument;  // f16/bf16 scores are upcast by the caller
}

}  // namespace

int select_cumulative_cuda(const SelectArgs& a, double theta, int* status, void* stream) {
  return dispatch(a, true, theta, 0, status, stream);
}

int select_topk_cuda(const SelectArgs& a, int64_t k, int* status, void* stream) {
  return dispatch(a, false, 0.0, k, status, stream);
}

}  // namespace neuslice
