// accumulate on CUDA: one pass over x (and g, r), per-class statistics of one layer (docs/method.md §2).
//
// Bytes moved. DRAM reads: x and g once each (B*N*S*e bytes apiece, e = element size), r
// (shared: N*S*e, re-read per sample from L2; per sample: once, like x), labels (8*L bytes, read
// twice). The per-class partials
// [P][Kc][N] (P = 2 or 4 planes, Kc = min(K, L)) are built with RED.ADD in L2 and read once by
// the commit, which read-modify-writes the touched statistic rows and count. At the benchmark
// shapes that is below 1% of the input bytes (conv B=128,N=256,S=196 f32 with g: 51 MB of inputs
// against 4*10*256*4 = 40 KB of partials for 10 classes).
// Bound: memory bandwidth. About 3 flops per pair of loaded elements (0.4 flop/byte in f32) is
// two orders of magnitude below Hopper's flop/byte ridge, so the design target is the copy
// bandwidth of the device; bench/gpu_check.py measures how close it gets. Small batches are
// latency-bound instead: a call is a scratch memset, 3 or 4 launches (sort, main, [finalize],
// commit) and the host's read of the status, a few microseconds each.
//
// Why it suits Hopper:
//  - Loads are 16-byte vectors (LDG.128 through the read-only path) along the contiguous axis:
//    s for channels-first S-runs (one warp per (sample, neuron) row; unaligned heads and tails
//    scalar), n for channels-last rows and S == 1 (one thread per 16 bytes of neurons). A warp
//    reads whole 128-byte lines.
//  - Class partials use no shared memory (so no bank conflicts by construction): samples are
//    visited in class-sorted order (a counting sort of the labels: one single-block kernel up to
//    8192 samples, three small ones beyond), each thread keeps a running partial per neuron in
//    registers and flushes it with one coalesced RED.ADD per plane only when the class changes
//    or its chunk of samples ends.
//  - One pass over the inputs. Where (sample, neuron) work is too scarce to fill 132 SMs (e.g.
//    transformer B=8, or B*N small with long S), positions are split across threads and the
//    per-(sample, neuron) sums meet in an L2-resident [3][L][N] buffer before the nonlinear
//    terms (|.|, square) are taken: still one read of each input element.
//  - Non-finite input: every per-sample term is tested (inf and NaN propagate through the sums),
//    the result is OR-ed into a device status, and the commit kernel adds the partials into the
//    statistics only when the status is 0: a rejected batch changes nothing, no host round trip.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "accumulate_params.cuh"
#include "common.cuh"
#include "label_sort.cuh"
#include "neuslice/accumulate.h"

namespace neuslice {
namespace {

// ---- per-sample terms and class-run partials ---------------------------------------------------

template <typename Acc, bool HasG>
__device__ __forceinline__ void add_terms(Acc sx, Acc sg, Acc sd, Acc inv_s, Acc* run, int& flags) {
  const Acc m = sx * inv_s;
  const Acc m2 = m * m;  // non-finite iff m is, or m*m overflows (the reference tests xbar^2)
  if (!isfinite(m2)) flags |= kNonFiniteX;
  run[0] += m;
  run[1] += m2;
  if (HasG) {
    const Acc t = fabs(sg), u = fabs(sd);
    if (!isfinite(t) || !isfinite(u)) flags |= kNonFiniteGrad;
    run[2] += t;
    run[3] += u;
  }
}

template <typename Acc, bool HasG>
__device__ __forceinline__ void flush(const Params& p, int64_t c, int64_t n, Acc* run) {
  Acc* part = static_cast<Acc*>(p.part);
  const int64_t plane = p.Kc * p.N, o = c * p.N + n;
  atomicAdd(part + o, run[0]);
  atomicAdd(part + plane + o, run[1]);
  if (HasG) {
    atomicAdd(part + 2 * plane + o, run[2]);
    atomicAdd(part + 3 * plane + o, run[3]);
  }
  run[0] = run[1] = run[2] = run[3] = Acc(0);
}

// One neuron's sums over a class-sorted run of samples: add() per sample, flushed to the class's
// partials when the class changes; finish() flushes the last class and reports non-finite terms.
template <typename Acc, bool HasG>
struct ClassRun {
  Acc run[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  int64_t cur = -1;
  int flags = 0;

  __device__ __forceinline__ void add(const Params& p, int64_t c, int64_t n, Acc sx, Acc sg, Acc sd, Acc inv_s) {
    if (c != cur) {
      if (cur >= 0) flush<Acc, HasG>(p, cur, n, run);
      cur = c;
    }
    add_terms<Acc, HasG>(sx, sg, sd, inv_s, run, flags);
  }

  __device__ __forceinline__ void finish(const Params& p, int64_t n) {
    if (cur >= 0) flush<Acc, HasG>(p, cur, n, run);
    if (flags) atomicOr(p.status, flags);
  }
};

// ---- cols: n is the vectorised axis (channels-last, S == 1, per token, short strided S-runs) ---

// Sums over positions [s0, s1) of sample row b for the V neurons n0 .. n0+V-1.
template <typename T, bool HasG>
__device__ __forceinline__ void cols_sums(const Params& p, int64_t b, int64_t s0, int64_t s1,
                                          int64_t n0, typename E<T>::Acc* sx,
                                          typename E<T>::Acc* sg, typename E<T>::Acc* sd) {
  using Acc = typename E<T>::Acc;
  constexpr int V = E<T>::V;
  const T* x = static_cast<const T*>(p.x);
  const T* g = static_cast<const T*>(p.g);
  const T* r = static_cast<const T*>(p.r);
  const bool full = n0 + V <= p.N;
  const bool vx = full && p.vec, vr = full && p.rvec;
  for (int64_t s = s0; s < s1; ++s) {
    if (!valid_at(p, b, s)) continue;  // padding: never read (uniform across the warp's neurons)
    Acc xv[V], gv[V], rv[V];
    ld_cols(x, b * p.x_sb + s * p.x_ss + n0 * p.x_sn, p.x_sn, vx, n0, p.N, xv);
#pragma unroll
    for (int v = 0; v < V; ++v) sx[v] += xv[v];
    if (HasG) {
      ld_cols(g, b * p.g_sb + s * p.g_ss + n0 * p.g_sn, p.g_sn, vx, n0, p.N, gv);
#pragma unroll
      for (int v = 0; v < V; ++v) sg[v] += xv[v] * gv[v];
      if (p.has_r) {
        ld_cols(r, b * p.r_sb + s * p.r_ss + n0 * p.r_sn, p.r_sn, vr, n0, p.N, rv);
#pragma unroll
        for (int v = 0; v < V; ++v) sd[v] += (xv[v] - rv[v]) * gv[v];
      }
    }
  }
}

// Direct: unit = (neuron group, chunk of class-sorted samples); terms and class runs in registers.
template <typename T, bool HasG>
__global__ void __launch_bounds__(kThreads) k_cols(Params p) {
  using Acc = typename E<T>::Acc;
  constexpr int V = E<T>::V;
  if (labels_bad(p)) return;
  const int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t grp = u % p.ng, j0 = (u / p.ng) * p.chunk, nkept = *p.nkept;
  if (j0 >= nkept) return;
  const int64_t j1 = min(nkept, j0 + p.chunk), n0 = grp * V;
  Acc run[V][4];
#pragma unroll
  for (int v = 0; v < V; ++v) run[v][0] = run[v][1] = run[v][2] = run[v][3] = Acc(0);
  int64_t cur = -1;
  int flags = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t i = __ldg(p.perm + j), c = __ldg(p.pcls + j);
    const int64_t b = p.per_token ? i / p.S : i;
    const int64_t s0 = p.per_token ? i % p.S : 0;
    const int64_t s1 = p.per_token ? s0 + 1 : p.S;
    const Acc inv_s = inv_positions<Acc>(p, b);
    Acc sx[V], sg[V], sd[V];
#pragma unroll
    for (int v = 0; v < V; ++v) sx[v] = sg[v] = sd[v] = Acc(0);
    cols_sums<T, HasG>(p, b, s0, s1, n0, sx, sg, sd);
    if (c != cur) {
      if (cur >= 0) {
#pragma unroll
        for (int v = 0; v < V; ++v)
          if (n0 + v < p.N) flush<Acc, HasG>(p, cur, n0 + v, run[v]);
      }
      cur = c;
    }
#pragma unroll
    for (int v = 0; v < V; ++v)
      add_terms<Acc, HasG>(sx[v], sg[v], p.has_r ? sd[v] : sg[v], inv_s, run[v], flags);
  }
  if (cur >= 0) {
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (n0 + v < p.N) flush<Acc, HasG>(p, cur, n0 + v, run[v]);
  }
  if (flags) atomicOr(p.status, flags);
}

// Split (per-sample labels only): unit = (neuron group, sample, chunk of positions); partial
// sums meet in sums[3][L][N], and k_finalize takes the terms.
template <typename T, bool HasG>
__global__ void __launch_bounds__(kThreads) k_cols_split(Params p) {
  using Acc = typename E<T>::Acc;
  constexpr int V = E<T>::V;
  const int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t grp = u % p.ng, rest = u / p.ng;
  const int64_t b = rest / p.nsc, s0 = (rest % p.nsc) * p.sc;
  if (b >= p.L || label_of(p, b) == p.ignore_index || !has_valid(p, b)) return;  // never read
  const int64_t s1 = min(p.S, s0 + p.sc), n0 = grp * V;
  Acc sx[V], sg[V], sd[V];
#pragma unroll
  for (int v = 0; v < V; ++v) sx[v] = sg[v] = sd[v] = Acc(0);
  cols_sums<T, HasG>(p, b, s0, s1, n0, sx, sg, sd);
  Acc* sums = static_cast<Acc*>(p.sums);
  const int64_t plane = p.L * p.N;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (n0 + v >= p.N) continue;
    const int64_t o = b * p.N + n0 + v;
    atomicAdd(sums + o, sx[v]);
    if (HasG) {
      atomicAdd(sums + plane + o, sg[v]);
      if (p.has_r) atomicAdd(sums + 2 * plane + o, sd[v]);
    }
  }
}

// ---- rows: channels-first S-runs with unit stride, one warp per (sample, neuron) row ----------

// Warp-wide sums over positions [s0, s1) of row (b, n); every lane returns the totals.
template <typename T, bool HasG>
__device__ __forceinline__ void row_sums(const Params& p, int64_t b, int64_t n, int64_t s0,
                                         int64_t s1, int lane, typename E<T>::Acc& sx,
                                         typename E<T>::Acc& sg, typename E<T>::Acc& sd) {
  using Acc = typename E<T>::Acc;
  constexpr int V = E<T>::V;
  const T* xr = static_cast<const T*>(p.x) + b * p.x_sb + n * p.x_sn + s0;  // x_ss == 1
  const T* gr = HasG ? static_cast<const T*>(p.g) + b * p.g_sb + n * p.g_sn + s0 : nullptr;
  const T* rr = p.has_r ? static_cast<const T*>(p.r) + b * p.r_sb + n * p.r_sn + s0 * p.r_ss : nullptr;
  const int64_t cnt = s1 - s0, rs = p.r_ss;
  const uintptr_t ax = reinterpret_cast<uintptr_t>(xr);
  const bool vec = !HasG || ((ax & 15) == (reinterpret_cast<uintptr_t>(gr) & 15));
  const int64_t head = vec ? min(cnt, static_cast<int64_t>(((16 - (ax & 15)) & 15) / sizeof(T))) : cnt;
  Acc ax_ = 0, ag = 0, ad = 0;
  const bool masked = p.valid != nullptr;
  auto scalar = [&](int64_t s) {
    if (masked && !valid_at(p, b, s0 + s)) return;  // padding: never read
    const Acc v = E<T>::ld(xr, s);
    ax_ += v;
    if (HasG) {
      const Acc w = E<T>::ld(gr, s);
      ag += v * w;
      if (p.has_r) ad += (v - E<T>::ld(rr, s * rs)) * w;
    }
  };
  for (int64_t s = lane; s < head; s += 32) scalar(s);
  if (vec) {
    const int64_t nv = (cnt - head) / V;
#pragma unroll 4
    for (int64_t q = lane; q < nv; q += 32) {
      const int64_t s = head + q * V;
      Acc xv[V], gv[V];
      ldv(xr + s, xv);
      if (HasG) ldv(gr + s, gv);
      bool ok[V];  // padding lanes take no part in any sum (a NaN in x, g or r there stays out)
#pragma unroll
      for (int v = 0; v < V; ++v) ok[v] = !masked || valid_at(p, b, s0 + s + v);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (!ok[v]) continue;
        ax_ += xv[v];
        if (HasG) {
          ag += xv[v] * gv[v];
          if (p.has_r) ad += (xv[v] - E<T>::ld(rr, (s + v) * rs)) * gv[v];
        }
      }
    }
    for (int64_t s = head + nv * V + lane; s < cnt; s += 32) scalar(s);
  }
  sx = cuda::warp_sum(ax_);
  if (HasG) {
    sg = cuda::warp_sum(ag);
    sd = p.has_r ? cuda::warp_sum(ad) : sg;
  }
}

// Direct: unit = warp = (neuron, chunk of class-sorted samples); lane 0 keeps the class run.
template <typename T, bool HasG>
__global__ void __launch_bounds__(kThreads) k_rows(Params p) {
  using Acc = typename E<T>::Acc;
  if (labels_bad(p)) return;
  const int64_t w = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t n = w % p.N, j0 = (w / p.N) * p.chunk, nkept = *p.nkept;
  if (j0 >= nkept) return;  // uniform across the warp
  const int64_t j1 = min(nkept, j0 + p.chunk);
  ClassRun<Acc, HasG> run;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t b = __ldg(p.perm + j), c = __ldg(p.pcls + j);
    Acc sx = 0, sg = 0, sd = 0;
    row_sums<T, HasG>(p, b, n, 0, p.S, lane, sx, sg, sd);
    if (lane == 0) run.add(p, c, n, sx, sg, sd, inv_positions<Acc>(p, b));
  }
  if (lane == 0) run.finish(p, n);
}

// Split: unit = warp = (neuron, sample, chunk of positions); partial sums into sums[3][L][N].
template <typename T, bool HasG>
__global__ void __launch_bounds__(kThreads) k_rows_split(Params p) {
  using Acc = typename E<T>::Acc;
  const int64_t w = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t n = w % p.N, rest = w / p.N;
  const int64_t b = rest / p.nsc, s0 = (rest % p.nsc) * p.sc;
  if (b >= p.L || label_of(p, b) == p.ignore_index || !has_valid(p, b)) return;  // uniform per warp
  const int64_t s1 = min(p.S, s0 + p.sc);
  Acc sx = 0, sg = 0, sd = 0;
  row_sums<T, HasG>(p, b, n, s0, s1, lane, sx, sg, sd);
  if (lane == 0) {
    Acc* sums = static_cast<Acc*>(p.sums);
    const int64_t plane = p.L * p.N, o = b * p.N + n;
    atomicAdd(sums + o, sx);
    if (HasG) {
      atomicAdd(sums + plane + o, sg);
      if (p.has_r) atomicAdd(sums + 2 * plane + o, sd);
    }
  }
}

// ---- split finalize and commit -----------------------------------------------------------------

// unit = (neuron, chunk of class-sorted samples): terms of the summed rows, class runs, flush.
template <typename Acc, bool HasG>
__global__ void __launch_bounds__(kThreads) k_finalize(Params p) {
  if (labels_bad(p)) return;
  const int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t n = u % p.N, j0 = (u / p.N) * p.chunk, nkept = *p.nkept;
  if (j0 >= nkept) return;
  const int64_t j1 = min(nkept, j0 + p.chunk), plane = p.L * p.N;
  const Acc* sums = static_cast<const Acc*>(p.sums);
  ClassRun<Acc, HasG> run;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t b = __ldg(p.perm + j), c = __ldg(p.pcls + j);
    const int64_t o = b * p.N + n;
    const Acc sx = sums[o];
    const Acc sg = HasG ? sums[plane + o] : Acc(0);
    const Acc sd = (HasG && p.has_r) ? sums[2 * plane + o] : sg;
    run.add(p, c, n, sx, sg, sd, inv_positions<Acc>(p, b));
  }
  run.finish(p, n);
}

// Only when the batch is clean: statistics[classes[c]] += partials[c], count += hist.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) k_commit(Params p, int planes, Acc* st0, Acc* st1,
                                                     Acc* st2, Acc* st3, Acc* count) {
  if (*static_cast<volatile int*>(p.status) != 0) return;
  const int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t total = planes * p.Kc * p.N;
  if (u < total) {
    const int64_t n = u % p.N, rest = u / p.N;
    const int64_t c = rest % p.Kc, q = rest / p.Kc;
    if (c >= *p.nclass) return;
    Acc* dst = q == 0 ? st0 : q == 1 ? st1 : q == 2 ? st2 : st3;
    if (dst == nullptr) return;  // a statistic not kept
    dst[static_cast<int64_t>(p.classes[c]) * p.N + n] += static_cast<const Acc*>(p.part)[u];
  } else if (u - total < p.K) {
    const int64_t k = u - total;
    const int h = p.hist[k];
    if (h) count[k] += static_cast<Acc>(h);
  }
}

// ---- host side ---------------------------------------------------------------------------------

int elem_size(DType d) { return d == DType::f64 ? 8 : d == DType::f32 ? 4 : 2; }

struct Plan {
  int64_t L = 0, Sin = 1, Kc = 0, ng = 0;
  bool rows = false, split = false;
  int64_t chunk = 1, sc = 1, nsc = 1, fchunk = 1;
  int64_t acc_size = 4;
  // byte offsets into the scratch
  int64_t o_hist = 0, o_cursor = 0, o_cid = 0, o_classes = 0, o_nclass = 0, o_perm = 0, o_pcls = 0;
  int64_t o_nkept = 0, o_nv = 0;
  int64_t o_part = 0, o_sums = 0, bytes = 0;
};

int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

// g is read only for a kept taylor_sum or deeplift_sum; r only for a kept deeplift_sum.
bool uses_g(const AccumulateArgs& a) {
  return a.g != nullptr && (a.taylor_sum != nullptr || a.deeplift_sum != nullptr);
}
bool uses_r(const AccumulateArgs& a) { return uses_g(a) && a.r != nullptr && a.deeplift_sum != nullptr; }
// Per-sample valid counts are needed (per-sample labels, S > 1, a valid mask).
bool counts_valid(const AccumulateArgs& a) { return a.valid != nullptr && !a.per_token && a.S > 1; }

Plan make_plan(const AccumulateArgs& a) {
  Plan pl;
  const bool has_g = uses_g(a);
  const int64_t V = 16 / elem_size(a.dtype);
  pl.acc_size = a.dtype == DType::f64 ? 8 : 4;
  pl.L = a.per_token ? a.B * a.S : a.B;
  pl.Sin = a.per_token ? 1 : a.S;
  pl.Kc = std::min(a.K, pl.L);
  pl.rows = !a.per_token && a.S >= kRowsMinS && a.x_ss == 1 && (!has_g || a.g_ss == 1);
  if (pl.rows) {
    const int64_t units = a.N * pl.L;  // one warp per (sample, neuron) row
    if (units < kTargetWarps / 4 && a.S >= 2048) {
      const int64_t want = ceil_div(kTargetWarps, std::max<int64_t>(1, units));
      pl.sc = std::max<int64_t>(1024, ceil_div(a.S, want));
      pl.nsc = ceil_div(a.S, pl.sc);
      pl.split = pl.nsc > 1;
    }
    if (!pl.split) pl.chunk = std::max<int64_t>(1, ceil_div(units, kTargetWarps));
  } else {
    pl.ng = ceil_div(a.N, V);
    const int64_t units = pl.ng * pl.L;  // one thread per (sample, 16 bytes of neurons)
    if (!a.per_token && pl.Sin >= 32 && units < kTargetThreads / 4) {
      const int64_t want = ceil_div(kTargetThreads, std::max<int64_t>(1, units));
      pl.sc = std::max<int64_t>(16, ceil_div(a.S, want));
      pl.nsc = ceil_div(a.S, pl.sc);
      pl.split = pl.nsc > 1;
    }
    // At least 8 samples per unit when a sample is a single position: a flush (4 atomics per
    // neuron) then costs at most about a quarter of the loads it summarises.
    if (!pl.split)
      pl.chunk = std::min(pl.L, std::max<int64_t>(pl.Sin == 1 ? 8 : 1, ceil_div(units, kTargetThreads)));
  }
  if (pl.split) pl.fchunk = std::max<int64_t>(1, ceil_div(a.N * pl.L, kTargetThreads));
  const int64_t planes = has_g ? 4 : 2;
  int64_t o = 0;
  pl.o_hist = o;    o = align256(o + 4 * a.K);
  pl.o_cursor = o;  o = align256(o + 4 * a.K);
  pl.o_cid = o;     o = align256(o + 4 * a.K);
  pl.o_classes = o; o = align256(o + 4 * pl.Kc);
  pl.o_nclass = o;  o = align256(o + 4);
  pl.o_nkept = o;   o = align256(o + 4);
  pl.o_nv = o;      if (counts_valid(a)) o = align256(o + 4 * pl.L);
  pl.o_perm = o;    o = align256(o + 4 * pl.L);
  pl.o_pcls = o;    o = align256(o + 4 * pl.L);
  pl.o_part = o;    o = align256(o + pl.acc_size * planes * pl.Kc * a.N);
  pl.o_sums = o;
  if (pl.split) o = align256(o + pl.acc_size * 3 * pl.L * a.N);
  pl.bytes = std::max<int64_t>(o, 256);
  return pl;
}

bool shapes_valid(const AccumulateArgs& a) {
  if (a.B < 0 || a.N < 0 || a.S < 1 || a.K < 1) return false;
  if (a.per_token && !a.channels_last) return false;
  return a.B * a.S < INT32_MAX && a.K < INT32_MAX;  // int32 sample and class ids
}

bool args_valid(const AccumulateArgs& a) {
  return shapes_valid(a) && a.x && a.labels && a.count;  // the four sums may each be null
}

int64_t grid_of(int64_t threads) { return ceil_div(threads, kThreads); }

template <typename K, typename... Args>
int launch(K kernel, int64_t threads, cudaStream_t st, Args... args) {
  if (threads <= 0) return kOk;
  const int64_t blocks = grid_of(threads);
  if (blocks > INT32_MAX) return kBadArgument;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, st>>>(args...);
  NEUSLICE_CHECK_LAUNCH();
  return kOk;
}

template <typename T, bool HasG>
int run(const AccumulateArgs& a, const Plan& pl, Params p, cudaStream_t st) {
  using Acc = typename E<T>::Acc;
  constexpr int64_t V = E<T>::V;
  int rc;
  if (p.nv != nullptr && (rc = launch(k_count_valid, 32 * pl.L, st, p))) return rc;
  if (pl.L <= kPrepOneBlock) {
    k_prep_one_block<<<1, kPrepThreads, 0, st>>>(p);
    NEUSLICE_CHECK_LAUNCH();
  } else {
    if ((rc = launch(k_hist, pl.L, st, p))) return rc;
    k_scan<<<1, kPrepThreads, 0, st>>>(p);
    NEUSLICE_CHECK_LAUNCH();
    if ((rc = launch(k_scatter, pl.L, st, p))) return rc;
  }
  if (pl.rows) {
    if (pl.split) {
      rc = launch(k_rows_split<T, HasG>, 32 * a.N * pl.L * pl.nsc, st, p);
    } else {
      rc = launch(k_rows<T, HasG>, 32 * a.N * ceil_div(pl.L, pl.chunk), st, p);
    }
  } else {
    const auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
    const bool s_moves = pl.Sin > 1 || a.per_token;  // does the row offset depend on s?
    p.vec = a.x_sn == 1 && aligned(a.x) && a.x_sb % V == 0 && (!s_moves || a.x_ss % V == 0) &&
            (!HasG || (a.g_sn == 1 && aligned(a.g) && a.g_sb % V == 0 && (!s_moves || a.g_ss % V == 0)));
    p.rvec = p.has_r && a.r_sn == 1 && aligned(a.r) && a.r_sb % V == 0 && (!s_moves || a.r_ss % V == 0);
    if (pl.split) {
      rc = launch(k_cols_split<T, HasG>, pl.ng * pl.L * pl.nsc, st, p);
    } else {
      rc = launch(k_cols<T, HasG>, pl.ng * ceil_div(pl.L, pl.chunk), st, p);
    }
  }
  if (rc) return rc;
  if (pl.split) {
    p.chunk = pl.fchunk;
    if ((rc = launch(k_finalize<Acc, HasG>, a.N * ceil_div(pl.L, pl.fchunk), st, p))) return rc;
  }
  const int planes = HasG ? 4 : 2;
  return launch(k_commit<Acc>, planes * pl.Kc * a.N + a.K, st, p, planes,
                static_cast<Acc*>(a.act_sum), static_cast<Acc*>(a.act_sq),
                static_cast<Acc*>(a.taylor_sum), static_cast<Acc*>(a.deeplift_sum),
                static_cast<Acc*>(a.count));
}

template <typename T>
int run_typed(const AccumulateArgs& a, const Plan& pl, const Params& p, cudaStream_t st) {
  return p.g ? run<T, true>(a, pl, p, st) : run<T, false>(a, pl, p, st);
}

}  // namespace

int64_t accumulate_cuda_scratch_bytes(const AccumulateArgs& a) {
  if (!shapes_valid(a)) return 256;
  return make_plan(a).bytes;
}

int accumulate_cuda(const AccumulateArgs& a, void* scratch, int64_t scratch_bytes, int* status,
                    void* stream) {
  if (!args_valid(a) || scratch == nullptr || status == nullptr) return kBadArgument;
  if (a.B == 0) return kOk;
  const Plan pl = make_plan(a);
  if (scratch_bytes < pl.bytes) return kBadArgument;
  cudaGetLastError();  // clear an error left by an earlier runtime call, so launches report their own
  char* base = static_cast<char*>(scratch);
  Params p{};
  p.x = a.x; p.g = uses_g(a) ? a.g : nullptr; p.r = a.r; p.labels = a.labels;
  p.B = a.B; p.N = a.N; p.S = a.S; p.K = a.K; p.L = pl.L; p.Sin = pl.Sin; p.Kc = pl.Kc;
  p.x_sb = a.x_sb; p.x_sn = a.x_sn; p.x_ss = a.x_ss;
  p.g_sb = a.g_sb; p.g_sn = a.g_sn; p.g_ss = a.g_ss;
  p.r_sb = a.r_sb; p.r_sn = a.r_sn; p.r_ss = a.r_ss; p.l_sb = a.l_sb; p.l_ss = a.l_ss;
  p.per_token = a.per_token;
  p.has_r = uses_r(a);  // r only enters deeplift_sum
  p.valid = reinterpret_cast<const unsigned char*>(a.valid);
  p.v_sb = a.v_sb; p.v_ss = a.v_ss;
  p.ignore_index = a.ignore_index;
  p.nv = counts_valid(a) ? reinterpret_cast<int*>(base + pl.o_nv) : nullptr;
  p.nkept = reinterpret_cast<int*>(base + pl.o_nkept);
  p.vec = p.rvec = false;
  p.ng = pl.ng; p.chunk = pl.chunk; p.sc = pl.sc; p.nsc = pl.nsc;
  p.hist = reinterpret_cast<int*>(base + pl.o_hist);
  p.cursor = reinterpret_cast<int*>(base + pl.o_cursor);
  p.cid = reinterpret_cast<int*>(base + pl.o_cid);
  p.classes = reinterpret_cast<int*>(base + pl.o_classes);
  p.nclass = reinterpret_cast<int*>(base + pl.o_nclass);
  p.perm = reinterpret_cast<int*>(base + pl.o_perm);
  p.pcls = reinterpret_cast<int*>(base + pl.o_pcls);
  p.part = base + pl.o_part;
  p.sums = pl.split ? base + pl.o_sums : nullptr;
  p.status = status;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::f32: return run_typed<float>(a, pl, p, st);
    case DType::f64: return run_typed<double>(a, pl, p, st);
    case DType::f16: return run_typed<f16_t>(a, pl, p, st);
    case DType::bf16: return run_typed<bf16_t>(a, pl, p, st);
  }
  return kBadArgument;
}

}  // namespace neuslice
