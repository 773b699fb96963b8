// The emulated device of tests/cuda_emu: runs one call of a fastpeft._C kernel entry point
// (csrc/*.cu, compiled with g++ against the stand-in headers in include/) on host memory.
//
// Protocol (emulator.py writes it to stdin):
//   one text line:  <function> <nbuf> {<size> <head> <offset> <is_output>}*nbuf <arguments...>
//                   the fields of the entry point's parameter struct (csrc/fastpeft.h) in order, each
//                   pointer as a buffer index (-1: null), floats in C99 hex notation
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
#include "fastpeft.h"

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
  uintptr_t stream() { return static_cast<uintptr_t>(next<uint64_t>()); }

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

// Each field of the entry point's parameter struct (csrc/fastpeft.h), in order, by its kind.
#define EMU_READ_FIELD(kind, name, init) p.name = c.kind();
#define EMU_DISPATCH(fn, Params, FIELDS) \
  if (c.function() == #fn) {             \
    fastpeft::Params p;                  \
    FIELDS(EMU_READ_FIELD)               \
    return fastpeft::fn(p);              \
  }

void dispatch(Call& c) {
  FASTPEFT_ENTRY_POINTS(EMU_DISPATCH)
  throw std::runtime_error("emulator: unknown function " + c.function());
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
