// fastpeft._C: pybind11 bindings of the CUDA C++ kernels declared in fastpeft.h.
//
// No libtorch: tensors arrive as raw device pointers (Python ints), sizes, element strides and a
// dtype code (0 float32, 1 float16, 2 bfloat16); the stream is a cudaStream_t as an int. Every
// entry point takes keyword arguments named as its parameter struct's fields (fastpeft.h lists
// them once, with their defaults); an unknown keyword and a missing required one are errors.
// The Python wrappers in fastpeft/ops/_cext.py check tensors and pass these. Errors raise RuntimeError (CUDA failures)
// or ValueError (bad arguments: pybind11 maps std::invalid_argument to ValueError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastpeft.h"

namespace py = pybind11;

namespace {

// What a keyword of each kind takes (fastpeft.h), for the TypeError of a value that does not fit.
#define FASTPEFT_TAKES_ptr "an address, an int in [0, 2**64)"
#define FASTPEFT_TAKES_i64 "an int in [-2**63, 2**63)"
#define FASTPEFT_TAKES_i32 "an int in [-2**31, 2**31)"
#define FASTPEFT_TAKES_u32 "an int in [0, 2**32)"
#define FASTPEFT_TAKES_flag "a bool"
#define FASTPEFT_TAKES_f32 "a float"
#define FASTPEFT_TAKES_stream "a cudaStream_t, an int in [0, 2**64)"

// params.<name> from kwargs[<name>] when given (an error when it is required and not given).
#define FASTPEFT_READ_KWARG(kind, name, init)                                                     \
  if (kwargs.contains(#name)) {                                                                  \
    try {                                                                                        \
      params.name = kwargs[#name].cast<FASTPEFT_KIND_##kind>();                                  \
    } catch (const py::cast_error&) {                                                            \
      throw py::type_error(std::string(entry) + ": keyword " #name " takes " FASTPEFT_TAKES_##kind); \
    }                                                                                            \
  } else if (fastpeft::is_required(init)) {                                                      \
    throw std::invalid_argument(std::string(entry) + ": missing required keyword argument " #name); \
  }
#define FASTPEFT_FIELD_NAME(kind, name, init) " " #name
#define FASTPEFT_FIELD_DOC(kind, name, init) "\n  " #name ": " #kind " = " #init
#define FASTPEFT_COUNT_KWARG(kind, name, init) known += kwargs.contains(#name);

#define FASTPEFT_BIND_ENTRY(name, Params, FIELDS)                                                  \
  m.def(                                                                                           \
      #name,                                                                                       \
      [](py::kwargs kwargs) {                                                                      \
        using fastpeft::required;                                                                  \
        constexpr const char* entry = #name;                                                       \
        size_t known = 0;                                                                          \
        FIELDS(FASTPEFT_COUNT_KWARG)                                                               \
        if (known != kwargs.size())                                                                \
          throw std::invalid_argument(#name ": unknown keyword argument(s); it takes:"              \
                                      FIELDS(FASTPEFT_FIELD_NAME));                                 \
        fastpeft::Params params;                                                                   \
        FIELDS(FASTPEFT_READ_KWARG)                                                                \
        py::gil_scoped_release release;                                                            \
        fastpeft::name(params);                                                                    \
      },                                                                                           \
      (std::string(DOC_##name) + "\n\nKeyword arguments (kind = default; csrc/fastpeft.h):"        \
       FIELDS(FASTPEFT_FIELD_DOC)).c_str());

constexpr const char* DOC_lora_shrink =
    "U[m, r] = out_scale * sum_k dropout(X)[m, k] * A[r, k] into fp32 U (overwritten).\n"
    "Element (r, k) of A is at a + r*s_ar + k*s_ak; kept elements are not rescaled\n"
    "(fold 1/(1-p) into out_scale). seed: device pointer of the int64 dropout seed (read by the\n"
    "kernel, so a CUDA graph replays with the value in memory). split_k=0 picks the K split.";
constexpr const char* DOC_lora_expand =
    "Y[m, n] += scaling * keep(m, n) * drop_scale * sum_r U[m, r] * B[n, r] in place.\n"
    "Element (n, r) of B is at b + n*s_bn + r*s_br; U is fp32; keep is the dropout mask\n"
    "on (row, col) of Y when dropout is true (else 1 and drop_scale is unused), its seed read\n"
    "from the int64 at device pointer seed.";
constexpr const char* DOC_multi_lora_shrink =
    "Multi-adapter LoRA shrink: U[i, r] = sum_k X[i, k] * A[a, r, k] for r < rank (fp32 U, overwritten),\n"
    "0 for r >= rank and for rows without adapter, where a = indices[i] (int32 or int64: index_bits) and\n"
    "rank = min(ranks[a], R) (ranks int32 [n], read on the device); an index outside [0, n) or a rank < 1\n"
    "means no adapter. Element (a, r, k) of the stack is at a + a*s_aa + r*s_ar + k*s_ak; entries with\n"
    "r >= rank are never read. row_order (int32 [M], 0: identity) lists the rows in processing order (a\n"
    "permutation; rows sorted by adapter share weight tiles; entries outside [0, M) are skipped).\n"
    "tile: 0 chooses, 1 128-row tiles, 2 16-row (decode) tiles; split_k, slices: 0 choose.";
constexpr const char* DOC_multi_lora_expand =
    "Multi-adapter LoRA expand: Y[i, n] += scalings[a] * sum_{r < rank} U[i, r] * B[a, n, r] in place\n"
    "(fp32 accumulation, Y rounded once), rows without adapter untouched; a, rank, row_order as in\n"
    "multi_lora_shrink; scalings float32 [n]. Element (a, n, r) of the stack is at\n"
    "b + a*s_ba + n*s_bn + r*s_br; U (fp32) and B entries with r >= rank are never read.\n"
    "tile: 0 chooses, 1 64-row tiles, 2 16-row (decode) tiles; slices: 0 chooses.";
constexpr const char* DOC_int8_quant_rows =
    "LLM.int8() row quantization of X [M, K] (element (m, k) at x + m*s_xm + k*s_xk):\n"
    "row_scale[m] = max |X[m, k]| over the entries with |X| < threshold (all when threshold is 0),\n"
    "q[m, k] (int8, at q + m*s_qm + k) = round-half-even(X[m, k] * 127 / row_scale[m]) clamped to\n"
    "[-127, 127], 0 for outlier entries, NaN and scale 0; col_flags[k] (int32 [K], zeroed by the\n"
    "caller; 0: not given) is set to 1 where some |X[m, k]| >= threshold > 0. Outlier columns are\n"
    "not zeroed in q (int8_gemm masks them).";
constexpr const char* DOC_int8_gemm =
    "Y[m, n] (at y + m*s_ym + n) = (sum_k q'[m, k] W[n, k]) * row_scale[m] * w_scale[n] / 127^2\n"
    "  + sum_{c in cols[:count]} X[m, c] W[n, c] * w_scale[n] / 127 + bias[n]  (overwritten).\n"
    "q [M, K] and W [N, K] are int8 with unit column stride; q' is q with the columns where\n"
    "col_flags != 0 zeroed (col_flags 0: none). cols (int32, n_cols entries) and count (int32 [1],\n"
    "read on the device, clamped to [0, min(n_cols, K)]) list the outlier columns of X (element\n"
    "(m, k) at x + m*s_xm + k*s_xk, dtype of Y); bias 0: none. int32 accumulation on int8 tensor\n"
    "cores, fp32 epilogue. tile: 0 chooses, 1 128x128 (64x64 where K or a stride of q, w is not a multiple\n"
    "of 16: byte loads), 2 64x64, 3 16x32 (K split over warps).";
constexpr const char* DOC_int8_dequant_matmul =
    "dx[m, k] (at dx + m*s_xm + k, overwritten) = sum_n dy[m, n] * W_deq[n, k], W_deq[n, k] = w[n, k] * (w_scale[n] / 127)\n"
    "(the fp32 product, as reference.int8.dequantize_weight): the gradient of the int8 layer w.r.t. its input.\n"
    "dy [M, N] (element (m, n) at dy + m*s_dm + n*s_dn) and dx [M, K] of dtype; w int8 [N, K] (element (n, k) at\n"
    "w + n*s_wn + k*s_wk); w_scale float32 [N]. Each int8 W tile is dequantized in registers (rounded to dtype for\n"
    "fp16/bf16; 3xTF32 fragments for fp32) and multiplied on tensor cores with fp32 accumulation; no dequantized\n"
    "weight is written. tile: 0 chooses, 1 large (16-bit: 128x128, fp32: 64x128), 2 64x64 (fp32: as 1), 3 16-row.";
constexpr const char* DOC_quant_quantize =
    "Absmax / zero-point quantization of contiguous x (numel = outer*C*inner, last dim `last`), as\n"
    "fastpeft/reference/quant.py: mode 0 one slot, 1 slot (e / inner) % C (per channel), 2 slot e / group_size\n"
    "(groups along the last dim). scheme 0 absmax (int8 codes), 1 zeropoint (uint8). bits 8: q holds numel\n"
    "bytes; bits 4: [numel / last, ceil(last / 2)] bytes, element 2j in the low nibble. scale (float32) and\n"
    "zero_point (int32) hold one entry per slot (also the reduction's workspace; no host sync).";
constexpr const char* DOC_quant_dequantize =
    "y (dtype, contiguous) = (code - zero_point[slot]) * scale[slot] in fp32 from quant_quantize's q, with\n"
    "the same geometry arguments (scheme 0: signed codes / nibbles, 1: unsigned).";
constexpr const char* DOC_nf4_dequantize =
    "NF4 / FP4 dequantization with bitsandbytes' layout (fastpeft/reference/nf4.py): y[e] (dtype, n elements,\n"
    "contiguous) = code[nibble] * absmax[e / block_size] in fp32, rounded once; nibble e of data is the high\n"
    "nibble of byte e / 2 when e is even. code: the 16 float32 table values. nested given: double quantization,\n"
    "absmax holds the uint8 codes of the block absmax, restored as dyn[code] * nested[b / 256] + offset[0]\n"
    "(two roundings; dyn the 256-entry dynamic map).";
constexpr const char* DOC_nf4_quantize =
    "NF4 / FP4 quantization with bitsandbytes' layout (fastpeft/reference/nf4.py): x (dtype, n elements,\n"
    "contiguous) read in blocks of block_size; absmax[b] = max |x| (float32); the code of x is the count of\n"
    "the 15 sorted-table midpoints `mids` strictly below clamp(x * (1 / max(absmax, 1e-38)), -1, 1) (0 in an\n"
    "all-zero block), mapped through `order` (nibble p: the code of sorted position p; 0: identity, NF4);\n"
    "q[j] packs element 2j in the high nibble, 2j + 1 in the low one (an odd n pads with the code of 0.0).";
constexpr const char* DOC_nf4_double_quant =
    "Double quantization (QLoRA) of n float32 absmax values: d = absmax - offset[0] (the mean, computed by the\n"
    "caller), per block of 256 nested[c] = max |d|, q8 = the count of the dynamic map's 255 midpoints `mids`\n"
    "strictly below clamp(d * (1 / max(nested, 1e-38)), -1, 1) (0 in an all-zero block).";
constexpr const char* DOC_bottleneck_adapter_forward =
    "Fused bottleneck adapter (Houlsby): y = x + scaling * (act(x W_d^T + b_d) W_u^T + b_u), y overwritten.\n"
    "X [M, D] (element (m, k) at x + m*s_xm + k) and Y [M, D] (at y + m*s_ym + n) have unit column\n"
    "stride; W_d [R, D] (wd) and W_u [D, R] (wu) are contiguous; b_d [R] (bd) and b_u [D] (bu), 0: none.\n"
    "All of dtype. h accumulates in fp32; a = act(h) is rounded to dtype before the second GEMM, which\n"
    "accumulates in fp32; y = x + scaling * z in fp32, rounded once. activation: 0 relu, 1 gelu (erf),\n"
    "2 gelu_tanh, 3 silu. 1 <= R <= 256. n_split: blocks sharing the D columns of a row tile (each\n"
    "recomputes the bottleneck of its rows); 0 chooses from the SM count.";

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpeft CUDA C++ kernels (raw device pointers, element strides, explicit stream)";
  FASTPEFT_ENTRY_POINTS(FASTPEFT_BIND_ENTRY)
  m.def("cuda_device_count", &fastpeft::cuda_device_count,
        "Number of CUDA devices this module's runtime sees (0 without a driver or GPU).");
  m.def("compiled_archs", &fastpeft::compiled_archs, "The sm_XX targets compiled into this module, as ints.");
  m.def("cuda_runtime_version", &fastpeft::cuda_runtime_version,
        "CUDART_VERSION of the static CUDA runtime this module was built with (1000 * major + 10 * minor).");
  m.def("cuda_driver_version", &fastpeft::cuda_driver_version,
        "The CUDA version the installed NVIDIA driver supports (cudaDriverGetVersion; 0 without a driver).");
  // The import fails (fastpeft then runs its Triton kernels, with one warning saying why and how to fix it)
  // when the driver is older than the runtime linked in, instead of every launch failing later. A C++
  // exception leaving the module's init becomes ImportError(what()); a Python one would be replaced by
  // ImportError("initialization failed").
  py::object why = py::module_::import("fastpeft.ops._cext").attr("check_driver")(m);
  if (!why.is_none()) throw std::runtime_error(why.cast<std::string>());
}
