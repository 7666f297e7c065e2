// select on the CPU: per-row cumulative-theta and top-k selection by radix select.
//
// Non-negative IEEE floats order like their bit patterns, so a row is narrowed digit by digit
// (11 bits at a time, from the top) instead of sorted: one histogram of (count, sum) over the
// remaining candidates per digit finds the bucket where the cumulative sum (or count) taken in
// descending order crosses the target; everything above it is in, the bucket's members are the
// next candidates. After the last digit the candidates hold one value, taken in index order,
// which is the tie rule (lower index first). Work is ~N per row plus 2048-bucket scans, against
// N log N for sort + cumsum. Sums are in double, as in the reference.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "load.h"
#include "neuslice/select.h"

namespace neuslice {
namespace {

constexpr int kDigitBits = 11;
constexpr int kBuckets = 1 << kDigitBits;

template <typename V> struct KeyOf;
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

template <typename V>
struct RowWork {
  using K = typename KeyOf<V>::type;
  std::vector<double> val;
  std::vector<K> key;
  std::vector<int32_t> cand, next;
  std::vector<double> hsum;
  std::vector<int64_t> hcnt;
  explicit RowWork(int64_t n)
      : val(n), key(n), cand(n), next(n), hsum(2 * kBuckets), hcnt(2 * kBuckets) {}
};

// Loads a row; returns false on a negative or non-finite score. -0.0 becomes +0.0.
template <typename V>
bool load_row(const SelectArgs& a, int64_t row, RowWork<V>& w, double* total) {
  using K = typename KeyOf<V>::type;
  const V* p = static_cast<const V*>(a.scores) + row * a.s_r;
  double t = 0;
  bool ok = true;
  for (int64_t i = 0; i < a.N; ++i) {
    V v = p[i * a.s_n];
    ok &= (v >= V(0)) && std::isfinite(v);
    v = v + V(0);
    K k;
    std::memcpy(&k, &v, sizeof k);
    w.key[i] = k;
    w.val[i] = static_cast<double>(v);
    t += static_cast<double>(v);
  }
  *total = t;
  return ok;
}

// Narrows the candidates to the selected set. Weight of an element: its value (by_sum) or 1.
// `target`: sum (or count) the selected set must reach.
template <typename V>
void radix_select(RowWork<V>& w, int64_t n, double target, bool by_sum, bool* out) {
  using K = typename KeyOf<V>::type;
  constexpr int kBits = sizeof(K) * 8 - 1;  // the sign bit is always 0 here
  int64_t nc = n;
  for (int64_t i = 0; i < n; ++i) w.cand[i] = static_cast<int32_t>(i);
  double base = 0;  // weight of what is selected so far
  for (int hi = kBits; hi > 0; hi -= kDigitBits) {
    const int width = hi < kDigitBits ? hi : kDigitBits;
    const int shift = hi - width;
    const K mask = (K(1) << width) - 1;
    // Two interleaved histograms: runs of equal digits (common: scores cluster) would otherwise
    // chain every add on the previous store to the same bucket.
    const int nb = 1 << width;
    std::fill(w.hsum.begin(), w.hsum.begin() + 2 * nb, 0.0);
    std::fill(w.hcnt.begin(), w.hcnt.begin() + 2 * nb, 0);
    double* h0 = w.hsum.data();
    double* h1 = h0 + nb;
    int64_t* c0 = w.hcnt.data();
    int64_t* c1 = c0 + nb;
    int64_t j = 0;
    for (; j + 1 < nc; j += 2) {
      const int32_t i0 = w.cand[j], i1 = w.cand[j + 1];
      const int d0 = static_cast<int>((w.key[i0] >> shift) & mask);
      const int d1 = static_cast<int>((w.key[i1] >> shift) & mask);
      c0[d0] += 1;
      c1[d1] += 1;
      if (by_sum) {
        h0[d0] += w.val[i0];
        h1[d1] += w.val[i1];
      }
    }
    if (j < nc) {
      const int32_t i = w.cand[j];
      const int d = static_cast<int>((w.key[i] >> shift) & mask);
      c0[d] += 1;
      if (by_sum) h0[d] += w.val[i];
    }
    for (int d = 0; d < nb; ++d) {
      h0[d] += h1[d];
      c0[d] += c1[d];
    }
    int cross = -1;
    double acc = 0;
    for (int d = (1 << width) - 1; d >= 0; --d) {
      const double bw = by_sum ? w.hsum[d] : static_cast<double>(w.hcnt[d]);
      if (w.hcnt[d] && base + acc + bw >= target) {
        cross = d;
        break;
      }
      acc += bw;
    }
    if (cross < 0) {  // rounding left the target just out of reach: keep every positive score
      for (int64_t j = 0; j < nc; ++j)
        if (!by_sum || w.val[w.cand[j]] > 0) out[w.cand[j]] = true;
      return;
    }
    int64_t nn = 0;
    for (int64_t j = 0; j < nc; ++j) {
      const int32_t i = w.cand[j];
      const int d = static_cast<int>((w.key[i] >> shift) & mask);
      if (d > cross) out[i] = true;
      else if (d == cross) w.next[nn++] = i;
    }
    base += acc;
    std::swap(w.cand, w.next);
    nc = nn;
  }
  // One value left among the candidates: take them in index order until the target is reached.
  for (int64_t j = 0; j < nc && base < target; ++j) {
    out[w.cand[j]] = true;
    base += by_sum ? w.val[w.cand[j]] : 1.0;
  }
}

template <typename V>
int select_rows(const SelectArgs& a, bool cumulative, double theta, int64_t k, int nthreads) {
  int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
  {
    RowWork<V> w(a.N);
#pragma omp for schedule(dynamic, 8)
    for (int64_t row = 0; row < a.R; ++row) {
      bool* out = a.out + row * a.N;
      std::memset(out, 0, static_cast<size_t>(a.N));
      double total = 0;
      if (!load_row<V>(a, row, w, &total)) {
        bad = 1;
        continue;
      }
      if (cumulative) {
        if (total > 0) radix_select<V>(w, a.N, theta * total, true, out);
      } else if (k > 0) {
        radix_select<V>(w, a.N, static_cast<double>(k), false, out);
      }
    }
  }
  return bad ? kBadScore : kOk;
}

int dispatch(const SelectArgs& a, bool cumulative, double theta, int64_t k, int nthreads) {
  if (a.R < 0 || a.N < 0 || a.N > INT32_MAX) return kBadArgument;
  if (a.R == 0 || a.N == 0) return kOk;  // (an empty tensor's data pointer is null)
  if (a.out == nullptr) return kBadArgument;
  nthreads = cpu::clamp_threads(nthreads);
  if (a.dtype == DType::f64) return select_rows<double>(a, cumulative, theta, k, nthreads);
  if (a.dtype == DType::f32) return select_rows<float>(a, cumulative, theta, k, nthreads);
  return kBadArgument;  // f16/bf16 scores are upcast by the caller
}

}  // namespace

int select_cumulative_cpu(const SelectArgs& a, double theta, int nthreads) {
  return dispatch(a, true, theta, 0, nthreads);
}

int select_topk_cpu(const SelectArgs& a, int64_t k, int nthreads) {
  return dispatch(a, false, 0.0, k, nthreads);
}

}  // namespace neuslice
