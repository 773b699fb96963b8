// The emulated device of tests/cuda_emu: runs one call of a fastpeft._C kernel entry point
// (csrc/*.cu, compiled with g++ against the stand-in headers in include/) on host memory.
//
// Protocol (emulator.py writes it to stdin):
//   one text line:  <function> <nbuf> {<size> <head> <offset> <is_output>}*nbuf <arguments...>
//                   the arguments of bindings.cpp in order, each pointer as a buffer index (-1: null),
//                   floats in C99 hex notation
//   then the bytes of each buffer, in order.
// A buffer holds exactly the bytes an operand spans; it is allocated at that size after <head>
// bytes of padding that keep the host tensor's address modulo 64, so AddressSanitizer reports
// any access outside the operand and vector loads see the real alignment. The kernel gets
// buffer + <offset>. After the call the output buffers go to stdout, in order. Exit status: 3 for
// std::invalid_argument (ValueError in pybind11), 4 for other exceptions (RuntimeError),
// 5 when the call wrote into an input operand. FASTPEFT_CUDA_EMU_FAULT=short_operand allocates
// each input operand one byte short (its last byte is dropped), to check that ASan catches it.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include "cuda_runtime.h"

namespace fastpeft {  // as declared in csrc/bindings.cpp
void lora_shrink(uintptr_t x, int64_t s_xm, int64_t s_xk, uintptr_t a, int64_t s_ar, int64_t s_ak,
                 uintptr_t u, int64_t s_um, int64_t s_ur, int64_t M, int64_t K, int64_t R, int dtype,
                 float out_scale, bool dropout, uintptr_t seed, uint32_t thr31, int64_t split_k, int device,
                 uintptr_t stream);
void lora_expand(uintptr_t y, int64_t s_ym, int64_t s_yn, uintptr_t u, int64_t s_um, int64_t s_ur,
                 uintptr_t b, int64_t s_bn, int64_t s_br, int64_t M, int64_t N, int64_t R, int dtype,
                 float scaling, bool dropout, uintptr_t seed, uint32_t thr31, float drop_scale, int device,
                 uintptr_t stream);
void multi_lora_shrink(uintptr_t x, int64_t s_xm, int64_t s_xk, uintptr_t a, int64_t s_aa, int64_t s_ar,
                       int64_t s_ak, uintptr_t u, int64_t s_um, int64_t s_ur, uintptr_t ranks, uintptr_t indices,
                       int index_bits, uintptr_t row_order, int64_t M, int64_t K, int64_t R, int64_t n, int dtype,
                       int tile, int64_t split_k, int64_t slices, int device, uintptr_t stream);
void multi_lora_expand(uintptr_t y, int64_t s_ym, int64_t s_yn, uintptr_t u, int64_t s_um, int64_t s_ur,
                       uintptr_t b, int64_t s_ba, int64_t s_bn, int64_t s_br, uintptr_t ranks, uintptr_t scalings,
                       uintptr_t indices, int index_bits, uintptr_t row_order, int64_t M, int64_t N, int64_t R,
                       int64_t n, int dtype, int tile, int64_t slices, int device, uintptr_t stream);
void int8_quant_rows(uintptr_t x, int64_t s_xm, int64_t s_xk, uintptr_t q, int64_t s_qm, uintptr_t row_scale,
                     int64_t M, int64_t K, int dtype, float threshold, uintptr_t col_flags, int device,
                     uintptr_t stream);
void int8_gemm(uintptr_t q, int64_t s_qm, uintptr_t row_scale, uintptr_t w, int64_t s_wn, uintptr_t w_scale,
               uintptr_t y, int64_t s_ym, int64_t M, int64_t N, int64_t K, int dtype, uintptr_t bias, uintptr_t x,
               int64_t s_xm, int64_t s_xk, uintptr_t col_flags, uintptr_t cols, int64_t n_cols, uintptr_t count,
               int tile, int device, uintptr_t stream);
void quant_quantize(uintptr_t x, uintptr_t q, uintptr_t scale, uintptr_t zero_point, int64_t outer, int64_t C,
                    int64_t inner, int64_t last, int mode, int64_t group_size, int bits, int scheme, int dtype,
                    int device, uintptr_t stream);
void quant_dequantize(uintptr_t q, uintptr_t scale, uintptr_t zero_point, uintptr_t y, int64_t outer, int64_t C,
                      int64_t inner, int64_t last, int mode, int64_t group_size, int bits, int scheme, int dtype,
                      int device, uintptr_t stream);
void bottleneck_adapter_forward(uintptr_t x, int64_t s_xm, uintptr_t wd, uintptr_t bd, uintptr_t wu, uintptr_t bu, uintptr_t y,
                     int64_t s_ym, int64_t M, int64_t D, int64_t R, int dtype, int activation, float scaling,
                     int64_t n_split, int device, uintptr_t stream);
}  // namespace fastpeft

namespace {

struct Buffer {
  unsigned char* data = nullptr;
  size_t size = 0, offset = 0, allocated = 0;
  bool output = false;
};

class Call {
 public:
  explicit Call(const std::string& header) : in_(header) {
    size_t n = 0;
    in_ >> function_ >> n;
    buffers_.resize(n);
    for (auto& b : buffers_) {
      size_t head = 0;
      if (!(in_ >> b.size >> head >> b.offset >> b.output)) fail("bad request header");
      b.allocated = b.size - (b.size > 0 && !b.output && emu::injected("short_operand"));
      void* base = nullptr;
      if (posix_memalign(&base, 64, head + b.allocated + (head + b.allocated == 0)) != 0) throw std::bad_alloc();
#if defined(__SANITIZE_ADDRESS__)
      ASAN_POISON_MEMORY_REGION(base, head & ~size_t{7});  // the padding is not part of the operand
#endif
      b.data = static_cast<unsigned char*>(base) + head;
    }
  }

  const std::string& function() const { return function_; }
  std::vector<Buffer>& buffers() { return buffers_; }

  uintptr_t ptr() {
    const long i = next<long>();
    if (i < -1 || i >= static_cast<long>(buffers_.size())) fail("bad buffer index");
    return i < 0 ? 0 : reinterpret_cast<uintptr_t>(buffers_[i].data + buffers_[i].offset);
  }
  int64_t i64() { return next<int64_t>(); }
  int i32() { return next<int>(); }
  uint32_t u32() { return next<uint32_t>(); }
  bool flag() { return next<int>() != 0; }
  float f32() { return static_cast<float>(std::strtod(next<std::string>().c_str(), nullptr)); }  // as pybind11

 private:
  template <typename T> T next() {
    T v{};
    if (!(in_ >> v)) fail("missing argument");
    return v;
  }
  [[noreturn]] static void fail(const char* what) {
    std::fprintf(stderr, "emulator: %s\n", what);
    std::exit(2);
  }

  std::istringstream in_;
  std::string function_;
  std::vector<Buffer> buffers_;
};

void dispatch(Call& c) {
  if (c.function() == "lora_shrink") {
    const uintptr_t x = c.ptr();
    const int64_t s_xm = c.i64(), s_xk = c.i64();
    const uintptr_t a = c.ptr();
    const int64_t s_ar = c.i64(), s_ak = c.i64();
    const uintptr_t u = c.ptr();
    const int64_t s_um = c.i64(), s_ur = c.i64(), M = c.i64(), K = c.i64(), R = c.i64();
    const int dtype = c.i32();
    const float out_scale = c.f32();
    const bool dropout = c.flag();
    const uintptr_t seed = c.ptr();
    const uint32_t thr31 = c.u32();
    const int64_t split_k = c.i64();
    const int device = c.i32();
    const auto stream = static_cast<uintptr_t>(c.i64());
    fastpeft::lora_shrink(x, s_xm, s_xk, a, s_ar, s_ak, u, s_um, s_ur, M, K, R, dtype, out_scale, dropout, seed,
                          thr31, split_k, device, stream);
  } else if (c.function() == "lora_expand") {
    const uintptr_t y = c.ptr();
    const int64_t s_ym = c.i64(), s_yn = c.i64();
    const uintptr_t u = c.ptr();
    const int64_t s_um = c.i64(), s_ur = c.i64();
    const uintptr_t b = c.ptr();
    const int64_t s_bn = c.i64(), s_br = c.i64(), M = c.i64(), N = c.i64(), R = c.i64();
    const int dtype = c.i32();
    const float scaling = c.f32();
    const bool dropout = c.flag();
    const uintptr_t seed = c.ptr();
    const uint32_t thr31 = c.u32();
    const float drop_scale = c.f32();
    const int device = c.i32();
    const auto stream = static_cast<uintptr_t>(c.i64());
    fastpeft::lora_expand(y, s_ym, s_yn, u, s_um, s_ur, b, s_bn, s_br, M, N, R, dtype, scaling, dropout, seed,
                          thr31, drop_scale, device, stream);
  } else if (c.function() == "multi_lora_shrink") {
    const uintptr_t x = c.ptr();
    const int64_t s_xm = c.i64(), s_xk = c.i64();
    const uintptr_t a = c.ptr();
    const int64_t s_aa = c.i64(), s_ar = c.i64(), s_ak = c.i64();
    const uintptr_t u = c.ptr();
    const int64_t s_um = c.i64(), s_ur = c.i64();
    const uintptr_t ranks = c.ptr(), indices = c.ptr();
    const int index_bits = c.i32();
    const uintptr_t row_order = c.ptr();
    const int64_t M = c.i64(), K = c.i64(), R = c.i64(), n = c.i64();
    const int dtype = c.i32(), tile = c.i32();
    const int64_t split_k = c.i64(), slices = c.i64();
    const int device = c.i32();
    const auto stream = static_cast<uintptr_t>(c.i64());
    fastpeft::multi_lora_shrink(x, s_xm, s_xk, a, s_aa, s_ar, s_ak, u, s_um, s_ur, ranks, indices, index_bits,
                                row_order, M, K, R, n, dtype, tile, split_k, slices, device, stream);
  } else if (c.function() == "multi_lora_expand") {
    const uintptr_t y = c.ptr();
    const int64_t s_ym = c.i64(), s_yn = c.i64();
    const uintptr_t u = c.ptr();
    const int64_t s_um = c.i64(), s_ur = c.i64();
    const uintptr_t b = c.ptr();
    const int64_t s_ba = c.i64(), s_bn = c.i64(), s_br = c.i64();
    const uintptr_t ranks = c.ptr(), scalings = c.ptr(), indices = c.ptr();
    const int index_bits = c.i32();
    const uintptr_t row_order = c.ptr();
    const int64_t M = c.i64(), N = c.i64(), R = c.i64(), n = c.i64();
    const int dtype = c.i32(), tile = c.i32();
    const int64_t slices = c.i64();
    const int device = c.i32();
    const auto stream = static_cast<uintptr_t>(c.i64());
    fastpeft::multi_lora_expand(y, s_ym, s_yn, u, s_um, s_ur, b, s_ba, s_bn, s_br, ranks, scalings, indices,
                                index_bits, row_order, M, N, R, n, dtype, tile, slices, device, stream);
  } else if (c.function() == "int8_quant_rows") {
    const uintptr_t x = c.ptr();
    const int64_t s_xm = c.i64(), s_xk = c.i64();
    const uintptr_t q = c.ptr();
    const int64_t s_qm = c.i64();
    const uintptr_t row_scale = c.ptr();
    const int64_t M = c.i64(), K = c.i64();
    const int dtype = c.i32();
    const float threshold = c.f32();
    const uintptr_t col_flags = c.ptr();
    const int device = c.i32();
    const auto stream = static_cast<uintptr_t>(c.i64());
    fastpeft::int8_quant_rows(x, s_xm, s_xk, q, s_qm, row_scale, M, K, dtype, threshold, col_flags, device, stream);
  } else if (c.function() == "int8_gemm") {
    const uintptr_t q = c.ptr();
    const int64_t s_qm = c.i64();
    const uintptr_t row_scale = c.ptr(), w = c.ptr();
    const int64_t s_wn = c.i64();
    const uintptr_t w_scale = c.ptr(), y = c.ptr();
    const int64_t s_ym = c.i64(), M = c.i64(), N = c.i64(), K = c.i64();
    const int dtype = c.i32();
    const uintptr_t bias = c.ptr(), x = c.ptr();
    const int64_t s_xm = c.i64(), s_xk = c.i64();
    const uintptr_t col_flags = c.ptr(), cols = c.ptr();
    const int64_t n_cols = c.i64();
    const uintptr_t count = c.ptr();
    const int tile = c.i32(), device = c.i32();
    const auto stream = static_cast<uintptr_t>(c.i64());
    fastpeft::int8_gemm(q, s_qm, row_scale, w, s_wn, w_scale, y, s_ym, M, N, K, dtype, bias, x, s_xm, s_xk, col_flags,
                        cols, n_cols, count, tile, device, stream);
  } else if (c.function() == "quant_quantize" || c.function() == "quant_dequantize") {
    const uintptr_t a = c.ptr(), b = c.ptr(), s = c.ptr(), z = c.ptr();
    const int64_t outer = c.i64(), C = c.i64(), inner = c.i64(), last = c.i64();
    const int mode = c.i32();
    const int64_t group_size = c.i64();
    const int bits = c.i32(), scheme = c.i32(), dtype = c.i32(), device = c.i32();
    const auto stream = static_cast<uintptr_t>(c.i64());
    if (c.function() == "quant_quantize") {
      fastpeft::quant_quantize(a, b, s, z, outer, C, inner, last, mode, group_size, bits, scheme, dtype, device,
                               stream);
    } else {  // q, scale, zero_point, y
      fastpeft::quant_dequantize(a, b, s, z, outer, C, inner, last, mode, group_size, bits, scheme, dtype, device,
                                 stream);
    }
  } else if (c.function() == "bottleneck_adapter_forward") {
    const uintptr_t x = c.ptr();
    const int64_t s_xm = c.i64();
    const uintptr_t wd = c.ptr(), bd = c.ptr(), wu = c.ptr(), bu = c.ptr(), y = c.ptr();
    const int64_t s_ym = c.i64(), M = c.i64(), D = c.i64(), R = c.i64();
    const int dtype = c.i32(), activation = c.i32();
    const float scaling = c.f32();
    const int64_t n_split = c.i64();
    const int device = c.i32();
    const auto stream = static_cast<uintptr_t>(c.i64());
    fastpeft::bottleneck_adapter_forward(x, s_xm, wd, bd, wu, bu, y, s_ym, M, D, R, dtype, activation, scaling, n_split, device,
                              stream);
  } else {
    throw std::runtime_error("emulator: unknown function " + c.function());
  }
}

}  // namespace

int main() {
  std::string header;
  for (int ch; (ch = std::getchar()) != EOF && ch != '\n';) header += static_cast<char>(ch);
  Call call(header);
  std::vector<std::vector<unsigned char>> before;
  for (auto& b : call.buffers()) {
    if (std::fread(b.data, 1, b.allocated, stdin) != b.allocated || (b.size > b.allocated && std::getchar() == EOF)) {
      std::fprintf(stderr, "emulator: short input\n");
      return 2;
    }
    before.emplace_back(b.data, b.data + (b.output ? 0 : b.allocated));
  }
  try {
    dispatch(call);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 4;
  }
  for (size_t i = 0; i < call.buffers().size(); ++i) {
    const Buffer& b = call.buffers()[i];
    if (b.output) {
      std::fwrite(b.data, 1, b.size, stdout);
    } else if (b.allocated != 0 && std::memcmp(b.data, before[i].data(), b.allocated) != 0) {
      std::fprintf(stderr, "emulator: %s wrote into its input operand #%zu\n", call.function().c_str(), i);
      return 5;
    }
  }
  return std::fflush(stdout) == 0 ? 0 : 2;
}
