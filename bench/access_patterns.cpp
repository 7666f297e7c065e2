// Where the linear accumulate's time goes: the order of reading against the work per element.
//
// Standalone (no neuslice, no torch), one thread, cold cache (96 MiB written between calls), medians
// of 31 interleaved calls, x and g float32 [1024, 4096] (16 MiB each), 10 random classes:
//   - "floor": x summed, then g (one stream at a time, what `x.sum(); g.sum()` does);
//   - reads only, rows in memory order or in class order (rows of one class in turn, as the kernel's
//     rows schedule walks them), R rows side by side: what the order of reading costs by itself;
//   - the kernel's inner loop (csrc/cpu/accumulate.cpp, add_samples): R rows of one class added into
//     the class's three float accumulator rows (sum v, sum v^2, sum |v*w|; 48 KiB, L2), the
//     non-finite probe folded in.
//   - the same arithmetic with no accumulator rows at all (every sum kept in registers, folded into
//     one value): strictly less than the op must do, so what this loop reaches bounds any one-thread
//     kernel that computes the three sums;
//   - the same loop on data already in cache (2 MiB), which bounds its speed when memory is not
//     the limit.
// Build and run (README "Benchmarks" quotes one run):
//   g++ -O3 -march=native -fopenmp-simd bench/access_patterns.cpp -o /tmp/access_patterns && /tmp/access_patterns
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

constexpr int kB = 1024, kN = 4096, kClasses = 10, kReps = 31;
float g_sink;
std::vector<float> g_flush(size_t(96) << 18);

void flush() {
  for (float& v : g_flush) v += 1.0f;
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

__attribute__((noinline)) float sum(const float* p, size_t n) {
  float a = 0;
#pragma omp simd reduction(+ : a)
  for (size_t i = 0; i < n; ++i) a += p[i];
  return a;
}

// Pointers to rows order[i], ..., order[i + n - 1] of x and g.
inline void row_pointers(const float* x, const float* g, const std::vector<int>& order, size_t i, int n,
                         const float** xp, const float** gp) {
  for (int k = 0; k < n; ++k) {
    xp[k] = x + size_t(order[i + k]) * kN;
    gp[k] = g + size_t(order[i + k]) * kN;
  }
}

// Reads rows `order` of x and g, R side by side, and sums them (no accumulator rows).
template <int R>
__attribute__((noinline)) float read_rows(const float* x, const float* g, const std::vector<int>& order) {
  float a = 0;
  for (size_t i = 0; i + R <= order.size(); i += R) {
    const float* xp[R];
    const float* gp[R];
    row_pointers(x, g, order, i, R, xp, gp);
#pragma omp simd reduction(+ : a)
    for (int j = 0; j < kN; ++j)
      for (int k = 0; k < R; ++k) a += xp[k][j] + gp[k][j];
  }
  return a;
}

// The kernel's rows schedule: per class run (rows sorted by class), R rows at a time into the class's
// three accumulator rows, with the probe of every stored value.
template <int R>
__attribute__((noinline)) float accumulate(const float* x, const float* g, const std::vector<int>& order,
                                           const std::vector<int>& lab, float* acc) {
  constexpr int ld = kN + 16;
  float q = 0;
  for (size_t i = 0; i < order.size();) {
    const int c = lab[order[i]];
    size_t end = i;
    while (end < order.size() && lab[order[end]] == c) ++end;
    float* a0 = acc + size_t(3 * c) * ld;
    float* a1 = a0 + ld;
    float* a2 = a1 + ld;
    for (size_t r = i; r < end;) {
      const int rows = end - r >= size_t(R) ? R : 1;
      const float* xp[R];
      const float* gp[R];
      row_pointers(x, g, order, r, rows, xp, gp);
      float p = 0;
      if (rows == R) {
#pragma omp simd reduction(+ : p)
        for (int j = 0; j < kN; ++j) {
          float s0 = 0, s1 = 0, s2 = 0;
          for (int k = 0; k < R; ++k) {
            const float v = xp[k][j], w = gp[k][j];
            s0 += v;
            s1 += v * v;
            s2 += std::abs(v * w);
          }
          a0[j] += s0;
          a1[j] = s1 += a1[j];
          a2[j] = s2 += a2[j];
          p += (s1 + s2) * 0.f;
        }
      } else {
#pragma omp simd reduction(+ : p)
        for (int j = 0; j < kN; ++j) {
          const float v = xp[0][j], w = gp[0][j];
          a0[j] += v;
          const float s1 = a1[j] += v * v, s2 = a2[j] += std::abs(v * w);
          p += (s1 + s2) * 0.f;
        }
      }
      q += p;
      r += rows;
    }
    i = end;
  }
  return q + acc[5];
}

// The kernel's arithmetic on R rows of one class (sum v, sum v^2, sum |v*w|) with no accumulator
// rows: the three sums stay in registers and are folded into one value per call. Less than the op
// must do (nothing is stored), so it bounds what any loop computing these sums on one thread reaches.
template <int R>
__attribute__((noinline)) float arithmetic(const float* x, const float* g, const std::vector<int>& order) {
  float a = 0;
  for (size_t i = 0; i + R <= order.size(); i += R) {
    const float* xp[R];
    const float* gp[R];
    row_pointers(x, g, order, i, R, xp, gp);
#pragma omp simd reduction(+ : a)
    for (int j = 0; j < kN; ++j) {
      float s0 = 0, s1 = 0, s2 = 0;
      for (int k = 0; k < R; ++k) {
        const float v = xp[k][j], w = gp[k][j];
        s0 += v;
        s1 += v * v;
        s2 += std::abs(v * w);
      }
      a += s0 + s1 + s2;
    }
  }
  return a;
}

template <typename F>
double median_cold(F f) {
  std::vector<double> t;
  for (int rep = 0; rep < kReps; ++rep) {
    flush();
    const double t0 = now();
    g_sink += f();
    t.push_back(now() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main() {
  const size_t n = size_t(kB) * kN;
  float* x = static_cast<float*>(std::aligned_alloc(4096, n * sizeof(float)));
  float* g = static_cast<float*>(std::aligned_alloc(4096, n * sizeof(float)));
  for (size_t i = 0; i < n; ++i) {
    x[i] = 1e-3f * float(i % 7);
    g[i] = 1e-3f * float(i % 5);
  }
  std::mt19937 rng(0);
  std::vector<int> lab(kB), mem(kB), cls(kB);
  for (int i = 0; i < kB; ++i) {
    lab[i] = int(rng() % kClasses);
    mem[i] = i;
  }
  cls = mem;
  std::stable_sort(cls.begin(), cls.end(), [&](int a, int b) { return lab[a] < lab[b]; });
  std::vector<float> acc(size_t(3 * kClasses) * (kN + 16), 0.f);

  struct Case {
    const char* name;
    float (*run)(const float*, const float*, const std::vector<int>&, const std::vector<int>&, const std::vector<int>&,
                 float*);
  };
  const Case cases[] = {
      {"floor: x, then g", [](const float* x, const float* g, const std::vector<int>&, const std::vector<int>&,
                              const std::vector<int>&, float*) { return sum(x, size_t(kB) * kN) + sum(g, size_t(kB) * kN); }},
      {"read, memory order, 1 row", [](const float* x, const float* g, const std::vector<int>& m, const std::vector<int>&,
                                       const std::vector<int>&, float*) { return read_rows<1>(x, g, m); }},
      {"read, class order, 1 row", [](const float* x, const float* g, const std::vector<int>&, const std::vector<int>& c,
                                      const std::vector<int>&, float*) { return read_rows<1>(x, g, c); }},
      {"read, class order, 4 rows", [](const float* x, const float* g, const std::vector<int>&, const std::vector<int>& c,
                                       const std::vector<int>&, float*) { return read_rows<4>(x, g, c); }},
      {"read, class order, 8 rows", [](const float* x, const float* g, const std::vector<int>&, const std::vector<int>& c,
                                       const std::vector<int>&, float*) { return read_rows<8>(x, g, c); }},
      {"arithmetic only, 4 rows", [](const float* x, const float* g, const std::vector<int>&, const std::vector<int>& c,
                                     const std::vector<int>&, float*) { return arithmetic<4>(x, g, c); }},
      {"accumulate, 2 rows", [](const float* x, const float* g, const std::vector<int>&, const std::vector<int>& c,
                                const std::vector<int>& l, float* a) { return accumulate<2>(x, g, c, l, a); }},
      {"accumulate, 4 rows (kernel)", [](const float* x, const float* g, const std::vector<int>&, const std::vector<int>& c,
                                         const std::vector<int>& l, float* a) { return accumulate<4>(x, g, c, l, a); }},
      {"accumulate, 8 rows", [](const float* x, const float* g, const std::vector<int>&, const std::vector<int>& c,
                                const std::vector<int>& l, float* a) { return accumulate<8>(x, g, c, l, a); }},
  };
  constexpr int kCases = sizeof(cases) / sizeof(cases[0]);
  std::vector<std::vector<double>> t(kCases);
  for (int rep = 0; rep < kReps; ++rep)
    for (int v = 0; v < kCases; ++v) {
      flush();
      const double t0 = now();
      g_sink += cases[v].run(x, g, mem, cls, lab, acc.data());
      t[v].push_back(now() - t0);
    }
  std::vector<double> med(kCases);
  for (int v = 0; v < kCases; ++v) {
    std::sort(t[v].begin(), t[v].end());
    med[v] = t[v][t[v].size() / 2];
  }
  const double best_read = *std::min_element(med.begin(), med.begin() + 5);   // the floor and the reads
  std::printf("cold cache, 32 MiB read per call, median of %d interleaved calls\n", kReps);
  for (int v = 0; v < kCases; ++v)
    std::printf("  %-30s %6.3f ms  %5.1f GB/s  floor / this %.2f  fastest read / this %.2f\n", cases[v].name,
                med[v] * 1e3, 2.0 * n * 4 / med[v] / 1e9, med[0] / med[v], best_read / med[v]);
  // In cache: the first 64 rows (2 MiB of x and g), no flush: how fast the loop runs when memory is not
  // the limit.
  std::vector<int> hot(cls.begin(), cls.end());
  hot.erase(std::remove_if(hot.begin(), hot.end(), [](int r) { return r >= 64; }), hot.end());
  const double bytes = 2.0 * 64 * kN * 4;
  std::vector<double> th[2];
  for (int rep = 0; rep < 201; ++rep) {
    double t0 = now();
    g_sink += read_rows<4>(x, g, hot);
    th[0].push_back(now() - t0);
    t0 = now();
    g_sink += accumulate<4>(x, g, hot, lab, acc.data());
    th[1].push_back(now() - t0);
  }
  for (auto& v : th) std::sort(v.begin(), v.end());
  std::printf("in cache (2 MiB), median of 201: read 4 rows %.1f GB/s, accumulate 4 rows %.1f GB/s\n",
              bytes / th[0][100] / 1e9, bytes / th[1][100] / 1e9);
  return g_sink == 12345.f;
}
