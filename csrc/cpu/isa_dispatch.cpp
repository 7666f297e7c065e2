// Run-time choice between the instruction-set builds of the CPU kernels (see isa.h): the widest
// this CPU supports, unless NEUSLICE_CPU_ISA (read once) or set_cpu_isa() names another one.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "isa.h"

namespace neuslice {
namespace {

enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kNames[] = {"base", "avx2", "avx512"};

bool built(int isa) {
  switch (isa) {
    case kBase: return true;
#ifdef NEUSLICE_HAVE_AVX2
    case kAvx2: return true;
#endif
#ifdef NEUSLICE_HAVE_AVX512
    case kAvx512: return true;
#endif
    default: return false;
  }
}

bool supported(int isa) {
  if (!built(isa)) return false;
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    // (the set torch's own AVX512 kernels require; the build uses F, VL, BW and DQ)
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
    default: return true;
  }
#else
  return isa == kBase;
#endif
}

int widest() {
  for (int isa = kAvx512; isa > kBase; --isa)
    if (supported(isa)) return isa;
  return kBase;
}

int by_name(const char* name) {
  for (int isa = kBase; isa <= kAvx512; ++isa)
    if (std::strcmp(name, kNames[isa]) == 0) return isa;
  return -1;
}

// NEUSLICE_CPU_ISA=base|avx2|avx512 caps the choice (e.g. avx2 on a CPU that slows its clock under
// 512-bit code); a name this CPU or build cannot run, or an unknown one, leaves the widest.
int initial() {
  const int best = widest();
  const char* env = std::getenv("NEUSLICE_CPU_ISA");
  if (env == nullptr) return best;
  const int want = by_name(env);
  return (want >= 0 && supported(want)) ? want : best;
}

std::atomic<int>& chosen() {
  static std::atomic<int> isa{initial()};
  return isa;
}

}  // namespace

const char* cpu_isa() { return kNames[chosen().load(std::memory_order_relaxed)]; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (int isa = kBase; isa <= kAvx512; ++isa)
    if (supported(isa)) out.emplace_back(kNames[isa]);
  return out;
}

bool set_cpu_isa(const char* name) {
  const int isa = by_name(name);
  if (isa < 0 || !supported(isa)) return false;
  chosen().store(isa, std::memory_order_relaxed);
  return true;
}

#define NEUSLICE_ISA_CASE_AVX2(fn, ...)
#define NEUSLICE_ISA_CASE_AVX512(fn, ...)
#ifdef NEUSLICE_HAVE_AVX2
#undef NEUSLICE_ISA_CASE_AVX2
#define NEUSLICE_ISA_CASE_AVX2(fn, ...) \
  case kAvx2: return isa_avx2::fn(__VA_ARGS__);
#endif
#ifdef NEUSLICE_HAVE_AVX512
#undef NEUSLICE_ISA_CASE_AVX512
#define NEUSLICE_ISA_CASE_AVX512(fn, ...) \
  case kAvx512: return isa_avx512::fn(__VA_ARGS__);
#endif
#define NEUSLICE_PICK(fn, ...)                       \
  switch (chosen().load(std::memory_order_relaxed)) { \
    NEUSLICE_ISA_CASE_AVX512(fn, __VA_ARGS__)          \
    NEUSLICE_ISA_CASE_AVX2(fn, __VA_ARGS__)            \
    default: return isa_base::fn(__VA_ARGS__);         \
  }

int accumulate_cpu(const AccumulateArgs& a, int nthreads) {
  NEUSLICE_PICK(accumulate_cpu, a, nthreads);
}

int masked_sgd_cpu(const MaskedParam& p, void* momentum_buf, double lr, double momentum,
                   double weight_decay, int nthreads) {
  NEUSLICE_PICK(masked_sgd_cpu, p, momentum_buf, lr, momentum, weight_decay, nthreads);
}

int masked_adamw_cpu(const MaskedParam& p, void* exp_avg, void* exp_avg_sq, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step,
                     int nthreads) {
  NEUSLICE_PICK(masked_adamw_cpu, p, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                nthreads);
}

}  // namespace neuslice
