// Facts about the CUDA runtime linked into _C (present only in a CUDA build).
#pragma once

namespace neuslice {
#ifdef NEUSLICE_WITH_CUDA
int cuda_runtime_version();  // e.g. 13000; from the statically linked cudart
int cuda_device_count();     // 0 when no driver or no device (never throws)
int cuda_set_device(int device);  // the device the next launches of this thread go to; a Status
#endif
}  // namespace neuslice
