// Instruction-set variants of the CPU kernels. accumulate.cpp and masked_update.cpp are compiled
// up to three times: for the x86-64 baseline (namespace isa_base), with AVX2+FMA (isa_avx2) and
// with AVX-512 F/VL/BW/DQ and 512-bit vectors (isa_avx512), see CMakeLists.txt; isa_dispatch.cpp
// picks the widest the CPU runs at run time. Measured on the dev box (1 thread, cold cache): AVX2
// made accumulate 10-20% faster than the baseline on the linear and transformer shapes; AVX-512
// (the ISA torch's own kernels use there, an AMD EPYC) made it a further 4-10% faster on the linear
// shape and masked AdamW 23% faster, and left the other shapes as they were (README, "Benchmarks").
#pragma once

#ifndef NEUSLICE_CPU_ISA
#define NEUSLICE_CPU_ISA isa_base
#endif

// A loop that the AVX-512 build keeps at 256-bit vectors (where 512-bit ones measured slower); not
// inlined, since GCC vectorizes an inlined body with its caller's options.
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define NEUSLICE_VEC256 __attribute__((noinline, target("prefer-vector-width=256")))
#else
#define NEUSLICE_VEC256
#endif

#include <string>
#include <vector>

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
NEUSLICE_DECLARE_ISA(isa_avx512)
#undef NEUSLICE_DECLARE_ISA

// Name of the variant the dispatcher uses ("avx512", "avx2" or "base"): the widest this CPU and build
// run, or the one NEUSLICE_CPU_ISA (read at the first call) or set_cpu_isa() chose.
const char* cpu_isa();
// The variants this CPU and build can run, narrowest first.
std::vector<std::string> cpu_isas();
// Use variant `name` from now on; false (nothing changes) when this CPU or build cannot run it.
// For tests and benchmarks that compare the variants in one process; calls already running finish
// with the variant they started with.
bool set_cpu_isa(const char* name);
}  // namespace neuslice
