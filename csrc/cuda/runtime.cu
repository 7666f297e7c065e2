// Runtime facts for backend_info(); safe to call on a machine without a GPU or driver.
#include <cuda_runtime.h>

#include "neuslice/common.h"
#include "neuslice/cuda_runtime.h"

namespace neuslice {

int cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

// torch keeps its own copy of the runtime; this one follows the device of the tensors it is
// handed (the caller passes tensor.device.index), so a launch never lands on the wrong GPU.
int cuda_set_device(int device) {
  if (cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return kCudaError;
  }
  return kOk;
}

}  // namespace neuslice
