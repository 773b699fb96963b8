// Host stand-in for the __nv_bfloat16 type and conversions csrc/ uses (tests/cuda_emu; NOT CUDA).
#pragma once
#include "cuda_runtime.h"

struct __nv_bfloat16 {
  unsigned short x;  // the high half of an IEEE binary32
};
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even; NaN stays NaN
  uint32_t b = __float_as_uint(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return __nv_bfloat16{0x7FFF};
  b += 0x7FFFu + ((b >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(b >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<uint32_t>(h.x) << 16); }
