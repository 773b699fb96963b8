"""Build and drive the CPU emulator of the CUDA C++ kernels (csrc/). EMULATION, NOT A GPU.

g++ compiles the kernels of csrc/ (KERNELS) and csrc/common.cuh, unchanged, against the stand-in CUDA
headers in include/ into a small executable, the emulated "device" (device_main.cpp). The build
compiles a generated copy of each .cu (``#line`` keeps diagnostics pointing at csrc/) with two
mechanical rewrites: each ``kernel<<<cfg>>>(args)`` launch, which g++ cannot parse, becomes
``::emu::launch(::emu::Config(cfg), kernel, args)``, and each ``__shared__`` array is declared
under another name, its real name bound to heap memory of its exact size that the emulator
fills with NaN before every block (``emu::shared_memory`` in include/cuda_runtime.h).

``EmulatedExtension`` has ``fastpeft._C``'s kernel functions with the same arguments (raw
pointers and element strides). For each call it copies exactly the bytes every operand spans
out of the host tensors' memory, runs the call in a fresh device process, and copies the output
operands back (outputs the kernel must overwrite start poisoned: NaN, or -128 for int8 codes).
With it patched in for ``fastpeft._C``, the checks of tests/_cuda_checks.py run on CPU tensors.
Variants:

  asan   -O1, AddressSanitizer + UBSan: each operand and each __shared__ array is its own
         exact-size allocation, so any access outside it is reported; so are misaligned 16-byte
         vector accesses (uint4 is 16-byte aligned, as in CUDA) and other undefined behaviour.
  tsan   -O1, ThreadSanitizer: a missing __syncthreads shows up as a data race between threads.

The build is cached under $FASTPEFT_CUDA_EMU_CACHE (default: <tmp>/fastpeft-cuda-emu), keyed
by the sources, flags and compiler version.
"""
from __future__ import annotations

import collections
import ctypes
import hashlib
import operator
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
# the translation units of csrc/ with kernels (they include common.cuh)
KERNELS = ("lora.cu", "int8.cu", "quant.cu", "bottleneck.cu")

_COMMON = ["-std=c++20", "-pthread", "-fno-strict-aliasing", f"-I{HERE / 'include'}"]
VARIANTS = {
    "asan": ["-O1", "-g1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-g1", "-fsanitize=thread"],
}
_SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0",
}
# kernel<<<config>>>(  ->  ::emu::launch(::emu::Config(config), kernel,
_LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((\s*\))?", re.S)
# __shared__ ... name[size];  ->  __shared__ ... emu_prototype_name[size]; auto& name = shared_memory(...);
_SHARED = re.compile(r"(__shared__\b[^;]*?\b)(\w+)(\s*(?:\[[^;]*\])?\s*;)")


class EmulatorFault(AssertionError):
    """The emulated kernel faulted: a sanitizer report, a barrier divergence, a crash or a hang."""


def compiler() -> str | None:
    return shutil.which("g++")


def emulation_source(source: str, path: Path) -> str:
    """The kernel source with its launches and __shared__ declarations rewritten for the emulator."""
    def launch(m: re.Match) -> str:
        return f"::emu::launch(::emu::Config({m.group(2)}), {m.group(1)}" + (")" if m.group(3) else ", ")

    def shared(m: re.Match) -> str:
        decl, name, rest = m.groups()
        proto = f"emu_prototype_{name}"
        return f"{decl}{proto}{rest} auto& {name} = ::emu::shared_memory({proto}, __alignof__({proto}));"

    out, launches = _LAUNCH.subn(launch, source)
    out, arrays = _SHARED.subn(shared, out)
    for what, n, total in (("kernel launches", launches, source.count("<<<")),
                           ("__shared__ declarations", arrays, source.count("__shared__"))):
        if n != total:
            raise RuntimeError(f"{path}: rewrote {n} of {total} {what}; extend the patterns in {Path(__file__).name}")
    return f'#line 1 "{path}"\n' + out


def build(variant: str = "asan", csrc: str | os.PathLike | None = None,
          cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile the device executable from ``csrc`` (default: the repository's csrc/; cached); returns its path.

    Raises CalledProcessError (with the compiler's stderr) when it does not compile.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("g++ not found")
    csrc = Path(csrc or CSRC).resolve()
    kernel_sources = [csrc / k for k in KERNELS]
    flags = [*_COMMON, f"-I{csrc}", *VARIANTS[variant]]
    inputs = [*kernel_sources, *sorted(csrc.glob("*.cuh")), *sorted((HERE / "include").glob("*.h")),
              HERE / "device_main.cpp", Path(__file__)]
    key = hashlib.sha256(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    key.update(" ".join(flags).encode())
    for p in inputs:
        key.update(p.name.encode() + p.read_bytes())
    cache = Path(cache_dir or os.environ.get("FASTPEFT_CUDA_EMU_CACHE") or
                 Path(tempfile.gettempdir()) / "fastpeft-cuda-emu")
    exe = cache / f"device-{variant}-{key.hexdigest()[:16]}"
    if exe.exists():
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        sources = []
        for src in kernel_sources:
            sources.append(Path(tmp) / f"{src.stem}_emu.cpp")
            sources[-1].write_text(emulation_source(src.read_text(), src))
        sources.append(HERE / "device_main.cpp")
        objects = [Path(tmp) / f"{src.stem}.o" for src in sources]
        jobs = [subprocess.Popen([cxx, *flags, "-c", str(src), "-o", str(obj)], stderr=subprocess.PIPE, text=True)
                for src, obj in zip(sources, objects)]  # in parallel
        for job in jobs:
            _, err = job.communicate()
            if job.returncode:
                raise subprocess.CalledProcessError(job.returncode, job.args, stderr=err)
        subprocess.run([cxx, *flags, *map(str, objects), "-o", str(Path(tmp) / "device")], check=True,
                       capture_output=True, text=True)
        os.replace(Path(tmp) / "device", exe)  # atomic: concurrent builds race harmlessly
    return exe


def _index(name: str, v) -> int:
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None


def _u32(name: str, v) -> int:
    v = _index(name, v)
    if not 0 <= v < 2**32:
        raise TypeError(f"{name}: {v} does not fit in uint32")
    return v


_ELEMENT_BYTES = {0: 4, 1: 2, 2: 2}  # by dtype code
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32}


class _Operand:
    """The bytes a [rows, cols] operand at address ``ptr`` with element strides spans in host memory.

    ``output``: copied back after the call; ``overwritten``: its elements start as ``poison`` on
    the device (an integer of the element's size: -1, all bits set, is a NaN in every float type;
    -128 is no int8 code the kernels write).
    """

    def __init__(self, ptr, rows, cols, s0, s1, elem: int, output: bool = False, overwritten: bool = False,
                 poison: int = -1, lead: tuple | None = None):
        """``lead``: (count, stride) of a leading dim (a stack of [rows, cols] operands)."""
        self.ptr, self.output, self.overwritten = _index("pointer", ptr), output, overwritten
        self.elem, self.poison = elem, poison
        shape = [_index("size", v) for v in ((lead[0],) if lead else ()) + (rows, cols)]
        strides = [_index("size", v) for v in ((lead[1],) if lead else ()) + (s0, s1)]
        self.start, self.size, self.offset = self.ptr, 0, 0
        if min(shape) > 0 and self.ptr != 0:
            ends = [(n - 1) * st for n, st in zip(shape, strides)]
            lo, hi = sum(min(0, e) for e in ends), sum(max(0, e) for e in ends)
            self.start, self.size, self.offset = self.ptr + lo * elem, (hi - lo + 1) * elem, -lo * elem
            self.view = (tuple(shape), tuple(strides), -lo)

    def header(self) -> str:
        return f"{self.size} {self.start % 64} {self.offset} {int(self.output)}"

    def payload(self) -> bytes:
        data = bytearray(ctypes.string_at(self.start, self.size) if self.size else b"")
        if self.overwritten and self.size:
            torch.frombuffer(data, dtype=_INT_OF_SIZE[self.elem]).as_strided(*self.view).fill_(self.poison)
        return bytes(data)


class EmulatedExtension:
    """Stands in for ``fastpeft._C``: the same kernel functions, run by the emulated device."""

    def __init__(self, exe: str | os.PathLike, timeout: float = 300.0, fault: str | None = None):
        """``fault`` injects one (see FASTPEFT_CUDA_EMU_FAULT in include/ and device_main.cpp)."""
        self.exe, self.timeout = str(exe), timeout
        self.env = {**_SANITIZER_ENV, **os.environ}
        self.env.pop("FASTPEFT_CUDA_EMU_FAULT", None)
        if fault:
            self.env["FASTPEFT_CUDA_EMU_FAULT"] = fault
        self.calls: collections.Counter[str] = collections.Counter()  # device calls made, by function

    def lora_shrink(self, x, s_xm, s_xk, a, s_ar, s_ak, u, s_um, s_ur, M, K, R, dtype, out_scale=1.0,
                    dropout=False, seed=0, thr31=0, split_k=0, device=0, stream=0):
        e = _ELEMENT_BYTES.get(dtype, 1)
        ops = [_Operand(x, M, K, s_xm, s_xk, e), _Operand(a, R, K, s_ar, s_ak, e),
               _Operand(u, M, R, s_um, s_ur, 4, output=True, overwritten=True), _Operand(seed, 1, 1, 1, 1, 8)]
        args = [ops[0], s_xm, s_xk, ops[1], s_ar, s_ak, ops[2], s_um, s_ur, M, K, R, dtype, float(out_scale),
                bool(dropout), ops[3], _u32("thr31", thr31), split_k, device, stream]
        self._call("lora_shrink", ops, args)

    def lora_expand(self, y, s_ym, s_yn, u, s_um, s_ur, b, s_bn, s_br, M, N, R, dtype, scaling=1.0,
                    dropout=False, seed=0, thr31=0, drop_scale=1.0, device=0, stream=0):
        e = _ELEMENT_BYTES.get(dtype, 1)
        ops = [_Operand(y, M, N, s_ym, s_yn, e, output=True), _Operand(u, M, R, s_um, s_ur, 4),
               _Operand(b, N, R, s_bn, s_br, e), _Operand(seed, 1, 1, 1, 1, 8)]
        args = [ops[0], s_ym, s_yn, ops[1], s_um, s_ur, ops[2], s_bn, s_br, M, N, R, dtype, float(scaling),
                bool(dropout), ops[3], _u32("thr31", thr31), float(drop_scale), device, stream]
        self._call("lora_expand", ops, args)

    def multi_lora_shrink(self, x, s_xm, s_xk, a, s_aa, s_ar, s_ak, u, s_um, s_ur, ranks, indices, index_bits,
                          row_order, M, K, R, n, dtype, tile=0, split_k=0, slices=0, device=0, stream=0):
        e = _ELEMENT_BYTES.get(dtype, 1)
        ops = [_Operand(x, M, K, s_xm, s_xk, e), _Operand(a, R, K, s_ar, s_ak, e, lead=(n, s_aa)),
               _Operand(u, M, R, s_um, s_ur, 4, output=True, overwritten=True), _Operand(ranks, n, 1, 1, 1, 4),
               _Operand(indices, M, 1, 1, 1, 8 if index_bits == 64 else 4), _Operand(row_order, M, 1, 1, 1, 4)]
        args = [ops[0], s_xm, s_xk, ops[1], s_aa, s_ar, s_ak, ops[2], s_um, s_ur, ops[3], ops[4], index_bits, ops[5],
                M, K, R, n, dtype, tile, split_k, slices, device, stream]
        self._call("multi_lora_shrink", ops, args)

    def multi_lora_expand(self, y, s_ym, s_yn, u, s_um, s_ur, b, s_ba, s_bn, s_br, ranks, scalings, indices,
                          index_bits, row_order, M, N, R, n, dtype, tile=0, slices=0, device=0, stream=0):
        e = _ELEMENT_BYTES.get(dtype, 1)
        ops = [_Operand(y, M, N, s_ym, s_yn, e, output=True), _Operand(u, M, R, s_um, s_ur, 4),
               _Operand(b, N, R, s_bn, s_br, e, lead=(n, s_ba)), _Operand(ranks, n, 1, 1, 1, 4),
               _Operand(scalings, n, 1, 1, 1, 4), _Operand(indices, M, 1, 1, 1, 8 if index_bits == 64 else 4),
               _Operand(row_order, M, 1, 1, 1, 4)]
        args = [ops[0], s_ym, s_yn, ops[1], s_um, s_ur, ops[2], s_ba, s_bn, s_br, ops[3], ops[4], ops[5], index_bits,
                ops[6], M, N, R, n, dtype, tile, slices, device, stream]
        self._call("multi_lora_expand", ops, args)

    def int8_quant_rows(self, x, s_xm, s_xk, q, s_qm, row_scale, M, K, dtype, threshold=0.0, col_flags=0, device=0,
                        stream=0):
        e = _ELEMENT_BYTES.get(dtype, 1)
        ops = [_Operand(x, M, K, s_xm, s_xk, e),
               _Operand(q, M, K, s_qm, 1, 1, output=True, overwritten=True, poison=-128),
               _Operand(row_scale, M, 1, 1, 1, 4, output=True, overwritten=True),
               _Operand(col_flags, K, 1, 1, 1, 4, output=True)]  # zeroed by the caller, only set
        args = [ops[0], s_xm, s_xk, ops[1], s_qm, ops[2], M, K, dtype, float(threshold), ops[3], device, stream]
        self._call("int8_quant_rows", ops, args)

    def int8_gemm(self, q, s_qm, row_scale, w, s_wn, w_scale, y, s_ym, M, N, K, dtype, bias=0, x=0, s_xm=0, s_xk=0,
                  col_flags=0, cols=0, n_cols=0, count=0, tile=0, device=0, stream=0):
        e = _ELEMENT_BYTES.get(dtype, 1)
        ops = [_Operand(q, M, K, s_qm, 1, 1), _Operand(row_scale, M, 1, 1, 1, 4), _Operand(w, N, K, s_wn, 1, 1),
               _Operand(w_scale, N, 1, 1, 1, 4), _Operand(y, M, N, s_ym, 1, e, output=True, overwritten=True),
               _Operand(bias, N, 1, 1, 1, e), _Operand(x, M, K, s_xm, s_xk, e), _Operand(col_flags, K, 1, 1, 1, 4),
               _Operand(cols, n_cols, 1, 1, 1, 4), _Operand(count, 1, 1, 1, 1, 4)]
        args = [ops[0], s_qm, ops[1], ops[2], s_wn, ops[3], ops[4], s_ym, M, N, K, dtype, ops[5], ops[6], s_xm, s_xk,
                ops[7], ops[8], n_cols, ops[9], tile, device, stream]
        self._call("int8_gemm", ops, args)

    @staticmethod
    def _quant_sizes(outer, C, inner, last, mode, group_size, bits):
        """(numel, code bytes, slots) of a quant_* call (0s for bad geometry: the device rejects it)."""
        outer, C, inner, last = (max(0, _index("size", v)) for v in (outer, C, inner, last))
        numel = outer * C * inner
        if last <= 0 or numel % last:
            return numel, 0, 0
        nbytes = numel if bits == 8 else numel // last * ((last + 1) // 2)
        if mode == 1:
            slots = C
        elif mode == 2:
            slots = numel // group_size if group_size >= 1 else 0
        else:
            slots = 1
        return numel, nbytes, slots

    def quant_quantize(self, x, q, scale, zero_point, outer, C, inner, last, mode, group_size, bits, scheme, dtype,
                       device=0, stream=0):
        numel, nbytes, slots = self._quant_sizes(outer, C, inner, last, mode, group_size, bits)
        ops = [_Operand(x, numel, 1, 1, 1, _ELEMENT_BYTES.get(dtype, 1)),
               _Operand(q, nbytes, 1, 1, 1, 1, output=True, overwritten=True, poison=-128),
               _Operand(scale, slots, 1, 1, 1, 4, output=True, overwritten=True),
               _Operand(zero_point, slots, 1, 1, 1, 4, output=True, overwritten=True)]
        args = [*ops, outer, C, inner, last, mode, group_size, bits, scheme, dtype, device, stream]
        self._call("quant_quantize", ops, args)

    def quant_dequantize(self, q, scale, zero_point, y, outer, C, inner, last, mode, group_size, bits, scheme, dtype,
                         device=0, stream=0):
        numel, nbytes, slots = self._quant_sizes(outer, C, inner, last, mode, group_size, bits)
        ops = [_Operand(q, nbytes, 1, 1, 1, 1), _Operand(scale, slots, 1, 1, 1, 4),
               _Operand(zero_point, slots, 1, 1, 1, 4),
               _Operand(y, numel, 1, 1, 1, _ELEMENT_BYTES.get(dtype, 1), output=True, overwritten=True)]
        args = [*ops, outer, C, inner, last, mode, group_size, bits, scheme, dtype, device, stream]
        self._call("quant_dequantize", ops, args)

    def bottleneck_adapter_forward(self, x, s_xm, wd, bd, wu, bu, y, s_ym, M, D, R, dtype, activation, scaling=1.0, n_split=0,
                        device=0, stream=0):
        e = _ELEMENT_BYTES.get(dtype, 1)
        ops = [_Operand(x, M, D, s_xm, 1, e), _Operand(wd, R, D, D, 1, e), _Operand(bd, R, 1, 1, 1, e),
               _Operand(wu, D, R, R, 1, e), _Operand(bu, D, 1, 1, 1, e),
               _Operand(y, M, D, s_ym, 1, e, output=True, overwritten=True)]
        args = [ops[0], s_xm, ops[1], ops[2], ops[3], ops[4], ops[5], s_ym, M, D, R, dtype, activation,
                float(scaling), n_split, device, stream]
        self._call("bottleneck_adapter_forward", ops, args)

    def _call(self, function: str, ops: list[_Operand], args: list) -> None:
        def token(v) -> str:
            if isinstance(v, _Operand):
                return str(ops.index(v) if v.ptr else -1)
            if isinstance(v, bool):
                return str(int(v))
            return v.hex() if isinstance(v, float) else str(_index(function, v))

        header = " ".join([function, str(len(ops))] + [op.header() for op in ops] + [token(v) for v in args])
        request = header.encode() + b"\n" + b"".join(op.payload() for op in ops)
        self.calls[function] += 1
        try:
            res = subprocess.run([self.exe], input=request, capture_output=True, timeout=self.timeout, env=self.env)
        except subprocess.TimeoutExpired:
            raise EmulatorFault(f"{function}: no answer in {self.timeout:.0f} s (a thread stuck?)") from None
        err = res.stderr.decode(errors="replace").strip()
        if res.returncode == 3:
            raise ValueError(err)
        if res.returncode == 4:
            raise RuntimeError(err)
        if res.returncode != 0:
            raise EmulatorFault(f"{function} failed in the emulator (exit status {res.returncode}):\n{err[:5000]}")
        outs = [op for op in ops if op.output]
        if len(res.stdout) != sum(op.size for op in outs):
            raise EmulatorFault(f"{function}: got {len(res.stdout)} output bytes, expected "
                                f"{sum(op.size for op in outs)}\n{err}")
        pos = 0
        for op in outs:
            if op.size:
                ctypes.memmove(op.start, res.stdout[pos:pos + op.size], op.size)
            pos += op.size
