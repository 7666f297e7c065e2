// masked_update on the CPU: one fused pass of SGD (momentum) or AdamW over param, grad and state.
//
// Per-neuron masks skip frozen rows outright (their grad and state are never read). Per-weight
// masks blend: frozen entries are stored back with the bits that were loaded, so they stay
// bit-identical while the loop still vectorizes. The arithmetic follows the order of the
// torch.optim single-tensor formulas (hyper-parameters combined in double, applied in the
// parameter's dtype), so trainable entries match torch to rounding.
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "load.h"
#include "isa.h"
#include "neuslice/masked_update.h"

namespace neuslice {
namespace NEUSLICE_CPU_ISA {
namespace {

template <typename V>
struct Sgd {
  V lr, momentum, wd;
  bool use_momentum, use_wd;
  V* buf;
  inline void operator()(V* p, const V* g, int64_t i, bool keep) const {
    V d = g[i];
    if (use_wd) d = d + wd * p[i];
    if (use_momentum) {
      const V b = buf[i] * momentum + d;
      buf[i] = keep ? b : buf[i];
      d = b;
    }
    const V np = p[i] + (-lr) * d;
    p[i] = keep ? np : p[i];
  }
};

template <typename V>
struct AdamW {
  V decay, w1, beta2, one_minus_b2, bc2_sqrt, eps, neg_step;
  bool small_w1;
  V* m;
  V* v;
  inline void operator()(V* p, const V* g, int64_t i, bool keep) const {
    const V gi = g[i];
    const V np0 = p[i] * decay;
    const V mi = small_w1 ? m[i] + w1 * (gi - m[i]) : gi - (gi - m[i]) * (V(1) - w1);
    const V vi = v[i] * beta2 + one_minus_b2 * gi * gi;
    const V denom = std::sqrt(vi) / bc2_sqrt + eps;
    const V np = np0 + neg_step * (mi / denom);
    m[i] = keep ? mi : m[i];
    v[i] = keep ? vi : v[i];
    p[i] = keep ? np : p[i];
  }
};

template <typename V, typename Step>
void apply(const MaskedParam& mp, const Step& step, int nthreads) {
  V* p = static_cast<V*>(mp.param);
  const V* g = static_cast<const V*>(mp.grad);
  const int64_t cols = mp.cols;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < mp.rows; ++r) {
    const int64_t o = r * cols;
    if (mp.per_row) {
      if (!mp.mask[r]) continue;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) step(p, g, o + j, true);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) step(p, g, o + j, mp.mask[o + j]);
    }
  }
}

template <typename V>
int sgd_typed(const MaskedParam& mp, void* buf, double lr, double momentum, double wd, int nt) {
  Sgd<V> s{static_cast<V>(lr), static_cast<V>(momentum), static_cast<V>(wd), momentum != 0.0,
           wd != 0.0, static_cast<V*>(buf)};
  apply<V>(mp, s, nt);
  return kOk;
}

template <typename V>
int adamw_typed(const MaskedParam& mp, void* m, void* v, double lr, double b1, double b2,
                double eps, double wd, int64_t step, int nt) {
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step));
  const double w1 = 1.0 - b1;
  AdamW<V> s{static_cast<V>(1.0 - lr * wd), static_cast<V>(w1), static_cast<V>(b2),
             static_cast<V>(1.0 - b2), static_cast<V>(std::sqrt(bc2)), static_cast<V>(eps),
             static_cast<V>(-(lr / bc1)), std::abs(w1) < 0.5, static_cast<V*>(m),
             static_cast<V*>(v)};
  apply<V>(mp, s, nt);
  return kOk;
}

bool valid(const MaskedParam& mp) {
  return mp.param && mp.grad && mp.mask && mp.rows >= 0 && mp.cols >= 0 &&
         (mp.dtype == DType::f32 || mp.dtype == DType::f64);
}

}  // namespace

int masked_sgd_cpu(const MaskedParam& mp, void* momentum_buf, double lr, double momentum,
                   double weight_decay, int nthreads) {
  if (!valid(mp) || (momentum != 0.0 && !momentum_buf)) return kBadArgument;
  const int nt = cpu::clamp_threads(nthreads);
  return mp.dtype == DType::f64 ? sgd_typed<double>(mp, momentum_buf, lr, momentum, weight_decay, nt)
                                : sgd_typed<float>(mp, momentum_buf, lr, momentum, weight_decay, nt);
}

int masked_adamw_cpu(const MaskedParam& mp, void* exp_avg, void* exp_avg_sq, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step,
                     int nthreads) {
  if (!valid(mp) || !exp_avg || !exp_avg_sq || step < 1) return kBadArgument;
  const int nt = cpu::clamp_threads(nthreads);
  return mp.dtype == DType::f64
             ? adamw_typed<double>(mp, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, nt)
             : adamw_typed<float>(mp, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, nt);
}

}  // namespace NEUSLICE_CPU_ISA
}  // namespace neuslice
