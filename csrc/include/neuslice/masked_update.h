// masked_update: one fused optimizer step over a parameter whose trainable part is a mask.
//   param, grad and the optimizer states: contiguous, same dtype (f32 or f64), viewed as
//   [rows, cols] with rows = param.shape[0].
//   mask: contiguous bool, [rows] (per_row: a neuron mask) or [rows * cols] (per weight).
// Frozen entries of param and of every state are never written. Trainable entries follow
// torch.optim.SGD (dampening 0, no nesterov) and torch.optim.AdamW (no amsgrad) exactly in
// formula; `step` is the step number after this update (1 for the first).
#pragma once
#include <cstdint>

#include "neuslice/common.h"

namespace neuslice {

struct MaskedParam {
  void* param = nullptr;
  const void* grad = nullptr;
  const bool* mask = nullptr;
  DType dtype = DType::f32;
  int64_t rows = 0, cols = 1;
  bool per_row = true;
};

int masked_sgd_cpu(const MaskedParam& p, void* momentum_buf, double lr, double momentum,
                   double weight_decay, int nthreads);
int masked_adamw_cpu(const MaskedParam& p, void* exp_avg, void* exp_avg_sq, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step,
                     int nthreads);

}  // namespace neuslice
