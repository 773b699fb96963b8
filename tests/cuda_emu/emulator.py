"""Build and drive the CPU emulator of the CUDA C++ kernels (csrc/). EMULATION, NOT A GPU.

g++ compiles the kernels of csrc/ (KERNELS) and csrc/common.cuh, unchanged, against the stand-in CUDA
headers in include/ into a small executable, the emulated "device" (device_main.cpp). The build
compiles a generated copy of each .cu (``#line`` keeps diagnostics pointing at csrc/) with two
mechanical rewrites: each ``kernel<<<cfg>>>(args)`` launch, which g++ cannot parse, becomes
``::emu::launch(::emu::Config(cfg), kernel, args)``, and each ``__shared__`` array is declared
under another name, its real name bound to heap memory of its exact size that the emulator
fills with NaN before every block (``emu::shared_memory`` in include/cuda_runtime.h).

``EmulatedExtension`` has ``fastpeft._C``'s kernel functions with the same keyword arguments (raw
pointers and element strides), read from csrc/fastpeft.h. For each call it copies exactly the bytes every operand spans
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
import functools
import hashlib
import operator
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
# the translation units of csrc/ with kernels (they include common.cuh)
KERNELS = ("lora.cu", "int8.cu", "quant.cu", "nf4.cu", "bottleneck.cu")

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
    inputs = [*kernel_sources, *sorted(csrc.glob("*.cuh")), *sorted(csrc.glob("*.h")), *sorted((HERE / "include").glob("*.h")),
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


class Field(NamedTuple):
    """One field of an entry point's parameter struct in csrc/fastpeft.h."""
    kind: str  # ptr, i64, i32, u32, flag, f32, stream
    name: str
    default: object  # REQUIRED: none


REQUIRED = object()


def _cpp_value(text: str):
    text = text.strip()
    if text == "required":
        return REQUIRED
    if text in ("true", "false"):
        return text == "true"
    return float(text.rstrip("f")) if "." in text else int(text.rstrip("uU"))


def entry_points(header: str | os.PathLike | None = None) -> dict[str, tuple[Field, ...]]:
    """The entry points of fastpeft._C and their fields, in order, read from csrc/fastpeft.h."""
    text = Path(header or CSRC / "fastpeft.h").read_text()
    macros = dict(re.findall(r"#define (FASTPEFT_\w+)\(F\)((?:.*\\\n)*.*)", text))
    entries = re.findall(r"E\((\w+), \w+, (FASTPEFT_\w+)\)", text)
    if not entries:
        raise RuntimeError(f"no entry points found in {header}")
    return {name: tuple(Field(k, n, _cpp_value(d)) for k, n, d in re.findall(r"F\((\w+), (\w+), ([^)]*)\)", macros[m]))
            for name, m in entries}


_INT_RANGES = {"ptr": (0, 2**64), "stream": (0, 2**64), "i64": (-2**63, 2**63), "i32": (-2**31, 2**31),
               "u32": (0, 2**32)}


def _convert(function: str, field: Field, v):
    """``v`` as the binding casts it to the field's kind; TypeError where the binding's cast fails."""
    try:
        if field.kind == "f32":
            if isinstance(v, (str, bytes)):
                raise TypeError
            return float(v)
        if field.kind == "flag":
            return bool(v)
        v = operator.index(v)
        lo, hi = _INT_RANGES[field.kind]
        if not lo <= v < hi:
            raise TypeError
        return v
    except TypeError:
        raise TypeError(f"{function}: keyword {field.name} takes a {field.kind} value, got {v!r}") from None


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
        self.ptr, self.output, self.overwritten = ptr, output, overwritten
        self.elem, self.poison = elem, poison
        shape = ((lead[0],) if lead else ()) + (rows, cols)
        strides = ((lead[1],) if lead else ()) + (s0, s1)
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


# The bytes each pointer field of an entry point spans, from the call's fields ``p`` (a dict):
# one _Operand per pointer field.
def _lora_shrink(p):
    e = _ELEMENT_BYTES.get(p["dtype"], 1)
    return dict(x=_Operand(p["x"], p["M"], p["K"], p["s_xm"], p["s_xk"], e),
                a=_Operand(p["a"], p["R"], p["K"], p["s_ar"], p["s_ak"], e),
                u=_Operand(p["u"], p["M"], p["R"], p["s_um"], p["s_ur"], 4, output=True, overwritten=True),
                seed=_Operand(p["seed"], 1, 1, 1, 1, 8))


def _lora_expand(p):
    e = _ELEMENT_BYTES.get(p["dtype"], 1)
    return dict(y=_Operand(p["y"], p["M"], p["N"], p["s_ym"], p["s_yn"], e, output=True),
                u=_Operand(p["u"], p["M"], p["R"], p["s_um"], p["s_ur"], 4),
                b=_Operand(p["b"], p["N"], p["R"], p["s_bn"], p["s_br"], e),
                seed=_Operand(p["seed"], 1, 1, 1, 1, 8))


def _multi_lora_rows(p):
    return dict(ranks=_Operand(p["ranks"], p["n"], 1, 1, 1, 4),
                indices=_Operand(p["indices"], p["M"], 1, 1, 1, 8 if p["index_bits"] == 64 else 4),
                row_order=_Operand(p["row_order"], p["M"], 1, 1, 1, 4))


def _multi_lora_shrink(p):
    e = _ELEMENT_BYTES.get(p["dtype"], 1)
    return dict(x=_Operand(p["x"], p["M"], p["K"], p["s_xm"], p["s_xk"], e),
                a=_Operand(p["a"], p["R"], p["K"], p["s_ar"], p["s_ak"], e, lead=(p["n"], p["s_aa"])),
                u=_Operand(p["u"], p["M"], p["R"], p["s_um"], p["s_ur"], 4, output=True, overwritten=True),
                **_multi_lora_rows(p))


def _multi_lora_expand(p):
    e = _ELEMENT_BYTES.get(p["dtype"], 1)
    return dict(y=_Operand(p["y"], p["M"], p["N"], p["s_ym"], p["s_yn"], e, output=True),
                u=_Operand(p["u"], p["M"], p["R"], p["s_um"], p["s_ur"], 4),
                b=_Operand(p["b"], p["N"], p["R"], p["s_bn"], p["s_br"], e, lead=(p["n"], p["s_ba"])),
                scalings=_Operand(p["scalings"], p["n"], 1, 1, 1, 4), **_multi_lora_rows(p))


def _int8_quant_rows(p):
    e = _ELEMENT_BYTES.get(p["dtype"], 1)
    return dict(x=_Operand(p["x"], p["M"], p["K"], p["s_xm"], p["s_xk"], e),
                q=_Operand(p["q"], p["M"], p["K"], p["s_qm"], 1, 1, output=True, overwritten=True, poison=-128),
                row_scale=_Operand(p["row_scale"], p["M"], 1, 1, 1, 4, output=True, overwritten=True),
                col_flags=_Operand(p["col_flags"], p["K"], 1, 1, 1, 4, output=True))  # zeroed by the caller


def _int8_gemm(p):
    e = _ELEMENT_BYTES.get(p["dtype"], 1)
    M, N, K = p["M"], p["N"], p["K"]
    return dict(q=_Operand(p["q"], M, K, p["s_qm"], 1, 1), row_scale=_Operand(p["row_scale"], M, 1, 1, 1, 4),
                w=_Operand(p["w"], N, K, p["s_wn"], 1, 1), w_scale=_Operand(p["w_scale"], N, 1, 1, 1, 4),
                y=_Operand(p["y"], M, N, p["s_ym"], 1, e, output=True, overwritten=True),
                bias=_Operand(p["bias"], N, 1, 1, 1, e), x=_Operand(p["x"], M, K, p["s_xm"], p["s_xk"], e),
                col_flags=_Operand(p["col_flags"], K, 1, 1, 1, 4), cols=_Operand(p["cols"], p["n_cols"], 1, 1, 1, 4),
                count=_Operand(p["count"], 1, 1, 1, 1, 4))


def _int8_dequant_matmul(p):
    e = _ELEMENT_BYTES.get(p["dtype"], 1)
    M, N, K = p["M"], p["N"], p["K"]
    return dict(dy=_Operand(p["dy"], M, N, p["s_dm"], p["s_dn"], e), w=_Operand(p["w"], N, K, p["s_wn"], p["s_wk"], 1),
                w_scale=_Operand(p["w_scale"], N, 1, 1, 1, 4),
                dx=_Operand(p["dx"], M, K, p["s_xm"], 1, e, output=True, overwritten=True))


def _quant_sizes(p):
    """(numel, code bytes, slots) of a quant_* call (0s for bad geometry: the device rejects it)."""
    outer, C, inner, last = (max(0, p[k]) for k in ("outer", "C", "inner", "last"))
    numel = outer * C * inner
    if last <= 0 or numel % last:
        return numel, 0, 0
    nbytes = numel if p["bits"] == 8 else numel // last * ((last + 1) // 2)
    if p["mode"] == 1:
        slots = C
    elif p["mode"] == 2:
        slots = numel // p["group_size"] if p["group_size"] >= 1 else 0
    else:
        slots = 1
    return numel, nbytes, slots


def _quant_quantize(p):
    numel, nbytes, slots = _quant_sizes(p)
    return dict(x=_Operand(p["x"], numel, 1, 1, 1, _ELEMENT_BYTES.get(p["dtype"], 1)),
                q=_Operand(p["q"], nbytes, 1, 1, 1, 1, output=True, overwritten=True, poison=-128),
                scale=_Operand(p["scale"], slots, 1, 1, 1, 4, output=True, overwritten=True),
                zero_point=_Operand(p["zero_point"], slots, 1, 1, 1, 4, output=True, overwritten=True))


def _quant_dequantize(p):
    numel, nbytes, slots = _quant_sizes(p)
    return dict(q=_Operand(p["q"], nbytes, 1, 1, 1, 1), scale=_Operand(p["scale"], slots, 1, 1, 1, 4),
                zero_point=_Operand(p["zero_point"], slots, 1, 1, 1, 4),
                y=_Operand(p["y"], numel, 1, 1, 1, _ELEMENT_BYTES.get(p["dtype"], 1), output=True, overwritten=True))


def _nf4_dequantize(p):
    n, bs = max(0, p["n"]), p["block_size"]
    blocks = -(-n // bs) if bs > 0 else 0
    double = p["nested"] != 0
    return dict(data=_Operand(p["data"], (n + 1) // 2, 1, 1, 1, 1),
                absmax=_Operand(p["absmax"], blocks, 1, 1, 1, 1 if double else 4),
                nested=_Operand(p["nested"], -(-blocks // 256), 1, 1, 1, 4), offset=_Operand(p["offset"], 1, 1, 1, 1, 4),
                code=_Operand(p["code"], 16, 1, 1, 1, 4), dyn=_Operand(p["dyn"], 256, 1, 1, 1, 4),
                y=_Operand(p["y"], n, 1, 1, 1, _ELEMENT_BYTES.get(p["dtype"], 1), output=True, overwritten=True))


def _nf4_quantize(p):
    n, bs = max(0, p["n"]), p["block_size"]
    blocks = -(-n // bs) if bs > 0 else 0
    return dict(x=_Operand(p["x"], n, 1, 1, 1, _ELEMENT_BYTES.get(p["dtype"], 1)), mids=_Operand(p["mids"], 15, 1, 1, 1, 4),
                q=_Operand(p["q"], (n + 1) // 2, 1, 1, 1, 1, output=True, overwritten=True),
                absmax=_Operand(p["absmax"], blocks, 1, 1, 1, 4, output=True, overwritten=True))


def _nf4_double_quant(p):
    n = max(0, p["n"])
    return dict(absmax=_Operand(p["absmax"], n, 1, 1, 1, 4), offset=_Operand(p["offset"], 1, 1, 1, 1, 4),
                mids=_Operand(p["mids"], 256, 1, 1, 1, 4),
                q8=_Operand(p["q8"], n, 1, 1, 1, 1, output=True, overwritten=True),
                nested=_Operand(p["nested"], -(-n // 256), 1, 1, 1, 4, output=True, overwritten=True))


def _bottleneck_adapter_forward(p):
    e = _ELEMENT_BYTES.get(p["dtype"], 1)
    M, D, R = p["M"], p["D"], p["R"]
    return dict(x=_Operand(p["x"], M, D, p["s_xm"], 1, e), wd=_Operand(p["wd"], R, D, D, 1, e),
                bd=_Operand(p["bd"], R, 1, 1, 1, e), wu=_Operand(p["wu"], D, R, R, 1, e),
                bu=_Operand(p["bu"], D, 1, 1, 1, e),
                y=_Operand(p["y"], M, D, p["s_ym"], 1, e, output=True, overwritten=True))


OPERANDS = {"lora_shrink": _lora_shrink, "lora_expand": _lora_expand, "multi_lora_shrink": _multi_lora_shrink,
            "multi_lora_expand": _multi_lora_expand, "int8_quant_rows": _int8_quant_rows, "int8_gemm": _int8_gemm,
            "int8_dequant_matmul": _int8_dequant_matmul,
            "quant_quantize": _quant_quantize, "quant_dequantize": _quant_dequantize,
            "nf4_dequantize": _nf4_dequantize, "nf4_quantize": _nf4_quantize,
            "nf4_double_quant": _nf4_double_quant, "bottleneck_adapter_forward": _bottleneck_adapter_forward}


class EmulatedExtension:
    """Stands in for ``fastpeft._C``: the same kernel functions (keyword arguments, as csrc/fastpeft.h
    declares them), run by the emulated device."""

    def __init__(self, exe: str | os.PathLike, timeout: float = 300.0, fault: str | None = None):
        """``fault`` injects one (see FASTPEFT_CUDA_EMU_FAULT in include/ and device_main.cpp)."""
        self.exe, self.timeout = str(exe), timeout
        self.env = {**_SANITIZER_ENV, **os.environ}
        self.env.pop("FASTPEFT_CUDA_EMU_FAULT", None)
        if fault:
            self.env["FASTPEFT_CUDA_EMU_FAULT"] = fault
        self.calls: collections.Counter[str] = collections.Counter()  # device calls made, by function
        self.entry_points = entry_points()
        if set(self.entry_points) != set(OPERANDS):
            raise RuntimeError(f"csrc/fastpeft.h declares {sorted(self.entry_points)}; the emulator knows the "
                               f"operands of {sorted(OPERANDS)}")

    def __getattr__(self, name: str):
        if name in OPERANDS:
            return functools.partial(self._call, name)
        raise AttributeError(name)

    def _call(self, function: str, /, **kwargs) -> None:
        """One call, as the binding takes it: every field by keyword (an unknown keyword or a missing
        required one: ValueError; a value of the wrong kind: TypeError)."""
        fields = self.entry_points[function]
        unknown = set(kwargs) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"{function}: unknown keyword argument(s) {sorted(unknown)}; it takes: "
                             + " ".join(f.name for f in fields))
        p = {}
        for f in fields:
            if f.name in kwargs:
                p[f.name] = _convert(function, f, kwargs[f.name])
            elif f.default is REQUIRED:
                raise ValueError(f"{function}: missing required keyword argument {f.name}")
            else:
                p[f.name] = f.default
        operands = OPERANDS[function](p)
        pointers = [f.name for f in fields if f.kind == "ptr"]
        if set(operands) != set(pointers):
            raise RuntimeError(f"{function}: the emulator describes operands {sorted(operands)}, csrc/fastpeft.h "
                               f"declares pointers {sorted(pointers)}")
        ops = [operands[name] for name in pointers]

        def token(f: Field) -> str:
            if f.kind == "ptr":
                return str(pointers.index(f.name) if p[f.name] else -1)
            return float(p[f.name]).hex() if f.kind == "f32" else str(int(p[f.name]))

        header = " ".join([function, str(len(ops))] + [op.header() for op in ops] + [token(f) for f in fields])
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
