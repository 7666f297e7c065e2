// PYBIND11_MODULE(_C): argument plumbing only. Pointers arrive as integers (tensor.data_ptr());
// the Python side of this boundary (neuslice/ops/_native.py) checks shapes and dtypes and builds
// the argument structs. Every name is a keyword: the structs' constructors take keywords only,
// named as the struct fields in csrc/include/neuslice/*.h, and every function argument has its
// name, so nothing is matched by position (AccumulateArgs.from_fields takes one tuple whose order is
// AccumulateArgs.FIELDS, expanded from the same list as its fields: see NEUSLICE_ACCUMULATE_FIELDS). Every kernel call releases the GIL. No math here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <type_traits>
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

// Every field of neuslice::AccumulateArgs, once, in the order of AccumulateArgs.FIELDS: the keyword
// constructor, from_fields and as_dict are all expanded from this list, so a name and its place cannot
// part. A field added to the struct must be added here (the count is checked against the struct below).
#define NEUSLICE_ACCUMULATE_FIELDS(X)                                                                   \
  X(x) X(g) X(r) X(labels) X(dtype) X(B) X(N) X(S) X(K) X(channels_last) X(per_token) X(x_sb) X(x_sn)  \
  X(x_ss) X(g_sb) X(g_sn) X(g_ss) X(r_sb) X(r_sn) X(r_ss) X(l_sb) X(l_ss) X(count) X(act_sum) X(act_sq) \
  X(taylor_sum) X(deeplift_sum) X(valid) X(v_sb) X(v_ss) X(ignore_index)
#define NEUSLICE_FIELD_NAME(f) #f,
constexpr const char* kAccumulateFields[] = {NEUSLICE_ACCUMULATE_FIELDS(NEUSLICE_FIELD_NAME)};
#undef NEUSLICE_FIELD_NAME
constexpr size_t kAccumulateFieldCount = sizeof(kAccumulateFields) / sizeof(kAccumulateFields[0]);
// 10 pointers, 18 int64, the dtype and the 2 bools (each padded to 8 bytes on 64-bit targets): a field added
// to the struct but not to the list fails here.
static_assert(sizeof(void*) != 8 || sizeof(neuslice::AccumulateArgs) == 10 * 8 + 18 * 8 + 8 + 8,
              "AccumulateArgs changed: update NEUSLICE_ACCUMULATE_FIELDS");
static_assert(kAccumulateFieldCount == 31, "NEUSLICE_ACCUMULATE_FIELDS lists every AccumulateArgs field once");

[[noreturn]] void bad_field(const char* name, const char* want, PyObject* got) {
  throw py::type_error(std::string("AccumulateArgs: ") + name + " must be " + want + ", got " +
                       Py_TYPE(got)->tp_name);
}

[[noreturn]] void out_of_range(const char* name, const char* range, PyObject* got) {
  PyErr_Clear();
  throw py::value_error(std::string("AccumulateArgs: ") + name + " must lie in " + range + ", got " +
                        std::string(py::repr(got)));
}

// A field's value from a Python object, by the field's C++ type: pointers from non-negative ints
// (tensor.data_ptr(), 0 = null), integers from ints, flags from bools, the dtype from its code.
template <typename T>
T field_from(const char* name, PyObject* o) {
  if constexpr (std::is_pointer_v<T>) {
    if (!PyLong_Check(o)) bad_field(name, "an int (a data pointer)", o);
    const unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) out_of_range(name, "[0, 2**64)", o);
    return reinterpret_cast<T>(static_cast<uintptr_t>(v));
  } else if constexpr (std::is_same_v<T, bool>) {
    if (!PyBool_Check(o)) bad_field(name, "a bool", o);
    return o == Py_True;
  } else if constexpr (std::is_same_v<T, DType>) {
    if (!PyLong_Check(o) || PyBool_Check(o)) bad_field(name, "an int (a dtype code)", o);
    const long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) out_of_range(name, "[0, 3]", o);
    if (v < 0 || v > 3) throw py::value_error(std::string("AccumulateArgs: dtype must be a code in [0, 3], got ") +
                                              std::to_string(v));
    return static_cast<DType>(v);
  } else {
    static_assert(std::is_same_v<T, int64_t>);
    if (!PyLong_Check(o) || PyBool_Check(o)) bad_field(name, "an int", o);
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) out_of_range(name, "[-2**63, 2**63)", o);
    return v;
  }
}

template <typename T>
py::object field_to(T v) {
  if constexpr (std::is_pointer_v<T>) return py::int_(reinterpret_cast<uintptr_t>(v));
  else if constexpr (std::is_same_v<T, DType>) return py::int_(static_cast<int>(v));
  else if constexpr (std::is_same_v<T, bool>) return py::bool_(v);
  else return py::int_(v);
}

// The argument structs as Python classes, constructed from keywords (AccumulateArgs also from a FIELDS tuple).
void bind_arg_structs(py::module_& m) {
  // AccumulateArgs is built on every accumulate_ call (once per tap per batch in the engine), so besides
  // keywords it is built from one tuple in FIELDS order (from_fields): pybind11 matches keywords by
  // creating a string per name, 79 us for the 31 of them from a cold cache against 36 us for a tuple
  // (a scratch module timed after bench/harness.py's cache flush). The Python side makes the tuple with
  // operator.itemgetter(*FIELDS) from a dict keyed by name, so no position is ever written by hand.
  auto acc = py::class_<neuslice::AccumulateArgs>(m, "AccumulateArgs");
  py::tuple fields(kAccumulateFieldCount);
  for (size_t i = 0; i < kAccumulateFieldCount; ++i) fields[i] = py::str(kAccumulateFields[i]);
  acc.attr("FIELDS") = fields;
  acc.def(py::init([](const py::kwargs& kw) {
            neuslice::AccumulateArgs a;
            size_t used = 0;
#define NEUSLICE_FIELD_KW(f)                                                                    \
  if (!kw.contains(#f)) throw py::type_error("AccumulateArgs: missing keyword argument '" #f "'"); \
  a.f = field_from<decltype(a.f)>(#f, kw[#f].ptr());                                           \
  ++used;
            NEUSLICE_ACCUMULATE_FIELDS(NEUSLICE_FIELD_KW)
#undef NEUSLICE_FIELD_KW
            if (used != kw.size()) {
              for (auto item : kw) {
                const std::string name = py::str(item.first);
                bool known = false;
                for (const char* f : kAccumulateFields) known = known || name == f;
                if (!known) throw py::type_error("AccumulateArgs: unexpected keyword argument '" + name + "'");
              }
            }
            return a;
          }))
      .def_static("from_fields", [](const py::tuple& t) {
            if (t.size() != kAccumulateFieldCount)
              throw py::value_error("AccumulateArgs.from_fields: expected a tuple of " +
                                    std::to_string(kAccumulateFieldCount) + " values (AccumulateArgs.FIELDS), got " +
                                    std::to_string(t.size()));
            neuslice::AccumulateArgs a;
            size_t i = 0;
#define NEUSLICE_FIELD_POS(f) a.f = field_from<decltype(a.f)>(#f, PyTuple_GET_ITEM(t.ptr(), i++));
            NEUSLICE_ACCUMULATE_FIELDS(NEUSLICE_FIELD_POS)
#undef NEUSLICE_FIELD_POS
            return a;
          }, py::arg("fields"))
      .def("as_dict", [](const neuslice::AccumulateArgs& a) {
            py::dict d;
#define NEUSLICE_FIELD_OUT(f) d[#f] = field_to(a.f);
            NEUSLICE_ACCUMULATE_FIELDS(NEUSLICE_FIELD_OUT)
#undef NEUSLICE_FIELD_OUT
            return d;
          });

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
