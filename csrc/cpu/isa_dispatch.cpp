// Run-time choice between the baseline and AVX2+FMA builds of the CPU kernels (see isa.h).
#include "isa.h"

namespace neuslice {
namespace {

bool has_avx2() {
#if defined(NEUSLICE_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace

#ifdef NEUSLICE_HAVE_AVX2
#define NEUSLICE_PICK(fn, ...) (has_avx2() ? isa_avx2::fn(__VA_ARGS__) : isa_base::fn(__VA_ARGS__))
#else
#define NEUSLICE_PICK(fn, ...) isa_base::fn(__VA_ARGS__)
#endif

const char* cpu_isa() { return has_avx2() ? "avx2" : "base"; }

int accumulate_cpu(const AccumulateArgs& a, int nthreads) {
  return NEUSLICE_PICK(accumulate_cpu, a, nthreads);
}

int masked_sgd_cpu(const MaskedParam& p, void* momentum_buf, double lr, double momentum,
                   double weight_decay, int nthreads) {
  return NEUSLICE_PICK(masked_sgd_cpu, p, momentum_buf, lr, momentum, weight_decay, nthreads);
}

int masked_adamw_cpu(const MaskedParam& p, void* exp_avg, void* exp_avg_sq, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step,
                     int nthreads) {
  return NEUSLICE_PICK(masked_adamw_cpu, p, exp_avg, exp_avg_sq, lr, beta1, beta2, eps,
                       weight_decay, step, nthreads);
}

}  // namespace neuslice
