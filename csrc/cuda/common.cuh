// Device helpers shared by the CUDA kernels of neuslice (private to csrc/cuda/).
//
// Hand-written warp/block scans instead of CUB: the kernels need only these two primitives, and
// leaving cub/ out keeps the CUDA part of the build (which CI compiles on every run) short.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "neuslice/common.h"

namespace neuslice {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Returns kCudaError from the enclosing function when the last launch (or runtime call) failed.
#define NEUSLICE_CHECK_LAUNCH()                                         \
  do {                                                                  \
    if (cudaGetLastError() != cudaSuccess) return ::neuslice::kCudaError; \
  } while (0)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Inclusive prefix sum over the warp, in lane order; `exl` receives the exclusive value (the
// inclusive one shifted up a lane, 0 in lane 0: never formed by subtraction).
template <typename TV>
__device__ __forceinline__ TV warp_inclusive_scan(TV v, int lane, TV& exl) {
  TV inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const TV t = __shfl_up_sync(kFullMask, inc, o);
    if (lane >= o) inc += t;
  }
  exl = __shfl_up_sync(kFullMask, inc, 1);
  if (lane == 0) exl = TV(0);
  return inc;
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, at most 1024), in thread
// order. `s_warp` is shared scratch of 33 values; `total` receives the block's sum. Every thread
// of the block must call it (it synchronises). Exclusive values are formed by shifting inclusive
// ones, never by subtraction, so floating-point results are plain left-to-right partial sums of
// the per-warp sums.
template <typename TV>
__device__ __forceinline__ TV block_exclusive_scan(TV v, TV* s_warp, TV& total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  TV exl;
  const TV inc = warp_inclusive_scan(v, lane, exl);
  if (lane == 31) s_warp[wid] = inc;
  __syncthreads();
  if (wid == 0) {
    TV ex;
    const TV wi = warp_inclusive_scan(lane < nw ? s_warp[lane] : TV(0), lane, ex);
    const TV tot = __shfl_sync(kFullMask, wi, 31);
    s_warp[lane] = ex;
    if (lane == 0) s_warp[32] = tot;
  }
  __syncthreads();
  const TV res = s_warp[wid] + exl;
  total = s_warp[32];
  __syncthreads();  // s_warp may be reused by the next call
  return res;
}

template <typename TV>
__device__ __forceinline__ TV warp_sum(TV v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

}  // namespace cuda
}  // namespace neuslice
