// Reading float32/float64/float16/bfloat16 elements as their accumulation type (CPU kernels).
#pragma once
#include <cstdint>
#include <cstring>

#include "neuslice/common.h"

namespace neuslice {
namespace cpu {

struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

// float16 -> float32 through a 256 KiB table (filled once at load): a gather per element beats
// a branchy software conversion, and F16C is not in the x86-64 baseline we compile for.
extern const float* const kHalfTable;

template <typename T> struct Elem;
template <> struct Elem<float> {
  using acc = float;
  static inline float load(const float* p, int64_t i) { return p[i]; }
};
template <> struct Elem<double> {
  using acc = double;
  static inline double load(const double* p, int64_t i) { return p[i]; }
};
template <> struct Elem<half_t> {
  using acc = float;
  static inline float load(const half_t* p, int64_t i) { return kHalfTable[p[i].bits]; }
};
template <> struct Elem<bf16_t> {
  using acc = float;
  static inline float load(const bf16_t* p, int64_t i) {
    uint32_t u = static_cast<uint32_t>(p[i].bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

// Calls f.template operator()<T>() with T the element type of `dt`.
template <typename F>
inline auto visit_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::f64: return f(static_cast<const double*>(nullptr));
    case DType::f16: return f(static_cast<const half_t*>(nullptr));
    case DType::bf16: return f(static_cast<const bf16_t*>(nullptr));
    case DType::f32:
    default: return f(static_cast<const float*>(nullptr));
  }
}

inline int clamp_threads(int nthreads) { return nthreads < 1 ? 1 : nthreads; }

}  // namespace cpu
}  // namespace neuslice
