// PYBIND11_MODULE(_C): argument plumbing only. Pointers arrive as integers (tensor.data_ptr());
// the Python side of this boundary (neuslice/ops/_native.py) checks shapes and dtypes and builds
// the argument structs. Every name is a keyword: the structs' constructors take keywords only,
// named as the struct fields in csrc/include/neuslice/*.h, and every function argument has its
// name, so nothing is matched by position. Every kernel call releases the GIL. No math here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/isa.h"  // cpu_isa, cpu_isas, set_cpu_isa (csrc/cpu/isa_dispatch.cpp)
#include "neuslice/accumulate.h"
#include "neuslice/common.h"
#include "neuslice/cuda_runtime.h"
#include "neuslice/masked_update.h"
#include "neuslice/select.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using neuslice::DType;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// The argument structs as Python classes, constructed from keywords only.
void bind_arg_structs(py::module_& m) {
  py::class_<neuslice::AccumulateArgs>(m, "AccumulateArgs")
      .def(py::init([](uintptr_t x, uintptr_t g, uintptr_t r, uintptr_t labels, int dtype,
                       int64_t B, int64_t N, int64_t S, int64_t K, bool channels_last,
                       bool per_token, int64_t x_sb, int64_t x_sn, int64_t x_ss, int64_t g_sb,
                       int64_t g_sn, int64_t g_ss, int64_t r_sb, int64_t r_sn, int64_t r_ss,
                       int64_t l_sb,
                       int64_t l_ss, uintptr_t count, uintptr_t act_sum, uintptr_t act_sq,
                       uintptr_t taylor_sum, uintptr_t deeplift_sum, uintptr_t valid,
                       int64_t v_sb, int64_t v_ss, int64_t ignore_index) {
             neuslice::AccumulateArgs a;
             a.x = ptr<const void>(x);
             a.g = ptr<const void>(g);
             a.r = ptr<const void>(r);
             a.labels = ptr<const int64_t>(labels);
             a.dtype = static_cast<DType>(dtype);
             a.B = B; a.N = N; a.S = S; a.K = K;
             a.channels_last = channels_last;
             a.per_token = per_token;
             a.x_sb = x_sb; a.x_sn = x_sn; a.x_ss = x_ss;
             a.g_sb = g_sb; a.g_sn = g_sn; a.g_ss = g_ss;
             a.r_sb = r_sb; a.r_sn = r_sn; a.r_ss = r_ss;
             a.l_sb = l_sb; a.l_ss = l_ss;
             a.count = ptr<void>(count);
             a.act_sum = ptr<void>(act_sum);
             a.act_sq = ptr<void>(act_sq);
             a.taylor_sum = ptr<void>(taylor_sum);
             a.deeplift_sum = ptr<void>(deeplift_sum);
             a.valid = ptr<const bool>(valid);
             a.v_sb = v_sb; a.v_ss = v_ss;
             a.ignore_index = ignore_index;
             return a;
           }),
           py::kw_only(), py::arg("x"), py::arg("g"), py::arg("r"), py::arg("labels"),
           py::arg("dtype"), py::arg("B"), py::arg("N"), py::arg("S"), py::arg("K"),
           py::arg("channels_last"), py::arg("per_token"), py::arg("x_sb"), py::arg("x_sn"),
           py::arg("x_ss"), py::arg("g_sb"), py::arg("g_sn"), py::arg("g_ss"), py::arg("r_sb"), py::arg("r_sn"),
           py::arg("r_ss"), py::arg("l_sb"), py::arg("l_ss"), py::arg("count"),
           py::arg("act_sum"), py::arg("act_sq"), py::arg("taylor_sum"),
           py::arg("deeplift_sum"), py::arg("valid"), py::arg("v_sb"), py::arg("v_ss"),
           py::arg("ignore_index"));

  py::class_<neuslice::SelectArgs>(m, "SelectArgs")
      .def(py::init([](uintptr_t scores, int dtype, int64_t R, int64_t N, int64_t s_r,
                       int64_t s_n, uintptr_t out) {
             neuslice::SelectArgs a;
             a.scores = ptr<const void>(scores);
             a.dtype = static_cast<DType>(dtype);
             a.R = R; a.N = N; a.s_r = s_r; a.s_n = s_n;
             a.out = ptr<bool>(out);
             return a;
           }),
           py::kw_only(), py::arg("scores"), py::arg("dtype"), py::arg("R"), py::arg("N"),
           py::arg("s_r"), py::arg("s_n"), py::arg("out"));

  py::class_<neuslice::MaskedParam>(m, "MaskedParam")
      .def(py::init([](uintptr_t param, uintptr_t grad, uintptr_t mask, int dtype, int64_t rows,
                       int64_t cols, bool per_row) {
             neuslice::MaskedParam p;
             p.param = ptr<void>(param);
             p.grad = ptr<const void>(grad);
             p.mask = ptr<const bool>(mask);
             p.dtype = static_cast<DType>(dtype);
             p.rows = rows; p.cols = cols; p.per_row = per_row;
             return p;
           }),
           py::kw_only(), py::arg("param"), py::arg("grad"), py::arg("mask"), py::arg("dtype"),
           py::arg("rows"), py::arg("cols"), py::arg("per_row"));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "neuslice fused kernels (torch-free C++ core)";
  bind_arg_structs(m);

#ifdef NEUSLICE_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_runtime_version", &neuslice::cuda_runtime_version);
  m.def("cuda_device_count", &neuslice::cuda_device_count);

  // CUDA kernels: device pointers, the stream (torch.cuda.current_stream().cuda_stream) and the
  // device index of the tensors. Launches are asynchronous; the device int `status` holds the
  // outcome, and the Python side reads it. The return value is the launch Status.
  // The scratch size reads only the sizes, strides and null-ness of `args`, not the data.
  m.def("accumulate_cuda_scratch_bytes",
        [](const neuslice::AccumulateArgs& args) {
          return neuslice::accumulate_cuda_scratch_bytes(args);
        },
        py::arg("args"));
  m.def("accumulate_cuda",
        [](const neuslice::AccumulateArgs& args, uintptr_t scratch, int64_t scratch_bytes,
           uintptr_t status, uintptr_t stream, int device) {
          py::gil_scoped_release nogil;
          if (int rc = neuslice::cuda_set_device(device)) return rc;
          return neuslice::accumulate_cuda(args, ptr<void>(scratch), scratch_bytes,
                                           ptr<int>(status), ptr<void>(stream));
        },
        py::arg("args"), py::kw_only(), py::arg("scratch"), py::arg("scratch_bytes"),
        py::arg("status"), py::arg("stream"), py::arg("device"));
  m.def("select_cumulative_cuda",
        [](const neuslice::SelectArgs& args, double theta, uintptr_t status, uintptr_t stream,
           int device) {
          py::gil_scoped_release nogil;
          if (int rc = neuslice::cuda_set_device(device)) return rc;
          return neuslice::select_cumulative_cuda(args, theta, ptr<int>(status),
                                                  ptr<void>(stream));
        },
        py::arg("args"), py::kw_only(), py::arg("theta"), py::arg("status"), py::arg("stream"),
        py::arg("device"));
  m.def("select_topk_cuda",
        [](const neuslice::SelectArgs& args, int64_t k, uintptr_t status, uintptr_t stream,
           int device) {
          py::gil_scoped_release nogil;
          if (int rc = neuslice::cuda_set_device(device)) return rc;
          return neuslice::select_topk_cuda(args, k, ptr<int>(status), ptr<void>(stream));
        },
        py::arg("args"), py::kw_only(), py::arg("k"), py::arg("status"), py::arg("stream"),
        py::arg("device"));
#else
  m.attr("cuda_compiled") = false;
#endif
  m.def("cpu_isa", []() { return std::string(neuslice::cpu_isa()); });
  m.def("cpu_isas", &neuslice::cpu_isas);
  m.def("set_cpu_isa", [](const std::string& name) { return neuslice::set_cpu_isa(name.c_str()); },
        py::arg("name"));
  m.def("openmp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });

  m.def("accumulate_cpu",
        [](const neuslice::AccumulateArgs& args, int nthreads) {
          py::gil_scoped_release nogil;
          return neuslice::accumulate_cpu(args, nthreads);
        },
        py::arg("args"), py::kw_only(), py::arg("nthreads"));

  m.def("select_cumulative_cpu",
        [](const neuslice::SelectArgs& args, double theta, int nthreads) {
          py::gil_scoped_release nogil;
          return neuslice::select_cumulative_cpu(args, theta, nthreads);
        },
        py::arg("args"), py::kw_only(), py::arg("theta"), py::arg("nthreads"));
  m.def("select_topk_cpu",
        [](const neuslice::SelectArgs& args, int64_t k, int nthreads) {
          py::gil_scoped_release nogil;
          return neuslice::select_topk_cpu(args, k, nthreads);
        },
        py::arg("args"), py::kw_only(), py::arg("k"), py::arg("nthreads"));

  m.def("masked_sgd_cpu",
        [](const neuslice::MaskedParam& args, uintptr_t momentum_buf, double lr, double momentum,
           double weight_decay, int nthreads) {
          py::gil_scoped_release nogil;
          return neuslice::masked_sgd_cpu(args, ptr<void>(momentum_buf), lr, momentum, weight_decay,
                                          nthreads);
        },
        py::arg("args"), py::kw_only(), py::arg("momentum_buf"), py::arg("lr"), py::arg("momentum"),
        py::arg("weight_decay"), py::arg("nthreads"));
  m.def("masked_adamw_cpu",
        [](const neuslice::MaskedParam& args, uintptr_t exp_avg, uintptr_t exp_avg_sq, double lr,
           double beta1, double beta2, double eps, double weight_decay, int64_t step,
           int nthreads) {
          py::gil_scoped_release nogil;
          return neuslice::masked_adamw_cpu(args, ptr<void>(exp_avg), ptr<void>(exp_avg_sq), lr,
                                            beta1, beta2, eps, weight_decay, step, nthreads);
        },
        py::arg("args"), py::kw_only(), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("step"), py::arg("nthreads"));
}
