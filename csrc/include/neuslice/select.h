// select: per-row slice selection over non-negative scores (docs/method.md §4).
//   scores: [R, N], f32 or f64, element strides (s_r, s_n); out: contiguous bool [R, N].
//   cumulative: per row, the smallest set taken in descending score order (ties: lower index
//     first) whose sum reaches theta * row total (sums in double). An all-zero row selects nothing.
//   topk: per row, the k largest scores (ties: lower index first).
// A negative or non-finite score returns kBadScore (out is then unspecified).
#pragma once
#include <cstdint>

#include "neuslice/common.h"

namespace neuslice {

struct SelectArgs {
  const void* scores = nullptr;
  DType dtype = DType::f32;
  int64_t R = 0, N = 0;
  int64_t s_r = 0, s_n = 1;
  bool* out = nullptr;
};

int select_cumulative_cpu(const SelectArgs& a, double theta, int nthreads);
int select_topk_cpu(const SelectArgs& a, int64_t k, int nthreads);

#ifdef NEUSLICE_WITH_CUDA
// Device pointers; launched on `stream`; kBadScore is OR-ed into the device int `status` (zero it
// first). `out` needs no initialisation: every element is written. Returns a launch Status.
int select_cumulative_cuda(const SelectArgs& a, double theta, int* status, void* stream);
int select_topk_cuda(const SelectArgs& a, int64_t k, int* status, void* stream);
#endif

}  // namespace neuslice
