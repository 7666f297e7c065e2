// accumulate on the CPU: one pass over x (and g, r), per-class statistics of one layer.
//
// Plan (measured on the 2-core dev box, see bench/bench_ops.py):
//  - Labels are first mapped to the Kb classes present in the batch. Threads own disjoint neuron
//    tiles and add per-sample terms into a scratch [4][Kb][N] (4 statistics), so no two threads
//    write the same address and no atomics are needed.
//  - Channels-first with S > 1: each (b, n) is an S-run; x, x*g and (x-r)*g are reduced over it in
//    one SIMD loop. Channels-last (and S == 1): each thread walks rows x[b, s, n0:n1] and reduces
//    over s into tile-sized accumulators, so every load is a contiguous run.
//  - Non-finite input: a non-finite term makes its scratch sum non-finite (inf and NaN propagate
//    through addition), so one scan of the scratch after the pass finds it, with no per-element
//    test in the hot loop. Only then is the scratch added into the statistics: a rejected batch
//    changes nothing.
// Scratch is Kb*N*4 values: independent of B and S, never the size of x.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "load.h"
#include "neuslice/accumulate.h"

namespace neuslice {
namespace {

using cpu::Elem;

template <typename Acc>
struct Scratch {
  int64_t kb, n;
  std::vector<Acc> v;  // [4][kb][n]
  Scratch(int64_t kb_, int64_t n_) : kb(kb_), n(n_), v(static_cast<size_t>(4 * kb_ * n_), Acc(0)) {}
  Acc* plane(int p, int64_t c) { return v.data() + (p * kb + c) * n; }
};

// Channels-first, S > 1: reduce each (b, n) S-run.
template <typename T, bool HasG, bool HasR, bool Unit>
void tile_cf(const AccumulateArgs& a, const int32_t* lab, Scratch<typename Elem<T>::acc>& sc,
             int64_t n0, int64_t n1) {
  using Acc = typename Elem<T>::acc;
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const T* r = static_cast<const T*>(a.r);
  const int64_t S = a.S;
  const int64_t xs = Unit ? 1 : a.x_ss, gs = Unit ? 1 : a.g_ss;
  const Acc inv_s = Acc(1) / static_cast<Acc>(S);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t c = lab[b];
    Acc* p0 = sc.plane(0, c);
    Acc* p1 = sc.plane(1, c);
    Acc* p2 = sc.plane(2, c);
    Acc* p3 = sc.plane(3, c);
    for (int64_t n = n0; n < n1; ++n) {
      const T* xp = x + b * a.x_sb + n * a.x_sn;
      Acc sx = 0, sg = 0, sd = 0;
      if constexpr (HasG) {
        const T* gp = g + b * a.g_sb + n * a.g_sn;
        if constexpr (HasR) {
          const T* rp = r + n * a.r_sn;
          const int64_t rs = a.r_ss;
#pragma omp simd reduction(+ : sx, sg, sd)
          for (int64_t s = 0; s < S; ++s) {
            const Acc v = Elem<T>::load(xp, s * xs), w = Elem<T>::load(gp, s * gs);
            sx += v;
            sg += v * w;
            sd += (v - Elem<T>::load(rp, s * rs)) * w;
          }
        } else {
#pragma omp simd reduction(+ : sx, sg)
          for (int64_t s = 0; s < S; ++s) {
            const Acc v = Elem<T>::load(xp, s * xs);
            sx += v;
            sg += v * Elem<T>::load(gp, s * gs);
          }
          sd = sg;
        }
      } else {
#pragma omp simd reduction(+ : sx)
        for (int64_t s = 0; s < S; ++s) sx += Elem<T>::load(xp, s * xs);
      }
      const Acc m = sx * inv_s;
      p0[n] += m;
      p1[n] += m * m;
      if constexpr (HasG) {
        p2[n] += std::abs(sg);
        p3[n] += std::abs(sd);
      }
    }
  }
}

// Channels-last (or S == 1), one label per sample: reduce rows x[b, s, n0:n1] over s.
template <typename T, bool HasG, bool HasR, bool Unit>
void tile_cl(const AccumulateArgs& a, const int32_t* lab, Scratch<typename Elem<T>::acc>& sc,
             int64_t n0, int64_t n1) {
  using Acc = typename Elem<T>::acc;
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const T* r = static_cast<const T*>(a.r);
  const int64_t tn = n1 - n0, S = a.S;
  const int64_t xn = Unit ? 1 : a.x_sn, gn = Unit ? 1 : a.g_sn, rn = a.r_sn;
  std::vector<Acc> buf(static_cast<size_t>(3 * tn));
  Acc* ax = buf.data();
  Acc* ag = ax + tn;
  Acc* ad = ag + tn;
  const Acc inv_s = Acc(1) / static_cast<Acc>(S);
  for (int64_t b = 0; b < a.B; ++b) {
    std::fill(buf.begin(), buf.end(), Acc(0));
    for (int64_t s = 0; s < S; ++s) {
      const T* xp = x + b * a.x_sb + s * a.x_ss + n0 * a.x_sn;
      if constexpr (HasG) {
        const T* gp = g + b * a.g_sb + s * a.g_ss + n0 * a.g_sn;
        const T* rp = HasR ? r + s * a.r_ss + n0 * rn : nullptr;
#pragma omp simd
        for (int64_t j = 0; j < tn; ++j) {
          const Acc v = Elem<T>::load(xp, j * xn), w = Elem<T>::load(gp, j * gn);
          ax[j] += v;
          ag[j] += v * w;
          if constexpr (HasR) ad[j] += (v - Elem<T>::load(rp, j * rn)) * w;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < tn; ++j) ax[j] += Elem<T>::load(xp, j * xn);
      }
    }
    const int64_t c = lab[b];
    Acc* p0 = sc.plane(0, c) + n0;
    Acc* p1 = sc.plane(1, c) + n0;
    Acc* p2 = sc.plane(2, c) + n0;
    Acc* p3 = sc.plane(3, c) + n0;
#pragma omp simd
    for (int64_t j = 0; j < tn; ++j) {
      const Acc m = ax[j] * inv_s;
      p0[j] += m;
      p1[j] += m * m;
      if constexpr (HasG) {
        p2[j] += std::abs(ag[j]);
        p3[j] += std::abs(HasR ? ad[j] : ag[j]);
      }
    }
  }
}

// Channels-last with one label per token: each x[b, s, :] row is a sample.
template <typename T, bool HasG, bool HasR, bool Unit>
void tile_tok(const AccumulateArgs& a, const int32_t* lab, Scratch<typename Elem<T>::acc>& sc,
              int64_t n0, int64_t n1) {
  using Acc = typename Elem<T>::acc;
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const T* r = static_cast<const T*>(a.r);
  const int64_t tn = n1 - n0;
  const int64_t xn = Unit ? 1 : a.x_sn, gn = Unit ? 1 : a.g_sn, rn = a.r_sn;
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t s = 0; s < a.S; ++s) {
      const int64_t c = lab[b * a.S + s];
      const T* xp = x + b * a.x_sb + s * a.x_ss + n0 * a.x_sn;
      Acc* p0 = sc.plane(0, c) + n0;
      Acc* p1 = sc.plane(1, c) + n0;
      Acc* p2 = sc.plane(2, c) + n0;
      Acc* p3 = sc.plane(3, c) + n0;
      if constexpr (HasG) {
        const T* gp = g + b * a.g_sb + s * a.g_ss + n0 * a.g_sn;
        const T* rp = HasR ? r + s * a.r_ss + n0 * rn : nullptr;
#pragma omp simd
        for (int64_t j = 0; j < tn; ++j) {
          const Acc v = Elem<T>::load(xp, j * xn), w = Elem<T>::load(gp, j * gn);
          const Acc t = std::abs(v * w);
          p0[j] += v;
          p1[j] += v * v;
          p2[j] += t;
          if constexpr (HasR) {
            p3[j] += std::abs((v - Elem<T>::load(rp, j * rn)) * w);
          } else {
            p3[j] += t;
          }
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < tn; ++j) {
          const Acc v = Elem<T>::load(xp, j * xn);
          p0[j] += v;
          p1[j] += v * v;
        }
      }
    }
  }
}

// Non-finite scan of a tile's scratch columns: 1 for statistics of x, 2 for those of g.
template <typename Acc>
int scan_tile(Scratch<Acc>& sc, int64_t n0, int64_t n1, bool has_g) {
  int flags = 0;
  for (int p = 0; p < (has_g ? 4 : 2); ++p) {
    for (int64_t c = 0; c < sc.kb; ++c) {
      const Acc* row = sc.plane(p, c);
      Acc probe = 0;
      for (int64_t n = n0; n < n1; ++n) probe += row[n] * Acc(0);  // NaN iff a value is inf/NaN
      if (!(probe == Acc(0))) flags |= (p < 2 ? kNonFiniteX : kNonFiniteGrad);
    }
  }
  return flags;
}

template <typename T, bool HasG, bool HasR, bool Unit>
int run(const AccumulateArgs& a, const std::vector<int32_t>& lab, Scratch<typename Elem<T>::acc>& sc,
        int nthreads) {
  const bool cl = a.channels_last || a.S == 1;
  // Tiles: contiguous neuron runs of at most 512 (channels-last accumulators stay in L1), at
  // least 4 per thread for channels-first so that uneven finishing evens out.
  const int64_t per = cl ? std::min<int64_t>(512, (a.N + nthreads - 1) / nthreads)
                         : (a.N + 4 * nthreads - 1) / (4 * nthreads);
  const int64_t tile = std::max<int64_t>(1, cl ? ((per + 15) / 16) * 16 : per);
  const int64_t ntiles = (a.N + tile - 1) / tile;
  int flags = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : flags)
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t n0 = t * tile, n1 = std::min(a.N, n0 + tile);
    if (a.per_token) {
      tile_tok<T, HasG, HasR, Unit>(a, lab.data(), sc, n0, n1);
    } else if (cl) {
      tile_cl<T, HasG, HasR, Unit>(a, lab.data(), sc, n0, n1);
    } else {
      tile_cf<T, HasG, HasR, Unit>(a, lab.data(), sc, n0, n1);
    }
    flags |= scan_tile(sc, n0, n1, HasG);
  }
  return flags;
}

template <typename T>
int accumulate_typed(const AccumulateArgs& a, int nthreads) {
  using Acc = typename Elem<T>::acc;
  // Compact the labels to the classes present (first-seen order).
  const int64_t L = a.per_token ? a.B * a.S : a.B;
  std::vector<int32_t> cmap(static_cast<size_t>(a.K), -1), lab(static_cast<size_t>(L));
  std::vector<int64_t> classes;
  std::vector<Acc> counts;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t k = a.per_token ? a.labels[(i / a.S) * a.l_sb + (i % a.S) * a.l_ss]
                                  : a.labels[i * a.l_sb];
    if (k < 0 || k >= a.K) return kBadLabel;
    if (cmap[k] < 0) {
      cmap[k] = static_cast<int32_t>(classes.size());
      classes.push_back(k);
      counts.push_back(0);
    }
    lab[i] = cmap[k];
    counts[cmap[k]] += 1;
  }
  Scratch<Acc> sc(static_cast<int64_t>(classes.size()), a.N);
  const bool has_g = a.g != nullptr, has_r = a.r != nullptr;
  const bool cl = a.channels_last || a.S == 1;
  // Unit: the axis the inner loop walks (s for channels-first, n otherwise) has stride 1.
  const bool unit = cl ? (a.x_sn == 1 && (!has_g || a.g_sn == 1))
                       : (a.x_ss == 1 && (!has_g || a.g_ss == 1));
  int flags;
  if (!has_g) {
    flags = unit ? run<T, false, false, true>(a, lab, sc, nthreads)
                 : run<T, false, false, false>(a, lab, sc, nthreads);
  } else if (!has_r) {
    flags = unit ? run<T, true, false, true>(a, lab, sc, nthreads)
                 : run<T, true, false, false>(a, lab, sc, nthreads);
  } else {
    flags = unit ? run<T, true, true, true>(a, lab, sc, nthreads)
                 : run<T, true, true, false>(a, lab, sc, nthreads);
  }
  if (flags) return (flags & kNonFiniteX) ? kNonFiniteX : kNonFiniteGrad;

  // Commit: only now is anything written to the statistics.
  Acc* out[4] = {static_cast<Acc*>(a.act_sum), static_cast<Acc*>(a.act_sq),
                 static_cast<Acc*>(a.taylor_sum), static_cast<Acc*>(a.deeplift_sum)};
  const int np = has_g ? 4 : 2;
  const int64_t kb = sc.kb, N = a.N;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
  for (int p = 0; p < np; ++p) {
    for (int64_t c = 0; c < kb; ++c) {
      Acc* dst = out[p] + classes[c] * N;
      const Acc* src = sc.plane(p, c);
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) dst[n] += src[n];
    }
  }
  Acc* cnt = static_cast<Acc*>(a.count);
  for (int64_t c = 0; c < kb; ++c) cnt[classes[c]] += counts[c];
  return kOk;
}

}  // namespace

int accumulate_cpu(const AccumulateArgs& a, int nthreads) {
  if (a.B < 0 || a.N < 0 || a.S < 1 || a.K < 1 || a.x == nullptr || a.labels == nullptr)
    return kBadArgument;
  if (a.per_token && !a.channels_last) return kBadArgument;
  if (a.B == 0) return kOk;
  return cpu::visit_dtype(a.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    return accumulate_typed<T>(a, cpu::clamp_threads(nthreads));
  });
}

}  // namespace neuslice
