// The scratch of the CPU accumulate (accumulate.cpp): per-call memory kept by the calling thread,
// the [planes][classes][neurons] view the schedules write, and the non-finite scan and the
// reduction of several threads' scratches. Compiled into each ISA variant of accumulate.cpp (its
// own copy per translation unit: the anonymous namespace).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>
#include <vector>

#include "isa.h"
#include "neuslice/accumulate.h"

namespace neuslice {
namespace NEUSLICE_CPU_ISA {
namespace {

// Scratch memory, kept by the calling thread from call to call (up to kKeepBytes). A fresh
// allocation of a few hundred KiB is a fresh mmap whose pages fault in on first touch and are
// unmapped on free: on linear B=1024 N=4096 with 10 classes (480 KiB of scratch) that was about
// 0.1 ms of a 1.9 ms call. Larger requests (many classes under per-token labels) are not kept.
// The scratch is used inside one call only, by OpenMP threads the calling thread waits for.
constexpr size_t kKeepBytes = size_t(64) << 20;
struct FreeAligned {
  void operator()(char* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
using Block = std::unique_ptr<char[], FreeAligned>;
inline Block allocate(size_t bytes) {
  return Block(static_cast<char*>(::operator new[](bytes, std::align_val_t(64))));
}
class ScratchMemory {
 public:
  // `bytes` of 64-byte aligned memory for this call; valid until the next take() of this thread.
  char* take(size_t bytes) {
    if (bytes > kKeepBytes) {
      once_ = allocate(bytes);
      return once_.get();
    }
    once_.reset();
    if (bytes > cap_) {
      kept_.reset();
      kept_ = allocate(bytes);
      cap_ = bytes;
    }
    return kept_.get();
  }

 private:
  Block kept_, once_;
  size_t cap_ = 0;
};
inline ScratchMemory& scratch_memory() {
  thread_local ScratchMemory m;
  return m;
}

// [np][kb][ld], uninitialised: each schedule either zeroes its columns first or writes (not adds)
// the first term of every (class, column) it owns, and zeroes the classes it saw no sample of.
// Rows start on 64-byte boundaries (ld rounds n up to a cache line): with 16-byte alignment, half
// the 32-byte stores into the accumulators split a cache line (linear shape, 1 thread, hot cache:
// 0.20 -> 0.17 ms at B = 256). The memory belongs to scratch_memory(); a Scratch is a view.
template <typename Acc>
struct Scratch {
  static constexpr int64_t kLine = 64 / sizeof(Acc);
  int64_t np, kb, n, ld;
  Acc* v;
  // A row length that is a multiple of 4 KiB gets one more cache line: planes 4 KiB apart make
  // every accumulator load and store of a group alias in the low 12 address bits, which the core
  // treats as a possible store-to-load dependency (standalone 4-row loop, N = 4096, in cache,
  // 1 thread: 90 -> 74 us per 4 MiB).
  static int64_t lead(int64_t n_) {
    const int64_t l = (n_ + kLine - 1) / kLine * kLine;
    return (l * static_cast<int64_t>(sizeof(Acc))) % 4096 == 0 ? l + kLine : l;
  }
  static size_t bytes(int np_, int64_t kb_, int64_t n_) {
    return static_cast<size_t>(np_ * kb_ * lead(n_)) * sizeof(Acc);
  }
  Scratch(int np_, int64_t kb_, int64_t n_, char* mem)
      : np(np_), kb(kb_), n(n_), ld(lead(n_)), v(reinterpret_cast<Acc*>(mem)) {}
  Acc* plane(int p, int64_t c) { return v + (p * kb + c) * ld; }
  void zero(int64_t c, int64_t n0, int64_t n1) {
    for (int p = 0; p < np; ++p) std::fill(plane(p, c) + n0, plane(p, c) + n1, Acc(0));
  }
};

// Planes of the scratch in use: act_sum, act_sq [, taylor_sum [, deeplift_sum]]. Without a
// reference, deeplift equals taylor and is not accumulated twice (it is committed from plane 2).
constexpr int planes(bool has_g, bool has_r) { return has_r ? 4 : has_g ? 3 : 2; }

// Non-finite test of scratch columns [n0, n1): 1 for statistics of x, 2 for those of g.
template <typename Acc>
int scan(Scratch<Acc>& sc, int64_t n0, int64_t n1, int np) {
  int flags = 0;
  for (int p = 0; p < np; ++p) {
    for (int64_t c = 0; c < sc.kb; ++c) {
      const Acc* row = sc.plane(p, c);
      // NaN iff a value is inf/NaN. A simd reduction: the serial chain of adds was latency-bound
      // (about 13 us per class of 4096 neurons, 3 planes), more than the pass itself on small batches.
      Acc probe = 0;
#pragma omp simd reduction(+ : probe)
      for (int64_t n = n0; n < n1; ++n) probe += row[n] * Acc(0);
      if (!(probe == Acc(0))) flags |= (p < 2 ? kNonFiniteX : kNonFiniteGrad);
    }
  }
  return flags;
}

// Scratch of all threads reduced into the first, then scanned: per neuron block, in parallel.
template <typename Acc>
int reduce_and_scan(std::vector<Scratch<Acc>>& scs, int np, int nthreads) {
  Scratch<Acc>& dst = scs[0];
  const int64_t N = dst.n, block = 1024, nblocks = (N + block - 1) / block;
  int flags = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : flags)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t n0 = blk * block, n1 = std::min(N, n0 + block);
    for (size_t t = 1; t < scs.size(); ++t)
      for (int p = 0; p < np; ++p)
        for (int64_t c = 0; c < dst.kb; ++c) {
          Acc* d = dst.plane(p, c);
          const Acc* s = scs[t].plane(p, c);
#pragma omp simd
          for (int64_t n = n0; n < n1; ++n) d[n] += s[n];
        }
    flags |= scan(dst, n0, n1, np);
  }
  return flags;
}

}  // namespace
}  // namespace NEUSLICE_CPU_ISA
}  // namespace neuslice
