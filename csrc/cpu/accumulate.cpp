// accumulate on the CPU: one pass over x (and g, r), per-class statistics of one layer.
//
// Plan (measured on the 2-core dev box with bench/bench_ops.py; see run() for the schedules):
//  - Labels are first mapped to the Kb classes present in the batch; per-sample terms go into a
//    scratch [4][Kb][N] (4 statistics), never into the statistics directly.
//  - By default each thread streams whole samples into a private scratch (summed afterwards);
//    with many classes in a batch, threads instead own neuron tiles of one shared scratch. Either
//    way no two threads write one address and no atomics are needed.
//  - Channels-first with S > 1: each (b, n) is an S-run reduced in one SIMD loop. Channels-last:
//    rows x[b, s, :] are summed into per-sample accumulators, 4 at a time when a row is 8 KiB or
//    more, one at a time below (kShortRowBytes). One position per sample (S == 1, or per-token
//    labels): rows sorted by class, summed 4 at a time per class run.
//  - Counted rows only: labels equal to ignore_index, samples with no valid position and invalid
//    tokens are dropped before the pass; a sample's valid positions are walked as runs (padding
//    is usually one run at an end), so padding is never read and costs nothing.
//  - Non-finite input: a non-finite term makes its scratch sum non-finite (inf and NaN propagate
//    through addition), so there is no per-element test of the input. The rows schedule folds a
//    probe of every value it stores into registers (on one thread that decides); otherwise one
//    scan of the (reduced) scratch after the pass does. Only then is the scratch added into the
//    statistics: a rejected batch changes nothing.
// Scratch is Kb*N*(2 to 4) values per scratch: independent of B and S, never the size of x.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "accumulate_scratch.h"
#include "load.h"
#include "isa.h"
#include "neuslice/accumulate.h"

namespace neuslice {
namespace NEUSLICE_CPU_ISA {
namespace {

using cpu::Elem;

// Rows are added R at a time (R = kRows when enough remain): partial sums of R rows stay in
// registers and the L1 accumulators are read and written once per R rows. Measured on the linear
// shape (hot cache, 1 thread): one row at a time was bound by those loads/stores, not by memory.
constexpr int kRows = 4;
// Channels-last rows shorter than 8 KiB are added one at a time, in memory order. Four short rows
// lie in one or two pages, and reading them side by side (row0[j], row1[j], ...) hides the
// sequential walk from the hardware prefetcher, which follows streams page by page. Measured on
// 1 thread from a cold cache, kernel alone against x.sum(); g.sum() (a scratch script, then
// bench_ops.py vs_floor, which now times these ViT/MiniLM tap shapes [B, S, N]): one row at a
// time, N = 192 / 384 / 768: 0.70 / 0.62 / 0.87 ->
// 1.22 / 1.21 / 1.18; N = 1536 (6 KiB rows): 0.70 -> 0.91; rows of 12 KiB (N = 3072) stay at 4 at a
// time (0.81, against 0.65 one at a time; 2 rows 0.73, 8 rows 0.83).
constexpr int64_t kShortRowBytes = 8192;

// Sums over R rows of one sample's positions (channels-last): ax += v, ag += v*w, ad += (v-r)*w.
// 256-bit vectors in the AVX-512 build too (NEUSLICE_VEC256): on the MiniLM FFN tap shape (rows of
// 6 KiB, one at a time: 2 loads and 2 stores of L1 accumulators per vector of x) 512-bit vectors were
// 3-7% slower than the AVX2 build in two of three interleaved runs (1 thread, cold cache).
template <typename T, bool HasG, bool HasR, bool Unit, int R>
NEUSLICE_VEC256 void add_positions(const T* const* xp, const T* const* gp, const T* const* rp, int64_t tn,
                          int64_t xn, int64_t gn, int64_t rn, typename Elem<T>::acc* __restrict__ ax,
                          typename Elem<T>::acc* __restrict__ ag, typename Elem<T>::acc* __restrict__ ad) {
  using Acc = typename Elem<T>::acc;
#pragma omp simd
  for (int64_t j = 0; j < tn; ++j) {
    Acc sx = 0, sg = 0, sd = 0;
    for (int k = 0; k < R; ++k) {
      const Acc v = Elem<T>::load(xp[k], j * (Unit ? 1 : xn));
      sx += v;
      if constexpr (HasG) {
        const Acc w = Elem<T>::load(gp[k], j * (Unit ? 1 : gn));
        sg += v * w;
        if constexpr (HasR) sd += (v - Elem<T>::load(rp[k], j * (Unit ? 1 : rn))) * w;
      }
    }
    ax[j] += sx;
    if constexpr (HasG) ag[j] += sg;
    if constexpr (HasR) ad[j] += sd;
  }
}

// Sums over R rows that are samples of one class, columns [j0, j1): a0 += v, a1 += v^2,
// a2 += |v*w|, a3 += |(v-r)*w| (with First, = instead of +=: the scratch is not zeroed beforehand).
// Returns in qx / qg a probe of the values stored: NaN iff one of a0, a1 (qx) or a2, a3 (qg) is
// inf or NaN. Only a1 is probed for x: a non-finite v makes a1 non-finite, and a0 can overflow
// only through some |v| > max / (terms) > sqrt(max) (fewer than 2^40 terms), whose square
// overflows a1. A non-finite partial sum stays non-finite in every later sum, so the probes of all
// groups decide the final values' finiteness without a scan of the scratch.
template <typename T, bool HasG, bool HasR, bool Unit, int R, bool First>
inline void add_samples(const T* const* xp, const T* const* gp, const T* const* rp, int64_t j0, int64_t j1,
                        int64_t xn, int64_t gn, int64_t rn, typename Elem<T>::acc* __restrict__ a0,
                        typename Elem<T>::acc* __restrict__ a1, typename Elem<T>::acc* __restrict__ a2,
                        typename Elem<T>::acc* __restrict__ a3, typename Elem<T>::acc& qx,
                        typename Elem<T>::acc& qg) {
  using Acc = typename Elem<T>::acc;
  Acc px = 0, pg = 0;
#pragma omp simd reduction(+ : px, pg)
  for (int64_t j = j0; j < j1; ++j) {
    Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int k = 0; k < R; ++k) {
      const Acc v = Elem<T>::load(xp[k], j * (Unit ? 1 : xn));
      s0 += v;
      s1 += v * v;
      if constexpr (HasG) {
        const Acc w = Elem<T>::load(gp[k], j * (Unit ? 1 : gn));
        s2 += std::abs(v * w);
        if constexpr (HasR) s3 += std::abs((v - Elem<T>::load(rp[k], j * (Unit ? 1 : rn))) * w);
      }
    }
    if constexpr (!First) {
      s0 += a0[j];
      s1 += a1[j];
      if constexpr (HasG) s2 += a2[j];
      if constexpr (HasR) s3 += a3[j];
    }
    a0[j] = s0;
    a1[j] = s1;
    px += s1 * Acc(0);  // s1 (squares) is inf/NaN whenever s0 is: see below
    if constexpr (HasG) {
      a2[j] = s2;
      pg += s2 * Acc(0);
    }
    if constexpr (HasR) {
      a3[j] = s3;
      pg += s3 * Acc(0);
    }
  }
  qx += px;
  qg += pg;
}

// Sample b, channels-first with S > 1, neurons [n0, n1): reduce each (b, n) S-run.
// `runs` holds the sample's valid positions as nruns runs [runs[2i], runs[2i+1]) (one run [0, S)
// without a valid mask; padding is usually one run at either end), and inv_s = 1 / |V_b|:
// positions outside them are never read. 256-bit vectors in the AVX-512 build (NEUSLICE_VEC256): on
// the conv shape (S = 196: runs of 12.25 512-bit vectors, each ending in a horizontal sum) 512-bit
// vectors were 0-8% slower than the AVX2 build in interleaved runs (1 thread, cold cache).
template <typename T, bool HasG, bool HasR, bool Unit>
NEUSLICE_VEC256 void sample_cf(const AccumulateArgs& a, int64_t b, int64_t c, Scratch<typename Elem<T>::acc>& sc,
               int64_t n0, int64_t n1, const int64_t* runs, int64_t nruns, typename Elem<T>::acc inv_s) {
  using Acc = typename Elem<T>::acc;
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const T* r = static_cast<const T*>(a.r);
  const int64_t xs = Unit ? 1 : a.x_ss, gs = Unit ? 1 : a.g_ss;
  Acc* p0 = sc.plane(0, c);
  Acc* p1 = sc.plane(1, c);
  Acc* p2 = sc.plane(2, c);
  Acc* p3 = sc.plane(3, c);
  for (int64_t n = n0; n < n1; ++n) {
    const T* xp = x + b * a.x_sb + n * a.x_sn;
    Acc sx = 0, sg = 0, sd = 0;
    for (int64_t q = 0; q < nruns; ++q) {
      const int64_t s0 = runs[2 * q], s1 = runs[2 * q + 1];
      if constexpr (HasG) {
        const T* gp = g + b * a.g_sb + n * a.g_sn;
        if constexpr (HasR) {
          const T* rp = r + b * a.r_sb + n * a.r_sn;
          const int64_t rs = a.r_ss;
#pragma omp simd reduction(+ : sx, sg, sd)
          for (int64_t s = s0; s < s1; ++s) {
            const Acc v = Elem<T>::load(xp, s * xs), w = Elem<T>::load(gp, s * gs);
            sx += v;
            sg += v * w;
            sd += (v - Elem<T>::load(rp, s * (Unit ? 1 : rs))) * w;
          }
        } else {
#pragma omp simd reduction(+ : sx, sg)
          for (int64_t s = s0; s < s1; ++s) {
            const Acc v = Elem<T>::load(xp, s * xs);
            sx += v;
            sg += v * Elem<T>::load(gp, s * gs);
          }
        }
      } else {
#pragma omp simd reduction(+ : sx)
        for (int64_t s = s0; s < s1; ++s) sx += Elem<T>::load(xp, s * xs);
      }
    }
    const Acc m = sx * inv_s;
    p0[n] += m;
    p1[n] += m * m;
    if constexpr (HasG) p2[n] += std::abs(sg);
    if constexpr (HasR) p3[n] += std::abs(sd);
  }
}

// Sample b, channels-last with S > 1, neurons [n0, n1): reduce rows x[b, s, n0:n1] over s into
// `buf` (3 accumulator rows, 64-byte aligned, Scratch::lead(n1 - n0) apart: rows that start mid-line
// made every 512-bit load and store of them split a cache line), then add the sample's terms.
// Positions: the valid runs of the sample and inv_s = 1 / |V_b|, as in sample_cf.
template <typename T, bool HasG, bool HasR, bool Unit>
void sample_cl(const AccumulateArgs& a, int64_t b, int64_t c, Scratch<typename Elem<T>::acc>& sc,
               int64_t n0, int64_t n1, typename Elem<T>::acc* buf, const int64_t* runs, int64_t nruns,
               typename Elem<T>::acc inv_s) {
  using Acc = typename Elem<T>::acc;
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const T* r = static_cast<const T*>(a.r);
  const int64_t tn = n1 - n0, ld = Scratch<Acc>::lead(tn);
  Acc* ax = buf;
  Acc* ag = ax + ld;
  Acc* ad = ag + ld;
  std::fill(buf, buf + 3 * ld, Acc(0));
  const T* xp[kRows];
  const T* gp[kRows];
  const T* rp[kRows];
  for (int64_t q = 0; q < nruns; ++q)
  for (int64_t s0 = runs[2 * q], S = runs[2 * q + 1]; s0 < S;) {
    const int rows = (tn * int64_t(sizeof(T)) >= kShortRowBytes && S - s0 >= kRows) ? kRows : 1;
    for (int k = 0; k < rows; ++k) {
      const int64_t s = s0 + k;
      xp[k] = x + b * a.x_sb + s * a.x_ss + n0 * a.x_sn;
      gp[k] = HasG ? g + b * a.g_sb + s * a.g_ss + n0 * a.g_sn : nullptr;
      rp[k] = HasR ? r + b * a.r_sb + s * a.r_ss + n0 * a.r_sn : nullptr;
    }
    if (rows == kRows) {
      add_positions<T, HasG, HasR, Unit, kRows>(xp, gp, rp, tn, a.x_sn, a.g_sn, a.r_sn, ax, ag, ad);
    } else {
      add_positions<T, HasG, HasR, Unit, 1>(xp, gp, rp, tn, a.x_sn, a.g_sn, a.r_sn, ax, ag, ad);
    }
    s0 += rows;
  }
  Acc* p0 = sc.plane(0, c) + n0;
  Acc* p1 = sc.plane(1, c) + n0;
  Acc* p2 = sc.plane(2, c) + n0;
  Acc* p3 = sc.plane(3, c) + n0;
#pragma omp simd
  for (int64_t j = 0; j < tn; ++j) {
    const Acc m = ax[j] * inv_s;
    p0[j] += m;
    p1[j] += m * m;
    if constexpr (HasG) p2[j] += std::abs(ag[j]);
    if constexpr (HasR) p3[j] += std::abs(ad[j]);
  }
}

// Rows as samples (S == 1, or tokens under per-token labels), neurons [n0, n1). `order` lists the
// rows sorted by class (one run per class); each run is summed kRows rows at a time straight into
// its class's scratch rows, the first group written, not added, so the scratch needs no zeroing
// pass; classes with no row in `order` are zeroed. Measured on linear B=1024 N=4096, 1 thread,
// hot cache, B = 10 / 10 classes: a zeroed per-run buffer copied into the scratch cost about 7 us
// per class on top of the pass (the pass itself: 13 us for one row).
//
// Why 4 rows and no software prefetch: a group reads 2 streams per row (x, g; 3 with a per-sample
// reference), and the hardware prefetcher keeps up with the 8 streams of a 4-row group but not
// with 16 (8 rows), nor with 8 more requested ahead for the next group. Standalone loop, linear
// B=1024 N=4096, 1 thread, cold cache, median of 41 interleaved, ratio to reading x and g once:
// 8 rows + next-group prefetch 0.70, 8 rows 0.77-0.82, 4 rows + next-group prefetch 0.85-0.88,
// 4 rows 0.98-0.99 (two runs).
template <typename T, bool HasG, bool HasR, bool Unit>
int rows_by_class(const AccumulateArgs& a, const int32_t* lab, const std::vector<int64_t>& order,
                   Scratch<typename Elem<T>::acc>& sc, int64_t n0, int64_t n1) {
  using Acc = typename Elem<T>::acc;
  // Column blocks of 4096 (4 accumulators: 64 KiB, L2): measured on linear B=1024 N=4096, 1 thread,
  // median of 20: 2.7 ms against 3.3 ms for 1024-wide blocks (which re-walk every row 4 times).
  constexpr int64_t kBlock = 4096;
  const int64_t S = a.per_token ? a.S : 1, nrows = static_cast<int64_t>(order.size());
  std::vector<char> seen(static_cast<size_t>(sc.kb), 0);
  Acc qx = 0, qg = 0;
  const T* xp[kRows];
  const T* gp[kRows];
  const T* rp[kRows];
  for (int64_t i = 0; i < nrows;) {
    const int64_t c = lab[order[i]];
    int64_t end = i;
    while (end < nrows && lab[order[end]] == c) ++end;
    seen[c] = 1;
    for (int64_t m0 = n0; m0 < n1; m0 += kBlock) {
      const int64_t m1 = std::min(n1, m0 + kBlock);
      Acc* acc[4] = {};
      for (int p = 0; p < sc.np; ++p) acc[p] = sc.plane(p, c);
      for (int64_t r = i; r < end;) {
        const int rows = end - r >= kRows ? kRows : 1;
        for (int k = 0; k < rows; ++k) {
          const int64_t b = order[r + k] / S, s = order[r + k] % S;
          xp[k] = static_cast<const T*>(a.x) + b * a.x_sb + s * a.x_ss;
          gp[k] = HasG ? static_cast<const T*>(a.g) + b * a.g_sb + s * a.g_ss : nullptr;
          rp[k] = HasR ? static_cast<const T*>(a.r) + b * a.r_sb + s * a.r_ss : nullptr;
        }
#define NEUSLICE_ADD(R_, FIRST_)                                                                      \
  add_samples<T, HasG, HasR, Unit, R_, FIRST_>(xp, gp, rp, m0, m1, a.x_sn, a.g_sn, a.r_sn, acc[0], acc[1], \
                                              acc[2], acc[3], qx, qg)
        if (rows == kRows) {
          if (r == i) NEUSLICE_ADD(kRows, true); else NEUSLICE_ADD(kRows, false);
        } else {
          if (r == i) NEUSLICE_ADD(1, true); else NEUSLICE_ADD(1, false);
        }
#undef NEUSLICE_ADD
        r += rows;
      }
    }
    i = end;
  }
  for (int64_t c = 0; c < sc.kb; ++c)
    if (!seen[c]) sc.zero(c, n0, n1);
  return (qx == Acc(0) ? 0 : kNonFiniteX) | (qg == Acc(0) ? 0 : kNonFiniteGrad);
}

// Channels-last accumulators cover at most this many neurons (3 arrays of 4096 floats: 48 KiB, in
// L2; measured faster than 512-2048 blocks on the transformer shape, which re-walk the rows).
constexpr int64_t kClBlock = 4096;

// What of the batch counts, decided once from labels, ignore_index and valid before any pass.
// A row is a sample (per-sample labels) or a token b * S + s (per-token labels).
template <typename Acc>
struct Batch {
  std::vector<int32_t> lab;     // compact class of each row, -1 = skipped (never read)
  std::vector<int64_t> kept;    // the counted rows, ascending: the passes walk these only
  // Per-sample labels with S > 1: the valid positions of sample b as runs [s0, s1), pairs
  // runs[2 * run_off[b] ...], and inv[b] = 1 / |V_b|.
  std::vector<int64_t> run_off, runs;
  std::vector<Acc> inv;
  // With a valid mask and S > 1: work[i] = valid positions of kept rows 0..i (for the thread split).
  std::vector<int64_t> work;
};

// All counted rows' terms for neurons [n0, n1) into `sc`, counted rows [r0, r1) (indices into
// bt.kept). Returns the non-finite flags of the scratch when the schedule knows them (rows), -1
// when a scan must tell.
template <typename T, bool HasG, bool HasR, bool Unit>
int run_range(const AccumulateArgs& a, const Batch<typename Elem<T>::acc>& bt, Scratch<typename Elem<T>::acc>& sc,
               int64_t r0, int64_t r1, int64_t n0, int64_t n1) {
  using Acc = typename Elem<T>::acc;
  const bool rows = a.per_token || a.S == 1;  // one position per sample
  const int32_t* lab = bt.lab.data();
  const int64_t* kept = bt.kept.data();
  if (rows) {
    // Counting sort of rows [r0, r1) by class: stable, so equal classes keep their row order.
    std::vector<int64_t> start(static_cast<size_t>(sc.kb) + 1, 0), order(static_cast<size_t>(r1 - r0));
    for (int64_t i = r0; i < r1; ++i) start[lab[kept[i]] + 1] += 1;
    for (int64_t c = 0; c < sc.kb; ++c) start[c + 1] += start[c];
    for (int64_t i = r0; i < r1; ++i) order[start[lab[kept[i]]]++] = kept[i];
    return rows_by_class<T, HasG, HasR, Unit>(a, lab, order, sc, n0, n1);
  } else if (a.channels_last) {
    for (int64_t c = 0; c < sc.kb; ++c) sc.zero(c, n0, n1);
    const Block buf = allocate(3 * Scratch<Acc>::lead(std::min(kClBlock, n1 - n0)) * sizeof(Acc));
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t b = kept[i], q0 = bt.run_off[b];
      for (int64_t m0 = n0; m0 < n1; m0 += kClBlock)
        sample_cl<T, HasG, HasR, Unit>(a, b, lab[b], sc, m0, std::min(n1, m0 + kClBlock),
                                       reinterpret_cast<Acc*>(buf.get()),
                                       bt.runs.data() + 2 * q0, bt.run_off[b + 1] - q0, bt.inv[b]);
    }
  } else {
    for (int64_t c = 0; c < sc.kb; ++c) sc.zero(c, n0, n1);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t b = kept[i], q0 = bt.run_off[b];
      sample_cf<T, HasG, HasR, Unit>(a, b, lab[b], sc, n0, n1, bt.runs.data() + 2 * q0,
                                     bt.run_off[b + 1] - q0, bt.inv[b]);
    }
  }
  return -1;
}

// Where thread t of nt starts in bt.kept: rows split by work (valid positions read), not by count,
// so that samples padded to different lengths still give every thread the same bytes to read.
template <typename Acc>
int64_t share(const Batch<Acc>& bt, int t, int nt) {
  const int64_t nrows = static_cast<int64_t>(bt.kept.size());
  if (t == 0 || t == nt) return t == nt ? nrows : 0;
  if (bt.work.empty()) return nrows * t / nt;  // every row the same work
  const int64_t goal = bt.work.back() * t / nt;
  return std::lower_bound(bt.work.begin(), bt.work.end(), goal) - bt.work.begin() + 1;
}

// Two schedules, both one pass over x:
//  - by sample (default): each thread streams whole samples (contiguous in memory for either
//    layout) into a private scratch; the scratches are summed afterwards. Measured against
//    neuron tiles (which read 2 KiB runs with page jumps), cold cache, 1 / 2 threads: linear
//    6.8 -> 4.3 ms / 4.1 -> 2.4 ms; transformer 15.7 -> 8.3 ms / 7.9 -> 4.7 ms.
//  - by neuron tile: threads own neuron ranges of one shared scratch; used when private
//    scratches would be large (many classes in the batch, e.g. per-token labels over a vocabulary).
template <typename T, bool HasG, bool HasR, bool Unit>
int run(const AccumulateArgs& a, const Batch<typename Elem<T>::acc>& bt, int64_t kb, int nthreads,
        std::vector<Scratch<typename Elem<T>::acc>>& scs) {
  using Acc = typename Elem<T>::acc;
  const int64_t nrows = static_cast<int64_t>(bt.kept.size());
  const int64_t x_bytes = a.B * a.N * a.S * static_cast<int64_t>(sizeof(T));
  const int64_t priv_bytes = nthreads * 4 * kb * a.N * static_cast<int64_t>(sizeof(Acc));
  const bool by_sample = nthreads == 1 || (nrows >= 2 * nthreads && priv_bytes <= x_bytes / 4);
  if (by_sample) {
    const size_t one = Scratch<Acc>::bytes(planes(HasG, HasR), kb, a.N);
    char* mem = scratch_memory().take(one * nthreads);
    scs.reserve(nthreads);
    for (int t = 0; t < nthreads; ++t) scs.emplace_back(planes(HasG, HasR), kb, a.N, mem + one * t);
    if (nthreads == 1) {  // one scratch, nothing to reduce: the pass's own flags when it has them
      const int flags = run_range<T, HasG, HasR, Unit>(a, bt, scs[0], 0, nrows, 0, a.N);
      return flags >= 0 ? flags : scan(scs[0], 0, a.N, planes(HasG, HasR));
    }
#pragma omp parallel num_threads(nthreads)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      run_range<T, HasG, HasR, Unit>(a, bt, scs[t], share(bt, t, nt), share(bt, t + 1, nt), 0, a.N);
    }
    // The sums of several scratches are scanned after the reduction (it can overflow too).
    return reduce_and_scan(scs, planes(HasG, HasR), nthreads);
  }
  scs.emplace_back(planes(HasG, HasR), kb, a.N,
                   scratch_memory().take(Scratch<Acc>::bytes(planes(HasG, HasR), kb, a.N)));
  const int64_t tile = std::max<int64_t>(16, (a.N + 4 * nthreads - 1) / (4 * nthreads));
  const int64_t ntiles = (a.N + tile - 1) / tile;
  int flags = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : flags)
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t n0 = t * tile, n1 = std::min(a.N, n0 + tile);
    run_range<T, HasG, HasR, Unit>(a, bt, scs[0], 0, nrows, n0, n1);
    flags |= scan(scs[0], n0, n1, planes(HasG, HasR));
  }
  return flags;
}

// Row r's valid flag (per token: r = b * S + s; per sample S == 1: r = b).
inline bool valid_at(const AccumulateArgs& a, int64_t b, int64_t s) {
  return a.valid == nullptr || reinterpret_cast<const uint8_t*>(a.valid)[b * a.v_sb + s * a.v_ss] != 0;
}

template <typename T>
int accumulate_typed(const AccumulateArgs& a, int nthreads) {
  using Acc = typename Elem<T>::acc;
  // Which rows count, and their labels compacted to the classes present (first-seen order).
  // A row is skipped when its label is ignore_index or it has no valid position; nothing of a
  // skipped row (or of an invalid position) is read later.
  const bool rows = a.per_token || a.S == 1;
  const int64_t L = a.per_token ? a.B * a.S : a.B;
  Batch<Acc> bt;
  bt.lab.assign(static_cast<size_t>(L), -1);
  bt.kept.reserve(static_cast<size_t>(L));
  if (!rows) {
    bt.run_off.assign(static_cast<size_t>(a.B) + 1, 0);
    bt.inv.assign(static_cast<size_t>(a.B), Acc(0));
    bt.runs.reserve(static_cast<size_t>(2 * a.B));
  }
  std::vector<int32_t> cmap(static_cast<size_t>(a.K), -1);
  std::vector<int64_t> classes;
  std::vector<Acc> counts;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t b = a.per_token ? i / a.S : i, s = a.per_token ? i % a.S : 0;
    const int64_t k = a.per_token ? a.labels[b * a.l_sb + s * a.l_ss] : a.labels[b * a.l_sb];
    if (!rows) bt.run_off[b + 1] = bt.run_off[b];
    if (k == a.ignore_index) continue;
    if (k < 0 || k >= a.K) return kBadLabel;
    if (rows) {
      if (!valid_at(a, b, s)) continue;
    } else {  // the runs of valid positions of sample b
      int64_t nv = 0;
      for (int64_t p = 0; p < a.S;) {
        while (p < a.S && !valid_at(a, b, p)) ++p;
        const int64_t p0 = p;
        while (p < a.S && valid_at(a, b, p)) ++p;
        if (p > p0) {
          bt.runs.push_back(p0);
          bt.runs.push_back(p);
          bt.run_off[b + 1] += 1;
          nv += p - p0;
        }
      }
      if (nv == 0) continue;
      bt.inv[b] = Acc(1) / static_cast<Acc>(nv);
      if (a.valid != nullptr) bt.work.push_back((bt.work.empty() ? 0 : bt.work.back()) + nv);
    }
    if (cmap[k] < 0) {
      cmap[k] = static_cast<int32_t>(classes.size());
      classes.push_back(k);
      counts.push_back(0);
    }
    bt.lab[i] = cmap[k];
    bt.kept.push_back(i);
    counts[cmap[k]] += 1;
  }
  const int64_t kb = static_cast<int64_t>(classes.size());
  if (kb == 0) return kOk;  // nothing counts: nothing changes
  Acc* out[4] = {static_cast<Acc*>(a.act_sum), static_cast<Acc*>(a.act_sq),
                 static_cast<Acc*>(a.taylor_sum), static_cast<Acc*>(a.deeplift_sum)};
  // Statistics not kept are not computed: g is read only for taylor_sum / deeplift_sum, r only
  // for a kept deeplift_sum. (act_sum and act_sq are computed either way: x is checked for
  // non-finite values on every call, and its sums cost no extra read.)
  const bool has_g = a.g != nullptr && (out[2] != nullptr || out[3] != nullptr);
  const bool has_r = has_g && a.r != nullptr && out[3] != nullptr;
  std::vector<Scratch<Acc>> scs;
  // Unit: the axis the inner loop walks (s for channels-first, n otherwise) has stride 1.
  // A reference read with a run-time stride kept the loop from contiguous vector loads: the DeepLIFT
  // call on ViT taps (a shared [N, S]-contiguous ref under channels-last x) took 2.4x the taylor call.
  const bool unit = (rows || a.channels_last)
                        ? (a.x_sn == 1 && (!has_g || a.g_sn == 1) && (!has_r || a.r_sn == 1))
                        : (a.x_ss == 1 && (!has_g || a.g_ss == 1) && (!has_r || a.r_ss == 1));
  int flags;
  if (!has_g) {
    flags = unit ? run<T, false, false, true>(a, bt, kb, nthreads, scs)
                 : run<T, false, false, false>(a, bt, kb, nthreads, scs);
  } else if (!has_r) {
    flags = unit ? run<T, true, false, true>(a, bt, kb, nthreads, scs)
                 : run<T, true, false, false>(a, bt, kb, nthreads, scs);
  } else {
    flags = unit ? run<T, true, true, true>(a, bt, kb, nthreads, scs)
                 : run<T, true, true, false>(a, bt, kb, nthreads, scs);
  }
  if (flags) return (flags & kNonFiniteX) ? kNonFiniteX : kNonFiniteGrad;

  // Commit: only now is anything written to the statistics.
  Scratch<Acc>& sc = scs[0];
  const int64_t N = a.N;
  // Without a reference deeplift equals taylor: scratch plane 2 goes into both, read once.
  Acc* dst3 = has_r ? nullptr : out[3];
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
  for (int p = 0; p < sc.np; ++p) {
    for (int64_t c = 0; c < kb; ++c) {
      const Acc* src = sc.plane(p, c);
      Acc* dst = out[p] == nullptr ? nullptr : out[p] + classes[c] * N;
      Acc* dst2 = (p == 2 && dst3 != nullptr) ? dst3 + classes[c] * N : nullptr;
      if (dst != nullptr && dst2 != nullptr) {
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          dst[n] += src[n];
          dst2[n] += src[n];
        }
      } else if (dst != nullptr || dst2 != nullptr) {
        Acc* d = dst != nullptr ? dst : dst2;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) d[n] += src[n];
      }
    }
  }
  Acc* cnt = static_cast<Acc*>(a.count);
  for (int64_t c = 0; c < kb; ++c) cnt[classes[c]] += counts[c];
  return kOk;
}

}  // namespace

int accumulate_cpu(const AccumulateArgs& a, int nthreads) {
  if (a.B < 0 || a.N < 0 || a.S < 1 || a.K < 1 || a.x == nullptr || a.labels == nullptr ||
      a.count == nullptr)
    return kBadArgument;
  if (a.per_token && !a.channels_last) return kBadArgument;
  if (a.B == 0) return kOk;
  return cpu::visit_dtype(a.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    return accumulate_typed<T>(a, cpu::clamp_threads(nthreads));
  });
}

}  // namespace NEUSLICE_CPU_ISA
}  // namespace neuslice
