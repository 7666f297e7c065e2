// Shared vocabulary of the C++ core: dtypes and status codes. Torch-free.
#pragma once
#include <cstdint>

namespace neuslice {

// Element type of an input tensor, as the Python side encodes it (neuslice/ops/_native.py).
enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// Status codes returned by every kernel entry point; the Python side turns them into errors.
enum Status : int {
  kOk = 0,
  kNonFiniteX = 1,        // a non-finite activation (or a statistic of it) was met: nothing was added
  kNonFiniteGrad = 2,     // a non-finite gradient term was met: nothing was added
  kBadLabel = 4,          // a label outside [0, K)
  kBadScore = 8,          // a negative or non-finite score given to select
  kCudaError = 16,        // a CUDA launch or runtime call failed
  kBadArgument = 32,      // an argument the bindings should have caught
};

}  // namespace neuslice
