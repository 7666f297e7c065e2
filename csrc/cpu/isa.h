// Instruction-set variants of the CPU kernels. accumulate.cpp and masked_update.cpp are compiled
// twice: for the x86-64 baseline (namespace isa_base) and with AVX2+FMA (namespace isa_avx2, see
// CMakeLists.txt); isa_dispatch.cpp picks one at run time. Measured on the dev box (1 thread, cold
// cache): AVX2 made accumulate 10-20% faster on the linear and transformer shapes.
#pragma once

#ifndef NEUSLICE_CPU_ISA
#define NEUSLICE_CPU_ISA isa_base
#endif

#include "neuslice/accumulate.h"
#include "neuslice/masked_update.h"

namespace neuslice {
#define NEUSLICE_DECLARE_ISA(ns)                                                                \
  namespace ns {                                                                                \
  int accumulate_cpu(const AccumulateArgs& a, int nthreads);                                    \
  int masked_sgd_cpu(const MaskedParam& p, void* momentum_buf, double lr, double momentum,      \
                     double weight_decay, int nthreads);                                        \
  int masked_adamw_cpu(const MaskedParam& p, void* exp_avg, void* exp_avg_sq, double lr,        \
                       double beta1, double beta2, double eps, double weight_decay,             \
                       int64_t step, int nthreads);                                             \
  }
NEUSLICE_DECLARE_ISA(isa_base)
NEUSLICE_DECLARE_ISA(isa_avx2)
#undef NEUSLICE_DECLARE_ISA

// Name of the variant the dispatcher uses on this CPU ("avx2" or "base").
const char* cpu_isa();
}  // namespace neuslice
