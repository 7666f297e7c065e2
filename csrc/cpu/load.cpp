// The float16 -> float32 table of load.h.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "load.h"

namespace neuslice {
namespace cpu {
namespace {

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h >> 15) << 31;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  const uint32_t bits = exp == 31 ? (sign | 0x7f800000u | (mant << 13))
                                  : (sign | ((exp + 112) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

const float* make_table() {
  static std::vector<float> t(65536);
  for (uint32_t i = 0; i < 65536; ++i) t[i] = half_bits_to_float(static_cast<uint16_t>(i));
  return t.data();
}

}  // namespace

const float* const kHalfTable = make_table();

}  // namespace cpu
}  // namespace neuslice
