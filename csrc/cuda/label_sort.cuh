// Class-sorted sample order for the accumulate kernels: a counting sort of the labels on the
// device (hist, scan, scatter), so that samples of one class are visited together and partials
// are flushed once per class run. Included by accumulate.cu only.
#pragma once
#include "accumulate_params.cuh"

namespace neuslice {
namespace {

// ---- class-sorted sample order (counting sort of the labels) --------------------------------

// The sort is three steps: hist (count per class), scan (offsets and compact class ids), scatter
// (sorted positions). Small batches run all three in one block (kPrepOneBlock): one launch
// instead of three; larger ones run each step over the grid.
constexpr int64_t kPrepOneBlock = 8192;  // 8 strides of 1024 threads per step at most
constexpr int kPrepThreads = 1024;

// Sample i's label when it counts; -1 when the label is out of range (the caller decides whether
// to flag it), -2 when it does not count (past L, label ignore_index, or no valid position).
__device__ __forceinline__ long long valid_label(const Params& p, int64_t i) {
  if (i >= p.L) return -2;
  const long long k = label_of(p, i);
  if (k == p.ignore_index) return -2;
  if (k < 0 || k >= p.K) return -1;
  return has_valid(p, i) ? k : -2;
}

// hist[k] += samples labelled k; an out-of-range label sets kBadLabel. All 32 lanes call it.
__device__ __forceinline__ void hist_step(const Params& p, int64_t i) {
  const long long k = valid_label(p, i);
  if (k == -1) atomicOr(p.status, kBadLabel);
  // Equal labels within a warp share one atomic (a batch has few classes).
  const unsigned m = __match_any_sync(kFullMask, static_cast<unsigned long long>(k));
  if (k >= 0 && static_cast<int>(threadIdx.x & 31) == __ffs(m) - 1) atomicAdd(p.hist + k, __popc(m));
}

// One block: cursor[k] = first sorted position of class k, cid[k] = its compact id (rank among
// the classes present), classes[cid] = k, nclass = number of classes present.
__device__ __forceinline__ void scan_step(const Params& p, unsigned long long* s_warp) {
  unsigned long long carry = 0;  // identical in every thread
  for (int64_t k0 = 0; k0 < p.K; k0 += blockDim.x) {
    const int64_t k = k0 + threadIdx.x;
    const int h = k < p.K ? __ldcg(p.hist + k) : 0;  // from L2, where the atomics landed
    // (count << 32) | present: one scan serves both; neither field can carry (L, K < 2^31).
    const unsigned long long v = (static_cast<unsigned long long>(h) << 32) | (h > 0 ? 1ull : 0ull);
    unsigned long long tot;
    const unsigned long long ex = cuda::block_exclusive_scan(v, s_warp, tot) + carry;
    if (k < p.K) {
      p.cursor[k] = static_cast<int>(ex >> 32);
      if (h > 0) {
        const int c = static_cast<int>(ex & 0xffffffffull);
        p.cid[k] = c;
        p.classes[c] = static_cast<int>(k);
      }
    }
    carry += tot;
  }
  if (threadIdx.x == 0) {
    *p.nclass = static_cast<int>(carry & 0xffffffffull);
    *p.nkept = static_cast<int>(carry >> 32);
  }
}

// perm[pos] = sample index, pcls[pos] = its compact class: samples grouped by class. All 32
// lanes call it.
__device__ __forceinline__ void scatter_step(const Params& p, int64_t i) {
  const long long k = valid_label(p, i);
  const int lane = threadIdx.x & 31;
  const unsigned m = __match_any_sync(kFullMask, static_cast<unsigned long long>(k));
  const int leader = __ffs(m) - 1;
  int base = 0;
  if (k >= 0 && lane == leader) base = atomicAdd(p.cursor + k, __popc(m));
  base = __shfl_sync(kFullMask, base, leader);
  if (k >= 0) {
    const int pos = base + __popc(m & ((1u << lane) - 1u));
    p.perm[pos] = static_cast<int>(i);
    p.pcls[pos] = p.cid[k];
  }
}

// nv[b] = valid positions of sample b (per-sample labels, S > 1, a valid mask): one warp per sample.
__global__ void __launch_bounds__(kThreads) k_count_valid(Params p) {
  const int64_t b = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (b >= p.L) return;  // uniform across the warp
  int c = 0;
  for (int64_t s = lane; s < p.S; s += 32) c += valid_at(p, b, s) ? 1 : 0;
  c = cuda::warp_sum(c);
  if (lane == 0) p.nv[b] = c;
}

__global__ void __launch_bounds__(kPrepThreads) k_prep_one_block(Params p) {
  __shared__ unsigned long long s_warp[33];
  for (int64_t i0 = 0; i0 < p.L; i0 += blockDim.x) hist_step(p, i0 + threadIdx.x);
  __syncthreads();  // the block's atomics on hist are visible to the block after the barrier
  scan_step(p, s_warp);
  __syncthreads();
  for (int64_t i0 = 0; i0 < p.L; i0 += blockDim.x) scatter_step(p, i0 + threadIdx.x);
}

__global__ void __launch_bounds__(kThreads) k_hist(Params p) {
  hist_step(p, blockIdx.x * int64_t(blockDim.x) + threadIdx.x);
}

__global__ void __launch_bounds__(kPrepThreads) k_scan(Params p) {
  __shared__ unsigned long long s_warp[33];
  scan_step(p, s_warp);
}

__global__ void __launch_bounds__(kThreads) k_scatter(Params p) {
  scatter_step(p, blockIdx.x * int64_t(blockDim.x) + threadIdx.x);
}

}  // namespace
}  // namespace neuslice
