// accumulate: one pass over a batch's activations x, gradients g, reference r and labels,
// adding into the per-class statistics of one layer (docs/method.md §2).
//
//   x, g : [B, N, S] (channels-first) or [B, S, N] (channels_last), any element strides
//   r    : per sample [B, N, S] by logical axis (r_sb, r_sn, r_ss: any strides, as x's), or one
//          reference for the batch: r_sb = 0 ([N, S]; r_ss = 0 too for a [N] reference); same
//          dtype as x; null = zero reference. Read only for deeplift_sum, at counted positions.
//   labels: int64 [B], or [B, S] (per_token, channels_last only: each token is a sample);
//     a label equal to ignore_index is skipped (its sample, or token, counts nowhere)
//   valid: bool [B, S] (any element strides v_sb, v_ss), or null = every position counts.
//     V_b = {s : valid[b,s]}; a sample with no valid position is skipped; per token, a token
//     with valid false is skipped. Positions outside V_b are never read into any statistic.
//   statistics: contiguous, float32 (double when x is f64): count [K], the others [K, N]; each
//   of the four sums may be null (not computed, not written; count is required)
//     act_sum[k,n]      += sum_b xbar[b,n]          xbar = (1/|V_b|) sum_{s in V_b} x[b,n,s]
//     act_sq[k,n]       += sum_b xbar[b,n]^2
//     taylor_sum[k,n]   += sum_b |sum_{s in V_b} x*g|          (only when g is given)
//     deeplift_sum[k,n] += sum_b |sum_{s in V_b} (x[b,n,s] - r[b,n,s])*g|   (only when g is given)
//   g is not read when taylor_sum and deeplift_sum are both null.
// A non-finite term of a counted position leaves every statistic unchanged and returns a
// nonzero status.
#pragma once
#include <cstdint>

#include "neuslice/common.h"

namespace neuslice {

struct AccumulateArgs {
  const void* x = nullptr;
  const void* g = nullptr;     // may be null
  const void* r = nullptr;     // may be null
  const int64_t* labels = nullptr;
  DType dtype = DType::f32;    // of x, g and r
  int64_t B = 0, N = 0, S = 1, K = 0;
  bool channels_last = false;
  bool per_token = false;
  // Element strides by logical axis (b, n, s), whatever the memory layout.
  int64_t x_sb = 0, x_sn = 0, x_ss = 0;
  int64_t g_sb = 0, g_sn = 0, g_ss = 0;
  int64_t r_sb = 0, r_sn = 0, r_ss = 0;  // r_sb = 0: one reference shared by the batch
  int64_t l_sb = 0, l_ss = 0;  // labels strides (l_ss used when per_token)
  const bool* valid = nullptr;  // [B, S] or null (every position counts)
  int64_t v_sb = 0, v_ss = 0;   // valid strides
  int64_t ignore_index = -100;  // a label equal to it is skipped
  void* count = nullptr;        // required
  void* act_sum = nullptr;
  void* act_sq = nullptr;
  void* taylor_sum = nullptr;
  void* deeplift_sum = nullptr;
};

// CPU (OpenMP, nthreads threads). Returns a Status.
int accumulate_cpu(const AccumulateArgs& a, int nthreads);

#ifdef NEUSLICE_WITH_CUDA
// CUDA: all pointers on the device; launched on `stream` (a cudaStream_t). The status of the
// batch is OR-ed into the device int `status` (zero it first; 0 after the call = committed);
// statistics are committed only when it is 0, without a host round trip.
// `scratch`: `scratch_bytes` >= accumulate_cuda_scratch_bytes(a) bytes of zero-filled device
// memory, 256-byte aligned, that the caller allocates (from torch's caching allocator) and keeps
// alive until the stream has run the call. Returns a launch Status (kOk, kCudaError, or
// kBadArgument, which includes a scratch too small for `a`).
// The size depends on dtype, B, N, S, K, per_token, whether g is null, and the x and g strides
// (they pick the kernel); the data pointers are not read.
int64_t accumulate_cuda_scratch_bytes(const AccumulateArgs& a);
int accumulate_cuda(const AccumulateArgs& a, void* scratch, int64_t scratch_bytes, int* status,
                    void* stream);
#endif

}  // namespace neuslice
