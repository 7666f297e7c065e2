// Shared by the accumulate kernels (accumulate.cu, label_sort.cuh): element traits, the
// parameter block every kernel receives by value, and label access. One translation unit
// (accumulate.cu) includes it, inside no namespace of its own.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "neuslice/accumulate.h"

namespace neuslice {
namespace {

using cuda::ceil_div;
using cuda::kFullMask;

constexpr int kThreads = 256;
// Work targets: about two waves of resident threads on a 132-SM H100 (2048 threads per SM).
constexpr int64_t kTargetThreads = int64_t(1) << 18;
constexpr int64_t kTargetWarps = kTargetThreads / 32;
constexpr int64_t kRowsMinS = 16;  // shorter channels-first runs go to the cols kernel (L1 reuse)

struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

// Element traits: accumulation type, elements per 16 bytes, scalar load, 16-byte unpack.
template <typename T> struct E;
template <> struct E<float> {
  using Acc = float;
  static constexpr int V = 4;
  static __device__ __forceinline__ float ld(const float* p, int64_t i) { return __ldg(p + i); }
  static __device__ __forceinline__ void unpack(const uint4& u, float* o) {
    o[0] = __uint_as_float(u.x); o[1] = __uint_as_float(u.y);
    o[2] = __uint_as_float(u.z); o[3] = __uint_as_float(u.w);
  }
};
template <> struct E<double> {
  using Acc = double;
  static constexpr int V = 2;
  static __device__ __forceinline__ double ld(const double* p, int64_t i) { return __ldg(p + i); }
  static __device__ __forceinline__ void unpack(const uint4& u, double* o) {
    o[0] = __hiloint2double(static_cast<int>(u.y), static_cast<int>(u.x));
    o[1] = __hiloint2double(static_cast<int>(u.w), static_cast<int>(u.z));
  }
};
template <> struct E<f16_t> {
  using Acc = float;
  static constexpr int V = 8;
  static __device__ __forceinline__ float cvt(unsigned h) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
  }
  static __device__ __forceinline__ float ld(const f16_t* p, int64_t i) {
    return cvt(__ldg(reinterpret_cast<const unsigned short*>(p) + i));
  }
  static __device__ __forceinline__ void unpack(const uint4& u, float* o) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // little endian: the lower address is the low half
      o[2 * j] = cvt(w[j] & 0xffffu);
      o[2 * j + 1] = cvt(w[j] >> 16);
    }
  }
};
template <> struct E<bf16_t> {
  using Acc = float;
  static constexpr int V = 8;
  static __device__ __forceinline__ float ld(const bf16_t* p, int64_t i) {
    return __uint_as_float(static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short*>(p) + i)) << 16);
  }
  static __device__ __forceinline__ void unpack(const uint4& u, float* o) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      o[2 * j] = __uint_as_float(w[j] << 16);
      o[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  }
};

template <typename T>
__device__ __forceinline__ void ldv(const T* p, typename E<T>::Acc* o) {
  E<T>::unpack(__ldg(reinterpret_cast<const uint4*>(p)), o);
}

// The V consecutive neurons n0 .. n0+V-1 of one row, starting at element `off` with neuron stride
// `sn`: one 16-byte load when `vec`, else element by element with zeros past N.
template <typename T>
__device__ __forceinline__ void ld_cols(const T* p, int64_t off, int64_t sn, bool vec, int64_t n0, int64_t N,
                                        typename E<T>::Acc* o) {
  if (vec) {
    ldv(p + off, o);
    return;
  }
#pragma unroll
  for (int v = 0; v < E<T>::V; ++v) o[v] = n0 + v < N ? E<T>::ld(p, off + v * sn) : typename E<T>::Acc(0);
}

// Everything a kernel needs, passed by value.
struct Params {
  const void* x; const void* g; const void* r; const int64_t* labels;
  int64_t B, N, S, K, L, Sin, Kc;
  int64_t x_sb, x_sn, x_ss, g_sb, g_sn, g_ss, r_sb, r_sn, r_ss, l_sb, l_ss;  // r_sb = 0: a shared r
  bool per_token, has_r;
  bool vec;   // cols: 16-byte loads of x (and g) are aligned for every (b, s)
  bool rvec;  // cols: same for r (for every b too, when r is per sample)
  int64_t ng;     // cols: neuron groups of V
  int64_t chunk;  // class-sorted positions per work unit (direct kernels, finalize)
  int64_t sc, nsc;  // split kernels: positions per unit, units per (sample, neuron)
  // valid [B, S] (null: every position counts) and ignore_index; nv [L]: valid positions of each
  // sample (per-sample labels with S > 1 and a valid mask only); nkept: samples that count, the
  // length of perm / pcls (a sample with an ignored label or no valid position is not sorted in).
  const unsigned char* valid; int64_t v_sb, v_ss; long long ignore_index;
  int* nv; int* nkept;
  int* hist; int* cursor; int* cid; int* classes; int* nclass; int* perm; int* pcls;
  void* part;  // Acc [P][Kc][N]
  void* sums;  // Acc [3][L][N] (split only)
  int* status;
};

__device__ __forceinline__ int64_t label_of(const Params& p, int64_t i) {
  return p.per_token ? __ldg(p.labels + (i / p.S) * p.l_sb + (i % p.S) * p.l_ss)
                     : __ldg(p.labels + i * p.l_sb);
}

// Whether position s of sample b counts (valid is null or true there).
__device__ __forceinline__ bool valid_at(const Params& p, int64_t b, int64_t s) {
  return p.valid == nullptr || __ldg(p.valid + b * p.v_sb + s * p.v_ss) != 0;
}

// Whether sample (or token) i has a valid position: per token and S == 1 its own flag, else nv.
__device__ __forceinline__ bool has_valid(const Params& p, int64_t i) {
  if (p.valid == nullptr) return true;
  if (p.per_token) return valid_at(p, i / p.S, i % p.S);
  if (p.S == 1) return valid_at(p, i, 0);
  return __ldg(p.nv + i) > 0;
}

// 1 / |V_b| for per-sample labels (1 per token): the mean over the valid positions.
template <typename Acc>
__device__ __forceinline__ Acc inv_positions(const Params& p, int64_t b) {
  if (p.valid == nullptr || p.per_token || p.S == 1) return Acc(1) / static_cast<Acc>(p.Sin);
  return Acc(1) / static_cast<Acc>(__ldg(p.nv + b));
}

__device__ __forceinline__ bool labels_bad(const Params& p) {
  return (*static_cast<volatile int*>(p.status) & kBadLabel) != 0;
}

}  // namespace
}  // namespace neuslice
