// Host stand-in for the __half type and conversions csrc/ uses (tests/cuda_emu; NOT CUDA).
#pragma once
#include <cstring>

#include "cuda_runtime.h"

struct __half {
  unsigned short x;  // IEEE binary16 bits
};
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __float2half_rn(float f) {  // round to nearest even, as on the GPU
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return static_cast<float>(v);
}
