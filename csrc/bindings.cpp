// fastpeft._C: pybind11 bindings of the CUDA C++ kernels.
//
// No libtorch: tensors arrive as raw device pointers (Python ints), sizes, element strides
// and a dtype code (0 float32, 1 float16, 2 bfloat16); the stream is a cudaStream_t as an
// int. The Python wrappers in fastpeft/ops/_cext.py check tensors and pass these. Errors
// raise RuntimeError (CUDA failures) or ValueError (bad arguments: pybind11 maps
// std::invalid_argument to ValueError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

namespace py = pybind11;
using namespace py::literals;

namespace fastpeft {
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
int cuda_device_count();
std::vector<int> compiled_archs();
}  // namespace fastpeft

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpeft CUDA C++ kernels (raw device pointers, element strides, explicit stream)";
  m.def("lora_shrink", &fastpeft::lora_shrink,
        "U[m, r] = out_scale * sum_k dropout(X)[m, k] * A[r, k] into fp32 U (overwritten).\n"
        "Element (r, k) of A is at a + r*s_ar + k*s_ak; kept elements are not rescaled\n"
        "(fold 1/(1-p) into out_scale). seed: device pointer of the int64 dropout seed (read by the\n"
        "kernel, so a CUDA graph replays with the value in memory). split_k=0 picks the K split.",
        "x"_a, "s_xm"_a, "s_xk"_a, "a"_a, "s_ar"_a, "s_ak"_a, "u"_a, "s_um"_a, "s_ur"_a, "M"_a, "K"_a, "R"_a,
        "dtype"_a, "out_scale"_a = 1.0f, "dropout"_a = false, "seed"_a = 0, "thr31"_a = 0u, "split_k"_a = 0,
        "device"_a = 0, "stream"_a = 0, py::call_guard<py::gil_scoped_release>());
  m.def("lora_expand", &fastpeft::lora_expand,
        "Y[m, n] += scaling * keep(m, n) * drop_scale * sum_r U[m, r] * B[n, r] in place.\n"
        "Element (n, r) of B is at b + n*s_bn + r*s_br; U is fp32; keep is the dropout mask\n"
        "on (row, col) of Y when dropout is true (else 1 and drop_scale is unused), its seed read\n"
        "from the int64 at device pointer seed.",
        "y"_a, "s_ym"_a, "s_yn"_a, "u"_a, "s_um"_a, "s_ur"_a, "b"_a, "s_bn"_a, "s_br"_a, "M"_a, "N"_a, "R"_a,
        "dtype"_a, "scaling"_a = 1.0f, "dropout"_a = false, "seed"_a = 0, "thr31"_a = 0u, "drop_scale"_a = 1.0f,
        "device"_a = 0, "stream"_a = 0, py::call_guard<py::gil_scoped_release>());
  m.def("multi_lora_shrink", &fastpeft::multi_lora_shrink,
        "Multi-adapter LoRA shrink: U[i, r] = sum_k X[i, k] * A[a, r, k] for r < rank (fp32 U, overwritten),\n"
        "0 for r >= rank and for rows without adapter, where a = indices[i] (int32 or int64: index_bits) and\n"
        "rank = min(ranks[a], R) (ranks int32 [n], read on the device); an index outside [0, n) or a rank < 1\n"
        "means no adapter. Element (a, r, k) of the stack is at a + a*s_aa + r*s_ar + k*s_ak; entries with\n"
        "r >= rank are never read. row_order (int32 [M], 0: identity) lists the rows in processing order (a\n"
        "permutation; rows sorted by adapter share weight tiles; entries outside [0, M) are skipped).\n"
        "tile: 0 chooses, 1 128-row tiles, 2 16-row (decode) tiles; split_k, slices: 0 choose.",
        "x"_a, "s_xm"_a, "s_xk"_a, "a"_a, "s_aa"_a, "s_ar"_a, "s_ak"_a, "u"_a, "s_um"_a, "s_ur"_a, "ranks"_a,
        "indices"_a, "index_bits"_a, "row_order"_a, "M"_a, "K"_a, "R"_a, "n"_a, "dtype"_a, "tile"_a = 0,
        "split_k"_a = 0, "slices"_a = 0, "device"_a = 0, "stream"_a = 0, py::call_guard<py::gil_scoped_release>());
  m.def("multi_lora_expand", &fastpeft::multi_lora_expand,
        "Multi-adapter LoRA expand: Y[i, n] += scalings[a] * sum_{r < rank} U[i, r] * B[a, n, r] in place\n"
        "(fp32 accumulation, Y rounded once), rows without adapter untouched; a, rank, row_order as in\n"
        "multi_lora_shrink; scalings float32 [n]. Element (a, n, r) of the stack is at\n"
        "b + a*s_ba + n*s_bn + r*s_br; U (fp32) and B entries with r >= rank are never read.\n"
        "tile: 0 chooses, 1 64-row tiles, 2 16-row (decode) tiles; slices: 0 chooses.",
        "y"_a, "s_ym"_a, "s_yn"_a, "u"_a, "s_um"_a, "s_ur"_a, "b"_a, "s_ba"_a, "s_bn"_a, "s_br"_a, "ranks"_a,
        "scalings"_a, "indices"_a, "index_bits"_a, "row_order"_a, "M"_a, "N"_a, "R"_a, "n"_a, "dtype"_a,
        "tile"_a = 0, "slices"_a = 0, "device"_a = 0, "stream"_a = 0, py::call_guard<py::gil_scoped_release>());
  m.def("int8_quant_rows", &fastpeft::int8_quant_rows,
        "LLM.int8() row quantization of X [M, K] (element (m, k) at x + m*s_xm + k*s_xk):\n"
        "row_scale[m] = max |X[m, k]| over the entries with |X| < threshold (all when threshold is 0),\n"
        "q[m, k] (int8, at q + m*s_qm + k) = round-half-even(X[m, k] * 127 / row_scale[m]) clamped to\n"
        "[-127, 127], 0 for outlier entries, NaN and scale 0; col_flags[k] (int32 [K], zeroed by the\n"
        "caller; 0: not given) is set to 1 where some |X[m, k]| >= threshold > 0. Outlier columns are\n"
        "not zeroed in q (int8_gemm masks them).",
        "x"_a, "s_xm"_a, "s_xk"_a, "q"_a, "s_qm"_a, "row_scale"_a, "M"_a, "K"_a, "dtype"_a, "threshold"_a = 0.0f,
        "col_flags"_a = 0, "device"_a = 0, "stream"_a = 0, py::call_guard<py::gil_scoped_release>());
  m.def("int8_gemm", &fastpeft::int8_gemm,
        "Y[m, n] (at y + m*s_ym + n) = (sum_k q'[m, k] W[n, k]) * row_scale[m] * w_scale[n] / 127^2\n"
        "  + sum_{c in cols[:count]} X[m, c] W[n, c] * w_scale[n] / 127 + bias[n]  (overwritten).\n"
        "q [M, K] and W [N, K] are int8 with unit column stride; q' is q with the columns where\n"
        "col_flags != 0 zeroed (col_flags 0: none). cols (int32, n_cols entries) and count (int32 [1],\n"
        "read on the device, clamped to [0, min(n_cols, K)]) list the outlier columns of X (element\n"
        "(m, k) at x + m*s_xm + k*s_xk, dtype of Y); bias 0: none. int32 accumulation on int8 tensor\n"
        "cores, fp32 epilogue. tile: 0 chooses, 1 128x128, 2 64x64, 3 16x32 (K split over warps).",
        "q"_a, "s_qm"_a, "row_scale"_a, "w"_a, "s_wn"_a, "w_scale"_a, "y"_a, "s_ym"_a, "M"_a, "N"_a, "K"_a,
        "dtype"_a, "bias"_a = 0, "x"_a = 0, "s_xm"_a = 0, "s_xk"_a = 0, "col_flags"_a = 0, "cols"_a = 0,
        "n_cols"_a = 0, "count"_a = 0, "tile"_a = 0, "device"_a = 0, "stream"_a = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("quant_quantize", &fastpeft::quant_quantize,
        "Absmax / zero-point quantization of contiguous x (numel = outer*C*inner, last dim `last`), as\n"
        "fastpeft/reference/quant.py: mode 0 one slot, 1 slot (e / inner) % C (per channel), 2 slot e / group_size\n"
        "(groups along the last dim). scheme 0 absmax (int8 codes), 1 zeropoint (uint8). bits 8: q holds numel\n"
        "bytes; bits 4: [numel / last, ceil(last / 2)] bytes, element 2j in the low nibble. scale (float32) and\n"
        "zero_point (int32) hold one entry per slot (also the reduction's workspace; no host sync).",
        "x"_a, "q"_a, "scale"_a, "zero_point"_a, "outer"_a, "C"_a, "inner"_a, "last"_a, "mode"_a, "group_size"_a,
        "bits"_a, "scheme"_a, "dtype"_a, "device"_a = 0, "stream"_a = 0, py::call_guard<py::gil_scoped_release>());
  m.def("quant_dequantize", &fastpeft::quant_dequantize,
        "y (dtype, contiguous) = (code - zero_point[slot]) * scale[slot] in fp32 from quant_quantize's q, with\n"
        "the same geometry arguments (scheme 0: signed codes / nibbles, 1: unsigned).",
        "q"_a, "scale"_a, "zero_point"_a, "y"_a, "outer"_a, "C"_a, "inner"_a, "last"_a, "mode"_a, "group_size"_a,
        "bits"_a, "scheme"_a, "dtype"_a, "device"_a = 0, "stream"_a = 0, py::call_guard<py::gil_scoped_release>());
  m.def("bottleneck_adapter_forward", &fastpeft::bottleneck_adapter_forward,
        "Fused bottleneck adapter (Houlsby): y = x + scaling * (act(x W_d^T + b_d) W_u^T + b_u), y overwritten.\n"
        "X [M, D] (element (m, k) at x + m*s_xm + k) and Y [M, D] (at y + m*s_ym + n) have unit column\n"
        "stride; W_d [R, D] (wd) and W_u [D, R] (wu) are contiguous; b_d [R] (bd) and b_u [D] (bu), 0: none.\n"
        "All of dtype. h accumulates in fp32; a = act(h) is rounded to dtype before the second GEMM, which\n"
        "accumulates in fp32; y = x + scaling * z in fp32, rounded once. activation: 0 relu, 1 gelu (erf),\n"
        "2 gelu_tanh, 3 silu. 1 <= R <= 256. n_split: blocks sharing the D columns of a row tile (each\n"
        "recomputes the bottleneck of its rows); 0 chooses from the SM count.",
        "x"_a, "s_xm"_a, "wd"_a, "bd"_a, "wu"_a, "bu"_a, "y"_a, "s_ym"_a, "M"_a, "D"_a, "R"_a, "dtype"_a,
        "activation"_a, "scaling"_a = 1.0f, "n_split"_a = 0, "device"_a = 0, "stream"_a = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("cuda_device_count", &fastpeft::cuda_device_count,
        "Number of CUDA devices this module's runtime sees (0 without a driver or GPU).");
  m.def("compiled_archs", &fastpeft::compiled_archs, "The sm_XX targets compiled into this module, as ints.");
}
