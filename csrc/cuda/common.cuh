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

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, at most 1024), in thread
// order. `s_warp` is shared scratch of 33 values; `total` receives the block's sum. Every thread
// of the block must call it (it synchronises). Exclusive values are formed by shifting inclusive
// ones, never by subtraction, so floating-point results are plain left-to-right partial sums of
// the per-warp sums.
template <typename TV>
__device__ __forceinline__ TV block_exclusive_scan(TV v, TV* s_warp, TV& total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  TV inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const TV t = __shfl_up_sync(kFullMask, inc, o);
    if (lane >= o) inc += t;
  }
  TV exl = __shfl_up_sync(kFullMask, inc, 1);
  if (lane == 0) exl = TV(0);
  if (lane == 31) s_warp[wid] = inc;
  __syncthreads();
  if (wid == 0) {
    const TV w = lane < nw ? s_warp[lane] : TV(0);
    TV wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const TV t = __shfl_up_sync(kFullMask, wi, o);
      if (lane >= o) wi += t;
    }
    TV ex = __shfl_up_sync(kFullMask, wi, 1);
    if (lane == 0) ex = TV(0);
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
