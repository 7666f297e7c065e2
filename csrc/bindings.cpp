// PYBIND11_MODULE(_C): argument plumbing only (pointers arrive as integers from
// tensor.data_ptr()); the Python side (neuslice/_native.py) checks shapes and dtypes.
// Every kernel call releases the GIL. No math here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <cstdint>

#include "neuslice/accumulate.h"
#include "neuslice/common.h"
#include "neuslice/cuda_runtime.h"
#include "neuslice/masked_update.h"
#include "neuslice/select.h"

namespace neuslice {
const char* cpu_isa();  // csrc/cpu/isa_dispatch.cpp
}

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using neuslice::DType;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

neuslice::AccumulateArgs make_accumulate_args(
    uintptr_t x, uintptr_t g, uintptr_t r, uintptr_t labels, int dtype, int64_t B, int64_t N,
    int64_t S, int64_t K, bool channels_last, bool per_token, std::array<int64_t, 3> xs,
    std::array<int64_t, 3> gs, std::array<int64_t, 2> rs, std::array<int64_t, 2> ls,
    std::array<uintptr_t, 5> stats) {
  neuslice::AccumulateArgs a;
  a.x = ptr<const void>(x);
  a.g = ptr<const void>(g);
  a.r = ptr<const void>(r);
  a.labels = ptr<const int64_t>(labels);
  a.dtype = static_cast<DType>(dtype);
  a.B = B; a.N = N; a.S = S; a.K = K;
  a.channels_last = channels_last;
  a.per_token = per_token;
  a.x_sb = xs[0]; a.x_sn = xs[1]; a.x_ss = xs[2];
  a.g_sb = gs[0]; a.g_sn = gs[1]; a.g_ss = gs[2];
  a.r_sn = rs[0]; a.r_ss = rs[1];
  a.l_sb = ls[0]; a.l_ss = ls[1];
  a.count = ptr<void>(stats[0]);
  a.act_sum = ptr<void>(stats[1]);
  a.act_sq = ptr<void>(stats[2]);
  a.taylor_sum = ptr<void>(stats[3]);
  a.deeplift_sum = ptr<void>(stats[4]);
  return a;
}

neuslice::SelectArgs make_select_args(uintptr_t scores, int dtype, int64_t R, int64_t N,
                                      int64_t s_r, int64_t s_n, uintptr_t out) {
  neuslice::SelectArgs a;
  a.scores = ptr<const void>(scores);
  a.dtype = static_cast<DType>(dtype);
  a.R = R; a.N = N; a.s_r = s_r; a.s_n = s_n;
  a.out = ptr<bool>(out);
  return a;
}

neuslice::MaskedParam make_param(uintptr_t param, uintptr_t grad, uintptr_t mask, int dtype,
                                 int64_t rows, int64_t cols, bool per_row) {
  neuslice::MaskedParam p;
  p.param = ptr<void>(param);
  p.grad = ptr<const void>(grad);
  p.mask = ptr<const bool>(mask);
  p.dtype = static_cast<DType>(dtype);
  p.rows = rows; p.cols = cols; p.per_row = per_row;
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "neuslice fused kernels (torch-free C++ core)";

#ifdef NEUSLICE_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_runtime_version", &neuslice::cuda_runtime_version);
  m.def("cuda_device_count", &neuslice::cuda_device_count);

  // CUDA kernels: device pointers, the stream (torch.cuda.current_stream().cuda_stream) and the
  // device index of the tensors. Launches are asynchronous; the device int `status` holds the
  // outcome, and the Python side reads it. The return value is the launch Status.
  // Same arguments as accumulate_cuda up to `stats` (pointers are not read; g == 0 means no g).
  m.def("accumulate_cuda_scratch_bytes",
        [](uintptr_t x, uintptr_t g, uintptr_t r, uintptr_t labels, int dtype, int64_t B,
           int64_t N, int64_t S, int64_t K, bool channels_last, bool per_token,
           std::array<int64_t, 3> xs, std::array<int64_t, 3> gs, std::array<int64_t, 2> rs,
           std::array<int64_t, 2> ls, std::array<uintptr_t, 5> stats) {
          auto a = make_accumulate_args(x, g, r, labels, dtype, B, N, S, K, channels_last,
                                        per_token, xs, gs, rs, ls, stats);
          return neuslice::accumulate_cuda_scratch_bytes(a);
        });
  m.def("accumulate_cuda",
        [](uintptr_t x, uintptr_t g, uintptr_t r, uintptr_t labels, int dtype, int64_t B,
           int64_t N, int64_t S, int64_t K, bool channels_last, bool per_token,
           std::array<int64_t, 3> xs, std::array<int64_t, 3> gs, std::array<int64_t, 2> rs,
           std::array<int64_t, 2> ls, std::array<uintptr_t, 5> stats, uintptr_t scratch,
           int64_t scratch_bytes, uintptr_t status, uintptr_t stream, int device) {
          auto a = make_accumulate_args(x, g, r, labels, dtype, B, N, S, K, channels_last,
                                        per_token, xs, gs, rs, ls, stats);
          py::gil_scoped_release nogil;
          if (int rc = neuslice::cuda_set_device(device)) return rc;
          return neuslice::accumulate_cuda(a, ptr<void>(scratch), scratch_bytes, ptr<int>(status),
                                           ptr<void>(stream));
        });
  m.def("select_cumulative_cuda",
        [](uintptr_t scores, int dtype, int64_t R, int64_t N, int64_t s_r, int64_t s_n,
           uintptr_t out, double theta, uintptr_t status, uintptr_t stream, int device) {
          auto a = make_select_args(scores, dtype, R, N, s_r, s_n, out);
          py::gil_scoped_release nogil;
          if (int rc = neuslice::cuda_set_device(device)) return rc;
          return neuslice::select_cumulative_cuda(a, theta, ptr<int>(status), ptr<void>(stream));
        });
  m.def("select_topk_cuda",
        [](uintptr_t scores, int dtype, int64_t R, int64_t N, int64_t s_r, int64_t s_n,
           uintptr_t out, int64_t k, uintptr_t status, uintptr_t stream, int device) {
          auto a = make_select_args(scores, dtype, R, N, s_r, s_n, out);
          py::gil_scoped_release nogil;
          if (int rc = neuslice::cuda_set_device(device)) return rc;
          return neuslice::select_topk_cuda(a, k, ptr<int>(status), ptr<void>(stream));
        });
#else
  m.attr("cuda_compiled") = false;
#endif
  m.def("cpu_isa", []() { return std::string(neuslice::cpu_isa()); });
  m.def("openmp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });

  m.def("accumulate_cpu",
        [](uintptr_t x, uintptr_t g, uintptr_t r, uintptr_t labels, int dtype, int64_t B,
           int64_t N, int64_t S, int64_t K, bool channels_last, bool per_token,
           std::array<int64_t, 3> xs, std::array<int64_t, 3> gs, std::array<int64_t, 2> rs,
           std::array<int64_t, 2> ls, std::array<uintptr_t, 5> stats, int nthreads) {
          auto a = make_accumulate_args(x, g, r, labels, dtype, B, N, S, K, channels_last,
                                        per_token, xs, gs, rs, ls, stats);
          py::gil_scoped_release nogil;
          return neuslice::accumulate_cpu(a, nthreads);
        });

  m.def("select_cumulative_cpu",
        [](uintptr_t scores, int dtype, int64_t R, int64_t N, int64_t s_r, int64_t s_n,
           uintptr_t out, double theta, int nthreads) {
          auto a = make_select_args(scores, dtype, R, N, s_r, s_n, out);
          py::gil_scoped_release nogil;
          return neuslice::select_cumulative_cpu(a, theta, nthreads);
        });
  m.def("select_topk_cpu",
        [](uintptr_t scores, int dtype, int64_t R, int64_t N, int64_t s_r, int64_t s_n,
           uintptr_t out, int64_t k, int nthreads) {
          auto a = make_select_args(scores, dtype, R, N, s_r, s_n, out);
          py::gil_scoped_release nogil;
          return neuslice::select_topk_cpu(a, k, nthreads);
        });

  m.def("masked_sgd_cpu",
        [](uintptr_t param, uintptr_t grad, uintptr_t mask, int dtype, int64_t rows,
           int64_t cols, bool per_row, uintptr_t buf, double lr, double momentum,
           double weight_decay, int nthreads) {
          auto p = make_param(param, grad, mask, dtype, rows, cols, per_row);
          py::gil_scoped_release nogil;
          return neuslice::masked_sgd_cpu(p, ptr<void>(buf), lr, momentum, weight_decay,
                                          nthreads);
        });
  m.def("masked_adamw_cpu",
        [](uintptr_t param, uintptr_t grad, uintptr_t mask, int dtype, int64_t rows,
           int64_t cols, bool per_row, uintptr_t exp_avg, uintptr_t exp_avg_sq, double lr,
           double beta1, double beta2, double eps, double weight_decay, int64_t step,
           int nthreads) {
          auto p = make_param(param, grad, mask, dtype, rows, cols, per_row);
          py::gil_scoped_release nogil;
          return neuslice::masked_adamw_cpu(p, ptr<void>(exp_avg), ptr<void>(exp_avg_sq), lr,
                                            beta1, beta2, eps, weight_decay, step, nthreads);
        });
}
