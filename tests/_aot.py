"""Compile the Triton kernels for a GPU on a machine without one.

The launchers in fastpeft.kernels are run on CPU tensors with their kernels swapped
for recorders, so the exact arguments, flags and configs that a GPU launch would
use are captured; each captured launch is then compiled ahead of time for a chosen
target (sm_90 for the H200) with the same specialization the JIT would apply
(ints equal to 1 become constants, multiples of 16 get a divisibility hint).

``python tests/_aot.py`` prints registers, spills and shared memory per launch (``--tuned``:
the autotune configs only, ``--fixed``: the FASTPEFT_AUTOTUNE=0 configs only; AOT_FAMILIES=int8,
=lora, =quant, =qlinear, =fakequant, =bottleneck, =multi_lora, =distill or =nf4 restricts it to one op family);
``--warm`` (on a GPU machine) compiles the benchmark's launches in parallel into triton's
cache before ``make gpu-check`` times them.

``--table`` writes benchmarks/resources.md (every launch, sm_90 and sm_80: registers, spills,
shared memory, blocks per SM, the sm_90 wgmma wait depth; tests/test_resources.py checks it);
``--hash`` prints the inputs hash its header must hold. ``--pack`` compiles the --warm launches
for sm_90 under the GPU JIT's cache keys into build/aot-pack (carry it to the GPU machine);
``--install-pack [DIR]`` (make gpu-check, on the GPU machine) puts them into triton's cache there
(benchmarks/NOTES.md: why a re-key is needed and safe). AOT_JOBS=N compile processes (2).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use


@dataclasses.dataclass
class Launch:
    fn: object                    # the JITFunction
    args: dict                    # runtime args by name
    constexprs: dict              # constexpr args by name
    num_warps: int = 4
    num_stages: int = 3
    tuned: bool = False           # one of an autotuner's configs (may not fit: it is then skipped)
    options: dict = dataclasses.field(default_factory=dict)  # other compile options of the launch (LAUNCH_OPTIONS)

    def key(self) -> tuple:
        spec = tuple((k, _spec(v)) for k, v in self.args.items())
        return (self.fn.__name__, spec, tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages,
                tuple(sorted(self.options.items())))

    def label(self) -> str:
        c = self.constexprs
        blocks = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R") if k in c)
        flags = ",".join([k for k, v in c.items() if v is True] + [f"{k}={c[k]}" for k in ("ACT", "BS", "R") if k in c]
                         + (["ORDER"] if c.get("ORDER") else []))  # nf4's block size, blocks a program, fp4
        dt = next((str(v.dtype).replace("torch.", "") for v in self.args.values() if isinstance(v, torch.Tensor)), "")
        if any((isinstance(v, torch.Tensor) and v.data_ptr() % 16) or (type(v) is int and v != 1 and v % 16)
               for v in self.args.values()):
            flags += ",unaligned" if flags else "unaligned"  # an int or pointer without the 16 hint
        parts = (dt, blocks, f"w{self.num_warps}s{self.num_stages}", flags)
        return f"{self.fn.__name__}[" + " ".join(x for x in parts if x) + "]"

    def spec_id(self) -> str:
        """6 hex digits naming the specialization (dtypes, 16-byte alignment of pointers, ints
        equal to 1 or multiples of 16, constexprs, warps, stages): tells apart launches of one label."""
        import hashlib
        spec = [(k, _spec(v) + ((v.data_ptr() % 16 == 0,) if isinstance(v, torch.Tensor) else ()))
                for k, v in self.args.items()]
        text = repr((self.fn.__name__, spec, sorted(self.constexprs.items()), self.num_warps, self.num_stages)
                    + ((sorted(self.options.items()),) if self.options else ()))  # (ids without options unchanged)
        return hashlib.sha256(text.encode()).hexdigest()[:6]


def _spec(v):
    if isinstance(v, torch.Tensor):
        return ("ptr", v.dtype)
    if isinstance(v, bool):
        return ("i1",)
    if isinstance(v, int):
        return ("int", 1 if v == 1 else (16 if v % 16 == 0 else 0))
    return (type(v).__name__,)


# compile options a launcher may pass besides num_warps / num_stages (kernels/nf4.py turns off fp
# fusion): recorded with the launch and compiled with it (they change the code and the cache key)
LAUNCH_OPTIONS = ("enable_fp_fusion",)


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn, sink, configs=None, prune=None):
        self.fn, self.sink, self.configs, self.prune = fn, sink, configs, prune

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        names = self.fn.arg_names
        bound = dict(zip(names, args))
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        extra = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        configs = [None]
        if self.configs is not None:
            configs = self.prune(self.configs, bound, **kwargs) if self.prune else self.configs
        for cfg in configs:
            kw = dict(kwargs)
            o = dict(opts)
            if cfg is not None:
                kw.update(cfg.kwargs)
                o = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            runtime = {n: bound[n] for n in names if n in bound}
            consts = {n: kw[n] for n in names if n in kw}
            self.sink.append(Launch(self.fn, runtime, consts, tuned=cfg is not None, options=dict(extra), **o))


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A small tensor with ``t``'s dtype and the same 16-byte alignment (all the JIT reads of it)."""
    small = torch.empty(32, dtype=t.dtype)
    return small if t.data_ptr() % 16 == 0 else small[1:]


def capture(module, run) -> list[Launch]:
    """Run ``run()`` with ``module``'s kernels recorded instead of launched, as on a GPU."""
    import triton
    sink: list[Launch] = []
    saved = {}
    kernels = [n for n, v in vars(module).items() if isinstance(v, triton.runtime.jit.JITFunction)]
    from fastpeft import _backend
    if not kernels:
        raise RuntimeError("no JIT kernels found: run this without TRITON_INTERPRET=1")
    tuned = module._make_autotuned() if hasattr(module, "_make_autotuned") else None
    # modules with several autotuned kernels name each launcher getter and its factory
    more_tuned = {getter: factory() for getter, factory in getattr(module, "_AOT_AUTOTUNED", {}).items()}
    from fastpeft.kernels import _common
    saved_interp, saved_sm_count = _backend.interpreter_active, _common.sm_count
    _backend.interpreter_active = lambda: True  # lets fastpeft route CPU tensors to the triton backend
    # split-K/M factors are constexprs: use the GPU's SM count
    _common.sm_count = lambda device: int(os.environ.get("AOT_SM_COUNT", "132"))
    try:
        saved["_interpreted"] = module._interpreted
        module._interpreted = lambda: False
        for n in kernels:
            saved[n] = getattr(module, n)
            setattr(module, n, _Recorder(saved[n], sink))
        if tuned is not None:
            saved["_gemm_launcher"] = module._gemm_launcher
            module._gemm_launcher = lambda: _Recorder(tuned.fn, sink, configs=tuned.configs,
                                                      prune=tuned.early_config_prune)
        for getter, t in more_tuned.items():
            saved[getter] = getattr(module, getter)
            setattr(module, getter, lambda t=t: _Recorder(t.fn, sink, configs=t.configs,
                                                          prune=t.early_config_prune))
        run()
        for launch in sink:  # the specialization needs only dtypes and 16-byte alignment: free the big inputs
            launch.args = {k: _stand_in(v) if isinstance(v, torch.Tensor) else v for k, v in launch.args.items()}
    finally:
        _backend.interpreter_active = saved_interp
        _common.sm_count = saved_sm_count
        for n, v in saved.items():
            setattr(module, n, v)
    return sink


def jit_specialization(launch: Launch, arch: int = 90):
    """The (signature, constexprs, attrs, options) that triton's JIT derives for this launch on an
    sm_<arch> GPU: its own binder and argument packing (triton/runtime/jit.py, JITFunction.run)
    run on the captured arguments, so the compile below has the JIT's cache key exactly (ints
    equal to 1 become constants, multiples of 16 and 16-byte aligned pointers get a divisibility
    hint, the rest an empty attribute, as the JIT writes them)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature, knobs

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages, **launch.options)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    args = [launch.args[n] if n in launch.args else kwargs.pop(n) for n in fn.arg_names]
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}


def _plain_specialization(launch: Launch):
    """The JIT's specialization written out by hand: the same code as jit_specialization's (the
    same cubin), but attributes only where a hint applies, so another cache key. It keeps the
    table and check() on the cache entries their earlier runs left (about 2000 compiles are an
    hour on 2 busy cores)."""
    fn = launch.fn
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = launch.args[name]
        if isinstance(v, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1 and i not in fn.do_not_specialize and name not in fn.do_not_specialize:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and i not in fn.do_not_specialize and name not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {type(v).__name__}")
    return signature, constexprs, attrs, {"num_warps": launch.num_warps, "num_stages": launch.num_stages,
                                          **launch.options}


def compile_launch(launch: Launch, arch: int = 90, jit_key: bool = False):
    """Compile one captured launch for sm_<arch>; returns triton's CompiledKernel (read from
    triton's on-disk cache, TRITON_CACHE_DIR, when compiled before). ``jit_key``: under the cache
    key a GPU's JIT computes for the launch (jit_specialization), for packs carried to one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if jit_key:
        signature, constexprs, attrs, options = jit_specialization(launch, arch)
        options = options.__dict__
    else:
        signature, constexprs, attrs, options = _plain_specialization(launch)
    src = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(compiled) -> dict:
    """Registers, stack (spills) and local memory from cuobjdump, shared memory, and from the PTX
    the matrix instructions used and the ``wgmma.wait_group`` depths inside loops."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    out = {"shared": compiled.metadata.shared}
    for line in text.splitlines():
        if "REG:" in line:
            for field in line.split():
                if ":" in field:
                    k, v = field.split(":", 1)
                    if k in ("REG", "STACK", "LOCAL") and v.isdigit():
                        out[k.lower()] = int(v)
    out.update(ptx_mma(compiled.asm["ptx"]))
    return out


def ptx_mma(ptx: str) -> dict:
    """The matrix instruction of a kernel's PTX ("wgmma", "mma" or "" for none) and the
    ``wgmma.wait_group N`` values in its main loop (the loop holding the most wgmma.mma_async;
    a loop: the lines from a label to a later branch back to it, each line counted in its
    innermost loop) and in its other loops. N is how many wgmma groups may stay in flight: 0 in
    the main loop means each iteration waits for its own MMAs, so the MMAs of one iteration do
    not overlap the next iteration's."""
    import re
    lines = ptx.splitlines()
    labels, loops = {}, []
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__\w+):", line)
        if m:
            labels[m.group(1)] = i
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and m.group(1) in labels:  # a backward branch closes a loop
            loops.append((labels[m.group(1)], i))
    mmas = {loop: 0 for loop in loops}
    waits = {loop: set() for loop in loops}
    for i, line in enumerate(lines):
        inside = [loop for loop in loops if loop[0] <= i <= loop[1]]
        if not inside:
            continue
        loop = max(inside, key=lambda lp: lp[0])
        if "wgmma.mma_async" in line:
            mmas[loop] += 1
        m = re.search(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", line)
        if m:
            waits[loop].add(int(m.group(1)))
    main = max(loops, key=lambda lp: mmas[lp], default=None)
    main_waits = sorted(waits[main]) if main is not None and mmas[main] else []
    other = sorted(set().union(*(w for lp, w in waits.items() if lp != main)) if waits else set())
    kind = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else ""
    return {"mma": kind, "main_waits": main_waits, "other_waits": other}


# Per-SM limits for blocks per SM: registers, shared memory (bytes, 1 KB of it reserved per
# block by the driver), resident threads and blocks; the register file is 4 sub-partitions,
# allocated per warp in units of 256 registers (CUDA occupancy calculator, sm_80 and sm_90).
SM_LIMITS = {90: {"regs": 65536, "smem": 228 * 1024, "threads": 2048, "blocks": 32},
             80: {"regs": 65536, "smem": 164 * 1024, "threads": 2048, "blocks": 32}}
SMEM_RESERVED_PER_BLOCK = 1024


def blocks_per_sm(regs: int, num_warps: int, shared: int, arch: int) -> tuple[int, str]:
    """Resident blocks per SM and what limits them ("regs", "smem", "threads" or "blocks")."""
    lim = SM_LIMITS[arch]
    by = {"blocks": lim["blocks"], "threads": lim["threads"] // (32 * num_warps)}
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    if num_warps >= 4:  # each sub-partition holds num_warps / 4 warps of every block
        by["regs"] = (lim["regs"] // 4 // per_warp) // (num_warps // 4)
    else:
        by["regs"] = (lim["regs"] // per_warp) // num_warps
    if shared:
        by["smem"] = lim["smem"] // (shared + SMEM_RESERVED_PER_BLOCK)
    n = min(by.values())
    return n, next(k for k in ("smem", "regs", "threads", "blocks") if by.get(k) == n)


def lora_launches(dtypes=(torch.bfloat16,), shapes=((1, 512, 512), (2048, 512, 512), (300, 100, 72)),
                  ranks=(16, 64), dropout=(0.0, 0.1)) -> list[Launch]:
    """Every launch fastpeft.lora_linear (triton backend) makes, forward and backward."""
    import fastpeft
    from fastpeft.kernels import lora as klora

    def run():
        for dtype in dtypes:
            for (M, K, N) in shapes:
                for r in ranks:
                    for p in dropout:
                        x = torch.zeros(M, K, dtype=dtype, requires_grad=True)
                        w = torch.zeros(N, K, dtype=dtype)
                        b = torch.zeros(N, dtype=dtype)
                        A = torch.zeros(r, K, dtype=dtype, requires_grad=True)
                        B = torch.zeros(N, r, dtype=dtype, requires_grad=True)
                        y = fastpeft.lora_linear(x, w, b, A, B, 1.0, dropout_p=p, training=True, seed=3,
                                                 backend="triton")
                        y.backward(torch.zeros_like(y))
    launches = capture(klora, run)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def fixed_launches(dtypes, shapes=((1, 512, 512), (64, 512, 512), (2048, 512, 512))) -> list[Launch]:
    """The launches made with FASTPEFT_AUTOTUNE=0 (one fixed config per M range)."""
    saved = os.environ.get("FASTPEFT_AUTOTUNE")
    os.environ["FASTPEFT_AUTOTUNE"] = "0"
    try:
        return lora_launches(dtypes=dtypes, shapes=shapes)
    finally:
        if saved is None:
            del os.environ["FASTPEFT_AUTOTUNE"]
        else:
            os.environ["FASTPEFT_AUTOTUNE"] = saved


INT8_SHAPES = ((1, 4096, 4096), (2048, 4096, 4096))
INT8_FIXED_SHAPES = ((1, 11008, 512), (64, 512, 512), (2048, 512, 512))  # decode (chunked rows), mid, large
INT8_UNALIGNED_SHAPES = ((300, 100, 72),)  # rows not 16-byte aligned: other specializations (one dtype)


def int8_launches(dtypes=(torch.bfloat16,), shapes=INT8_SHAPES, thresholds=(0.0, 6.0)) -> list[Launch]:
    """Every launch fastpeft.kernels.int8's launchers make for the int8 linear layer: quantize x,
    compact the outlier columns, the int8 GEMM (with and without the outlier loop), and the
    backward dequant_matmul, for each (M, K, N)."""
    from fastpeft.kernels import int8 as kint8

    def run():
        for dtype in dtypes:
            for (M, K, N) in shapes:
                x = torch.zeros(M, K, dtype=dtype)
                w = torch.zeros(N, K, dtype=torch.int8)
                ws = torch.ones(N, dtype=torch.float32)
                b = torch.zeros(N, dtype=dtype)
                for t in thresholds:
                    q, s, flags = kint8.quant_rows(x, t)
                    if flags is None:
                        kint8.int8_gemm(q, s, w, ws, b, dtype)
                        # static activations: one per-tensor step (row-scale stride 0)
                        kint8.int8_gemm(q, torch.ones(1), w, ws, b, dtype, row_scale_mul=1.0)
                    else:
                        cols, count = kint8.outlier_columns(flags)
                        kint8.int8_gemm(q, s, w, ws, b, dtype, x=x, col_flags=flags, cols=cols, count=count)
                kint8.dequant_matmul(torch.zeros(M, N, dtype=dtype), w, ws)
    launches = capture(kint8, run)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def _with_fixed_configs(fn, *args, **kwargs):
    saved = os.environ.get("FASTPEFT_AUTOTUNE")
    os.environ["FASTPEFT_AUTOTUNE"] = "0"
    try:
        return fn(*args, **kwargs)
    finally:
        if saved is None:
            del os.environ["FASTPEFT_AUTOTUNE"]
        else:
            os.environ["FASTPEFT_AUTOTUNE"] = saved


def fixed_int8_launches(dtypes, shapes=INT8_FIXED_SHAPES) -> list[Launch]:
    """The int8 launches made with FASTPEFT_AUTOTUNE=0 (plus the unaligned shapes in one dtype)."""
    launches = _with_fixed_configs(int8_launches, dtypes=dtypes, shapes=shapes)
    if shapes == INT8_FIXED_SHAPES and dtypes:
        launches += _with_fixed_configs(int8_launches, dtypes=dtypes[:1], shapes=INT8_UNALIGNED_SHAPES)
    return launches


QUANT_SHAPES = ((4096, 4096), (300, 99), (8, 16, 72))  # aligned, unaligned/odd last dim, 3-D


def quant_launches(dtypes=(torch.bfloat16,), shapes=QUANT_SHAPES) -> list[Launch]:
    """Every launch fastpeft.kernels.quant's quantize and dequantize make: bits {8, 4} x schemes x
    (tensor, axis 0, last axis, middle axis of 3-D, groups 32/128 and an odd group)."""
    from fastpeft.kernels import quant as kquant

    def run():
        for dtype in dtypes:
            for shape in shapes:
                x = torch.zeros(shape, dtype=dtype)
                grans = [(None, None), (0, None), (len(shape) - 1, None)]
                grans += [(1, None)] if len(shape) == 3 else []
                grans += [(None, g) for g in (32, 128, 3) if shape[-1] % g == 0]
                for bits in (8, 4):
                    for scheme in ("absmax", "zeropoint"):
                        for axis, gs in grans:
                            d, s, z = kquant.quantize(x, bits, scheme, axis, gs)
                            kquant.dequantize(d, s, z, bits, scheme, axis, gs, shape, dtype)
                kquant.codes_with_scale(x, torch.ones(1))  # static activation codes
    launches = capture(kquant, run)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


# (M, K, N) per fixed-config M range: decode, mid, large
QLINEAR_SHAPES = ((1, 512, 512), (64, 512, 512), (2048, 512, 512))
# (bits, scheme, group_size; None = per output row): the G >= BLOCK_K, BLOCK_K > G and PER_ROW paths
QLINEAR_VARIANTS = ((4, "zeropoint", 128), (8, "absmax", None), (4, "absmax", 32), (8, "zeropoint", 64))
# decode (M = 1): the up and down projections of the benchmark's layer (split-K 1 and > 1)
QLINEAR_DECODE_SHAPES = ((1, 4096, 11008), (1, 11008, 4096))
QLINEAR_DECODE_VARIANTS = ((4, "zeropoint", 128), (8, "absmax", None), (8, "zeropoint", 128), (4, "absmax", None))


def qlinear_launches(dtypes=(torch.bfloat16,), shapes=QLINEAR_SHAPES, variants=QLINEAR_VARIANTS,
                     a8: bool = True, dx: bool = True, lora_ranks=()) -> list[Launch]:
    """Every launch fastpeft.kernels.qlinear's fused dequantize-GEMM makes (fixed configs: it
    does not autotune) for each dtype, (M, K, N) and (bits, scheme, group size); with ``a8``
    also the int8-activation kernel's (dynamic and static activation scales); with ``dx`` the
    backward's (``_qlinear_dx_kernel``, dy [M, N]). With ``lora_ranks`` only the launches that
    carry a LoRA update of each rank (fastpeft.ops.qlinear.quant_lora_linear: HAS_LORA; dx with and
    without the backward's dropout mask)."""
    from fastpeft.kernels import qlinear as kq

    def run():
        for dtype in dtypes:
            for (M, K, N) in shapes:
                x = torch.zeros(M, K, dtype=dtype)
                b = torch.zeros(N, dtype=dtype)
                for bits, scheme, g in variants:
                    packed = (K + 1) // 2 if bits == 4 else K
                    data = torch.zeros(N, packed, dtype=torch.int8 if bits == 8 and scheme == "absmax"
                                       else torch.uint8)
                    slots = (N,) if g is None else (N, K // g)
                    w = (data, torch.ones(slots), torch.zeros(slots, dtype=torch.int32), bits, scheme, g)
                    for r in lora_ranks:
                        kq.quant_linear(x, *w, b, lora=(torch.zeros(M, r), torch.zeros(N, r, dtype=dtype), 2.0))
                        for p, seed in ((0.0, None), (0.1, torch.ones(1, dtype=torch.int64))) if dx else ():
                            kq.quant_linear_dx(torch.zeros(M, N, dtype=dtype), *w, K,
                                               lora=(torch.zeros(M, r), torch.zeros(r, K, dtype=dtype), 2.0, p, seed))
                    if lora_ranks:
                        continue
                    kq.quant_linear(x, *w, b)
                    if dx:
                        kq.quant_linear_dx(torch.zeros(M, N, dtype=dtype), *w, K)
                    if a8 and dtype != torch.float32 and kq.supports_a8(g):  # int8 activations
                        xq = torch.zeros(M, K, dtype=torch.int8)
                        for xs, mul in ((torch.ones(M), 1 / 127), (torch.ones(1), 1.0)):  # dynamic, static
                            kq.quant_linear_a8(xq, xs, mul, data, torch.ones(slots),
                                               torch.zeros(slots, dtype=torch.int32), bits, scheme, g, b, dtype)
    launches = capture(kq, run)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def fixed_qlinear_launches(dtypes) -> list[Launch]:
    """bf16: every shape and variant; fp16 (the same code as bf16) the decode shape, one
    variant; fp32 (3xTF32, its own tiles) every shape, the grouped variants; each also the
    backward's dx kernel. Plus the decode
    path (_qlinear_gemv_kernel, split-K sum) at the benchmark's layer sizes in the 16-bit
    dtypes: its tiles depend on the group size and its split on N and K."""
    launches = qlinear_launches(dtypes=dtypes[:1])
    for dtype in dtypes[1:]:
        if dtype == torch.float32:
            launches += qlinear_launches(dtypes=(dtype,), variants=QLINEAR_VARIANTS[::2])
        else:
            launches += qlinear_launches(dtypes=(dtype,), shapes=QLINEAR_SHAPES[:1], variants=QLINEAR_VARIANTS[:1])
    half = tuple(d for d in dtypes if d != torch.float32)
    launches += qlinear_launches(dtypes=half, shapes=QLINEAR_DECODE_SHAPES, variants=QLINEAR_DECODE_VARIANTS,
                                 dx=False)
    launches += qlinear_launches(dtypes=half[:1], shapes=((2, 4096, 11008),), variants=QLINEAR_DECODE_VARIANTS[:2],
                                 dx=False)
    # rows of codes that are not whole int32 words (odd K / 2 or K): the byte-reading variant
    launches += qlinear_launches(dtypes=half[:1], shapes=((1, 4094, 4096),),
                                 variants=QLINEAR_DECODE_VARIANTS[1:4:2], dx=False)
    # LoRA on the base (HAS_LORA): the group and per-row variants (per-row scales go into the tile), the
    # rank tiles (16, 32; dx: 64 too), at the mid and large configs (bf16; fp32 one shape, rank tiles of 16)
    # and the decode GEMV (its update added by split 0)
    launches += qlinear_launches(dtypes=half[:1], shapes=QLINEAR_SHAPES[1:], variants=QLINEAR_VARIANTS[:2],
                                 a8=False, lora_ranks=(16, 32, 64))
    if torch.float32 in dtypes:
        launches += qlinear_launches(dtypes=(torch.float32,), shapes=QLINEAR_SHAPES[2:],
                                     variants=QLINEAR_VARIANTS[:2], a8=False, lora_ranks=(16,))
    launches += qlinear_launches(dtypes=half[:1], shapes=QLINEAR_DECODE_SHAPES[:1], variants=QLINEAR_DECODE_VARIANTS[:2],
                                 a8=False, dx=False, lora_ranks=(16, 32, 64))
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


FAKEQUANT_SHAPES = ((4096, 4096), (300, 99), (8, 16, 72))  # aligned, unaligned, 3-D


def fakequant_launches(dtypes=(torch.bfloat16,), shapes=FAKEQUANT_SHAPES) -> list[Launch]:
    """Every launch fastpeft.kernels.fakequant's forward and backward make: bits {8, 4} x schemes x
    (tensor, axis 0, last axis, middle axis of 3-D)."""
    from fastpeft.kernels import fakequant as kfq
    from fastpeft.reference.quant import qrange

    def run():
        for dtype in dtypes:
            for shape in shapes:
                x = torch.zeros(shape, dtype=dtype)
                axes = [None, 0, len(shape) - 1] + ([1] if len(shape) == 3 else [])
                for bits in (8, 4):
                    for scheme in ("absmax", "zeropoint"):
                        for axis in axes:
                            slots = 1 if axis is None else shape[axis]
                            s = torch.ones(slots)
                            z = torch.zeros(slots)
                            kfq.fake_quantize_fwd(x, s, s, z, qrange(bits, scheme), axis)
                            kfq.fake_quantize_bwd(x, x, s, s, z, qrange(bits, scheme), axis)
    launches = capture(kfq, run)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


BOTTLENECK_ACTS = ("relu", "gelu", "gelu_tanh", "silu")
# (M, d, bottleneck): the benchmark's layer first; the fixed configs' row tiles of 64, 32 and 16
# (chosen by M against the SM count) for each BLOCK_R range (<= 64, 128, 256); decode; unaligned
# rows (d % 16 != 0)
BOTTLENECK_SHAPES = ((8192, 4096, 64), (16384, 4096, 64), (1, 4096, 64), (300, 1000, 24), (300, 1000, 8),
                  (16384, 4096, 128), (8192, 4096, 128), (2048, 4096, 128), (8192, 4096, 256), (2048, 4096, 256))
# the GPU tests' shapes (tests/test_bottleneck.py), for --warm
BOTTLENECK_TEST_SHAPES = ((1, 1032, 64), (300, 776, 24), (1100, 4096, 64), (257, 520, 200))


def bottleneck_launches(dtypes=(torch.bfloat16,), shapes=BOTTLENECK_SHAPES, activations=BOTTLENECK_ACTS) -> list[Launch]:
    """Every launch fastpeft.adapter (triton backend) makes, forward and backward (all gradients):
    the row-tile forward, the row-tile backward (dx, a, dh) and the weight-gradient kernel."""
    import fastpeft
    from fastpeft.kernels import bottleneck as kad

    def run():
        for dtype in dtypes:
            for (M, d, R) in shapes:
                x = torch.zeros(M, d, dtype=dtype, requires_grad=True)
                wd = torch.zeros(R, d, dtype=dtype, requires_grad=True)
                bd = torch.zeros(R, dtype=dtype, requires_grad=True)
                wu = torch.zeros(d, R, dtype=dtype, requires_grad=True)
                bu = torch.zeros(d, dtype=dtype, requires_grad=True)
                for act in activations:
                    y = fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, activation=act, scaling=1.0, backend="triton")
                    y.backward(torch.zeros_like(y))
    launches = capture(kad, run)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def fixed_bottleneck_launches(dtypes) -> list[Launch]:
    """FASTPEFT_AUTOTUNE=0 launches: every activation at the benchmark's shape in each dtype; the
    other shapes with gelu_tanh (the longest activation code: the most registers)."""
    launches = _with_fixed_configs(bottleneck_launches, dtypes=dtypes, shapes=BOTTLENECK_SHAPES[:1])
    launches += _with_fixed_configs(bottleneck_launches, dtypes=dtypes, shapes=BOTTLENECK_SHAPES[1:],
                                    activations=("gelu_tanh",))
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


# (T, K, N, n, r_max, index dtype): the benchmark's decode (64 rows, 64 adapters) and prefill
# (8192 rows, 8 adapters) layers; decode at 1 row; both regimes with r_max 64 (BLOCK_R 64) and
# r_max 32; the prefill row tiles of 16 and 32 (T < 2048); int32 indices; an unaligned layer
MULTI_LORA_SHAPES = ((64, 4096, 4096, 64, 16, torch.int64), (8192, 4096, 4096, 8, 16, torch.int64),
                     (1, 4096, 4096, 8, 16, torch.int64), (64, 4096, 4096, 64, 64, torch.int64),
                     (8192, 4096, 4096, 8, 64, torch.int64), (2048, 4096, 11008, 8, 32, torch.int64),
                     (300, 4096, 4096, 2, 16, torch.int64), (1024, 4096, 4096, 8, 16, torch.int32),
                     (64, 4096, 4096, 64, 16, torch.int32), (300, 100, 72, 5, 24, torch.int64))
# the GPU tests' shapes (tests/test_multi_lora_op.py), for --warm
MULTI_LORA_TEST_SHAPES = ((1, 1032, 776, 6, 64, torch.int64), (37, 1032, 776, 6, 64, torch.int64),
                          (700, 1032, 776, 6, 64, torch.int64), (4099, 1032, 776, 6, 64, torch.int64))


def multi_lora_launches(dtypes=(torch.bfloat16,), shapes=MULTI_LORA_SHAPES) -> list[Launch]:
    """Every launch fastpeft.multi_lora (triton backend) makes, writing a new output and adding
    into ``out``: the decode kernels (shrink, expand) or the prefill ones (keys, shrink, expand),
    as its regime rule picks from (T, n)."""
    import fastpeft
    from fastpeft.kernels import multi_lora as kml

    def run():
        for dtype in dtypes:
            for (T, K, N, n, R, idt) in shapes:
                x = torch.zeros(T, K, dtype=dtype)
                A = torch.zeros(n, R, K, dtype=dtype)
                B = torch.zeros(n, N, R, dtype=dtype)
                ranks = torch.full((n,), R, dtype=torch.int32)
                s = torch.ones(n)
                idx = torch.zeros(T, dtype=idt)
                with torch.no_grad():
                    fastpeft.multi_lora(x, A, B, ranks, s, idx, check=False, backend="triton")
                    fastpeft.multi_lora(x, A, B, ranks, s, idx, out=torch.zeros(T, N, dtype=dtype),
                                        check=False, backend="triton")
    launches = capture(kml, run)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def fixed_multi_lora_launches(dtypes) -> list[Launch]:
    """Fixed configs (it does not autotune): every shape in the first dtype; the benchmark's two
    layers and the unaligned one in the others (fp32 has its own prefill tiles); the GPU tests'
    shapes (unaligned rows, r_max 64) in every dtype."""
    launches = multi_lora_launches(dtypes=dtypes[:1])
    if dtypes[1:]:
        launches += multi_lora_launches(dtypes=dtypes[1:], shapes=MULTI_LORA_SHAPES[:2] + MULTI_LORA_SHAPES[3:5]
                                        + MULTI_LORA_SHAPES[-1:])
    launches += multi_lora_launches(dtypes=dtypes, shapes=MULTI_LORA_TEST_SHAPES)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


# vocab sizes: Llama-3 (4096-wide tiles, 16-aligned rows), an odd one (no alignment hints), a
# small one (a single 1024-wide tile, 4 warps)
DISTILL_VOCABS = (128256, 32001, 1000)
# (labels, kd weight, ce weight): KD + CE, KD only (alpha 1), CE only (alpha 0), no labels
_DISTILL_TERMS = ((True, 0.5, 0.5), (True, 1.0, 0.0), (True, 0.0, 1.0), (False, 1.0, 0.0))


def distill_launches(dtypes=(torch.bfloat16,), vocabs=DISTILL_VOCABS[:1], terms=_DISTILL_TERMS,
                     temperatures=(2.0, 1.0), grads=(True, False),
                     divergences=("forward_kl", "reverse_kl", "jsd")) -> list[Launch]:
    """Every launch of fastpeft.kernels.distill's loss kernel (one per divergence x terms x
    T == 1 or not x with / without the student's gradient; the fused-linear op launches the same
    kernel on each chunk's logits)."""
    from fastpeft.kernels import distill as kdist

    def run():
        for dtype in dtypes:
            for V in vocabs:
                z = torch.zeros(2, V, dtype=dtype)
                labels = torch.zeros(2, dtype=torch.int64)
                scale = torch.ones(1)
                for has_labels, kd_w, ce_w in terms:
                    for div in (divergences if kd_w > 0 else divergences[:1]):
                        for T in temperatures:
                            for g in grads:
                                kdist.distill_loss_fwd(z, z, labels if has_labels else None, T, kd_w, ce_w, -100,
                                                       div, scale, g)
    launches = capture(kdist, run)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def fixed_distill_launches(dtypes, every_variant: bool = False) -> list[Launch]:
    """(No autotuning.) The training variant (KD + CE, T != 1, the gradient) of each divergence
    in every dtype at the Llama-3 vocab and in the first dtype at the other vocabs; with
    ``every_variant`` the other variants (alpha 0 or 1, no labels, T == 1, no gradient) at the
    Llama-3 vocab in the first dtype instead."""
    main = dict(terms=_DISTILL_TERMS[:1], temperatures=(2.0,), grads=(True,))
    if every_variant:
        launches = distill_launches(dtypes=dtypes[:1])
        done = {launch.key() for launch in distill_launches(dtypes=dtypes[:1], **main)}
        return [launch for launch in launches if launch.key() not in done]
    launches = distill_launches(dtypes=dtypes, **main)
    launches += distill_launches(dtypes=dtypes[:1], vocabs=DISTILL_VOCABS[1:], **main)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


# quantize / double quant / dequantize: the benchmark's layer weight, an unaligned odd last dim, 3-D,
# an odd element count (a pad nibble), a single block (the block counts equal to 1)
NF4_SHAPES = ((4096, 4096), (300, 99), (8, 16, 72), (33, 99), (5,))
NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' (each its own tile R x BS)
# (M, K, N) of the linear layer, forward and dx: decode (M = 1, and M = 2: no constant M; M = 16: the
# decode kernel's tl.dot variant, or the 16-row GEMM where K is not whole blocks), mid and
# large (the BLOCK_M 16 / 64 / 128 configs) at the benchmark's layers (up and down projections);
# rows and K not 16-aligned (every block size unaligned: the per-element gather path)
NF4_LINEAR_SHAPES = ((1, 4096, 4096), (1, 4096, 11008), (1, 11008, 4096), (2, 4096, 11008), (16, 4096, 11008),
                     (64, 4096, 4096), (64, 11008, 4096), (2048, 4096, 4096), (2048, 11008, 4096), (300, 100, 72))
# (block size, double quantization, bias): QLoRA's (blocks of 64, double-quantized absmax, no bias);
# plain absmax with a bias; blocks of 32 (BS < BLOCK_K: BLOCK_K / 32 absmax a row and tile); blocks
# of 256 (one absmax a row and tile at every BLOCK_K); blocks of 4096 (K = 11008 not whole blocks:
# the unaligned layout at the layer's size)
NF4_LINEAR_VARIANTS = ((64, True, False), (64, False, True), (32, True, True), (256, False, False),
                       (4096, True, False))
# QLoRA's fused forward and dx (fastpeft.ops.nf4.nf4_lora_linear: the 4-bit GEMMs with s * U B^T and
# s * dropout'(V A), HAS_LORA):
# QLoRA's variant and the unaligned one, at each rank tile (BLOCK_R 16, 32; dx's 16, 32, 64)
NF4_LORA_VARIANTS = ((64, True, False), (4096, True, False))
NF4_LORA_RANKS = (16, 32, 64)
# the GPU tests' shapes (tests/test_nf4.py: (shape, block size)) and linear cases
# (tests/test_nf4_linear.py: (M, K, N, block size, double)), for --warm
NF4_TEST_SHAPES = (((3, 37), 64), ((5, 130), 32), ((2, 3, 71), 128), ((1,), 64), ((9, 300), 32))
NF4_LINEAR_TEST_CASES = ((1, 100, 7, 64, True), (6, 96, 33, 32, False), (5, 128, 40, 128, True),
                         (17, 37, 9, 64, False))


def _nf4_weight(N: int, K: int, block_size: int, double_quant: bool):
    """A [N, K] nf4 QuantizedTensor with zero codes, built directly (no quantize launch recorded)."""
    from fastpeft.ops.quant import QuantizedTensor
    n = N * K
    nb = (n + block_size - 1) // block_size
    nested = torch.ones((nb + 255) // 256) if double_quant else None
    return QuantizedTensor(data=torch.zeros((n + 1) // 2, dtype=torch.uint8),
                           scale=torch.zeros(nb, dtype=torch.uint8) if double_quant else torch.ones(nb),
                           zero_point=None, bits=4, scheme="nf4", axis=None, group_size=block_size,
                           shape=torch.Size((N, K)), dtype=torch.float32, nested_scale=nested,
                           nested_offset=torch.zeros(()) if double_quant else None)


def nf4_launches(dtypes=(torch.bfloat16,), shapes=NF4_SHAPES, block_sizes=(64,), schemes=("nf4", "fp4"),
                 linear_shapes=NF4_LINEAR_SHAPES, variants=NF4_LINEAR_VARIANTS, linear_cases=()) -> list[Launch]:
    """Every launch fastpeft.kernels.nf4 makes (fixed configs: it does not autotune) through the
    public ops (triton backend): quantize (nf4 and fp4: the ORDER constant), double quant on and
    off, dequantize to x's dtype, for each shape and block size; and nf4_linear's forward and
    dx (backward) kernels for each (M, K, N) and (block size, double quantization, bias), plus
    ``linear_cases`` ((M, K, N, block size, double), with a bias); and QLoRA's fused forward and
    dx (nf4_lora_linear: the 4-bit GEMMs with the update, with and without the backward's dropout
    mask; dA and dB are the lora family's kernels) for the variants among NF4_LORA_VARIANTS, at
    each of NF4_LORA_RANKS (the LoRA shrink, a kernels/lora.py kernel captured with the lora
    family, stands in as zeros)."""
    import fastpeft
    from fastpeft.kernels import lora as klora
    from fastpeft.kernels import nf4 as knf4
    from fastpeft.ops import nf4 as onf4

    def run():
        for dtype in dtypes:
            for shape in shapes:
                x = torch.zeros(shape, dtype=dtype)
                for bs in block_sizes:
                    for scheme in schemes:
                        for dq in (False, True):
                            q = fastpeft.quantize(x, 4, scheme, block_size=bs, double_quant=dq, backend="triton")
                            fastpeft.dequantize(q, dtype, backend="triton")
            cases = [(M, K, N, bs, dq, bias) for (M, K, N) in linear_shapes for bs, dq, bias in variants]
            cases += [(M, K, N, bs, dq, True) for (M, K, N, bs, dq) in linear_cases]
            for M, K, N, bs, dq, bias in cases:
                q = _nf4_weight(N, K, bs, dq)
                x = torch.zeros(M, K, dtype=dtype, requires_grad=True)
                b = torch.zeros(N, dtype=dtype) if bias else None
                y = onf4.nf4_linear(x, q, b, backend="triton")
                y.backward(torch.zeros_like(y))
                if (bs, dq, bias) in NF4_LORA_VARIANTS:
                    for r in NF4_LORA_RANKS:
                        for p in (0.0, 0.1):  # the backward's dropout mask (the forward's is the shrink's)
                            A, B = torch.zeros(r, K, dtype=dtype), torch.zeros(N, r, dtype=dtype)
                            y = onf4.nf4_lora_linear(x, q, b, A, B, 2.0, p, True, backend="triton")
                            y.backward(torch.zeros_like(y))  # dx only: A and B do not require grad

    def run_without_shrink():
        shrink = klora.shrink
        klora.shrink = lambda x, a, a_strides, R, **kw: torch.zeros(x.shape[0], R)
        try:
            run()
        finally:
            klora.shrink = shrink
    launches = capture(knf4, run_without_shrink)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def fixed_nf4_launches(dtypes, every_variant: bool = False) -> list[Launch]:
    """The linear kernels (no autotuning): every shape and variant in the first dtype; fp16 (the
    code of bf16) QLoRA's variant and the unaligned one; fp32 (3xTF32, its own K tiles) every
    shape, those two variants. With ``every_variant`` the quantize / double quant / dequantize
    launches instead (elementwise, no dot): every shape in the first dtype, every block size at
    the layer's shape, and the layer's shape in the other dtypes."""
    if every_variant:
        launches = nf4_launches(dtypes=dtypes[:1], linear_shapes=())
        launches += nf4_launches(dtypes=dtypes[:1], shapes=NF4_SHAPES[:1], block_sizes=NF4_BLOCK_SIZES,
                                 linear_shapes=())
        launches += nf4_launches(dtypes=dtypes[1:], shapes=NF4_SHAPES[:1], linear_shapes=()) if dtypes[1:] else []
    else:
        launches = nf4_launches(dtypes=dtypes[:1], shapes=())
        for dtype in dtypes[1:]:
            launches += nf4_launches(dtypes=(dtype,), shapes=(), variants=NF4_LINEAR_VARIANTS[::4])
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


FAMILIES = ("lora", "int8", "quant", "qlinear", "fakequant", "bottleneck", "multi_lora", "distill", "nf4")


def _families() -> tuple[str, ...]:
    """AOT_FAMILIES=int8 (comma-separated) restricts the check to some op families."""
    names = tuple(f for f in os.environ.get("AOT_FAMILIES", ",".join(FAMILIES)).split(",") if f)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"AOT_FAMILIES: unknown {unknown}; expected some of {FAMILIES}")
    return names


_POOL_LAUNCHES: list[Launch] = []


def _compile_report(job: tuple[int, int]) -> tuple[int, int, dict | str]:
    i, arch = job
    try:
        return i, arch, resource_usage(compile_launch(_POOL_LAUNCHES[i], arch))
    except Exception as exc:  # a compile error is the finding
        return i, arch, f"{type(exc).__name__}: {exc}"[:400]


def compile_all(launches: list[Launch], jobs_list: list[tuple[int, int]], jobs: int) -> list:
    """[(launch index, arch, resource_usage dict or the compile error)] in ``jobs`` processes."""
    import multiprocessing
    import time
    _POOL_LAUNCHES[:] = launches
    results, start = [], time.time()
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for n, result in enumerate(pool.imap(_compile_report, jobs_list, chunksize=1), 1):
            results.append(result)
            if n % 100 == 0:
                print(f"  compiled {n} of {len(jobs_list)} in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return results


def launch_set(autotuned: bool, dtypes, families=FAMILIES) -> tuple[list[Launch], int]:
    """The captured launches of the op families: with ``autotuned`` every autotune config of the
    autotuned launchers, else the configs launched with FASTPEFT_AUTOTUNE=0 (and by the launchers
    that never autotune). Returns (launches, n): check() compiles the first n for every target
    and the rest (elementwise kernels, extra variants) for the newest only, to keep CI short."""
    launches = []
    if "lora" in families:
        launches += lora_launches(dtypes=dtypes) if autotuned else fixed_launches(dtypes)
    if "int8" in families:
        launches += int8_launches(dtypes=dtypes) if autotuned else fixed_int8_launches(dtypes)
    if "qlinear" in families and not autotuned:  # no autotuner: only fixed configs to compile
        launches += fixed_qlinear_launches(dtypes)
    if "multi_lora" in families and not autotuned:  # no autotuner: only fixed configs to compile
        launches += fixed_multi_lora_launches(dtypes)
    if "bottleneck" in families:  # tuned: every autotune config at the benchmark's shape and at BLOCK_R 256
        launches += (bottleneck_launches(dtypes=dtypes, shapes=BOTTLENECK_SHAPES[:1] + BOTTLENECK_SHAPES[-2:],
                                      activations=("gelu_tanh",))
                     if autotuned else fixed_bottleneck_launches(dtypes))
    if "distill" in families and not autotuned:  # no autotuner: only fixed configs to compile
        launches += fixed_distill_launches(dtypes)
    if "nf4" in families and not autotuned:  # no autotuner: only fixed configs to compile
        launches += fixed_nf4_launches(dtypes)
    n_arch_checked = len(launches)
    if "distill" in families and not autotuned:  # the other variants
        launches += fixed_distill_launches(dtypes, every_variant=True)
    if "nf4" in families and not autotuned:  # quantize / double quant / dequantize (elementwise)
        launches += fixed_nf4_launches(dtypes, every_variant=True)
    if "quant" in families and not autotuned:  # no autotuning: the fixed pass compiles its launches
        # elementwise kernels without tensor cores or large shared memory: every shape in the
        # first dtype, one shape in the others
        launches += quant_launches(dtypes=dtypes[:1])
        launches += quant_launches(dtypes=dtypes[1:], shapes=QUANT_SHAPES[:1]) if dtypes[1:] else []
    if "fakequant" in families and not autotuned:  # elementwise, fixed configs: like quant
        launches += fakequant_launches(dtypes=dtypes[:1])
        launches += fakequant_launches(dtypes=dtypes[1:], shapes=FAKEQUANT_SHAPES[:1]) if dtypes[1:] else []
    return launches, n_arch_checked


# Launchable configs that spill, accepted for a reason: regex on "<label> sm_<arch>" -> why.
# tests/test_resources.py fails on any other spill, and on an entry that no longer matches a
# spilling row of benchmarks/resources.md (delete it then).
KNOWN_SPILLS: dict[str, str] = {
    r"^_quantize_4bit_kernel\[bfloat16 w8s3 BS=(32|128|256|512|4096),R=\d+\] sm_(80|90)$":
        "nf4 quantize, bf16 input: blocks of 128-512 carry a 32-byte stack frame that nothing uses "
        "(an unused local depot in the PTX: no LDL / STL in the SASS); blocks of 32 and 4096 on sm_90 "
        "spill 8 bytes at 64 registers (one LDL and one STL a thread, no loop). 4 warps move it "
        "elsewhere (64 B at blocks of 512 / 1024, 255 registers for fp4 at blocks of 32), halving the "
        "tile too; the kernel runs once per weight at load time",
}


# Autotune candidates that may spill, per arch, and why that is accepted: on sm_80 (A100: not
# this project's target, H100 / H200 are) ten bf16 LoRA GEMM candidates with 128x256 / 128x128
# tiles and one int8 GEMM candidate keep 8-88 B of stack at 255 registers; the same configs do
# not spill on sm_90. An autotuner times every candidate on the device and keeps one only where
# it is measured fastest, so a spilling candidate costs tuning time, never a slower launch. (The
# alternative, pruning per arch, needs the capture here to run each autotuner's prune per arch:
# not done.) Fixed configs, and every config on sm_90, must not spill.
TUNED_SPILLS_ACCEPTED: dict[int, str] = {
    80: "autotune candidate on sm_80: the autotuner keeps it only where it is measured fastest",
}


def _group(launch: Launch, arch: int) -> tuple:
    """Launches that differ only in tile sizes: an autotuner chooses among them."""
    return (arch, launch.fn.__name__, tuple(sorted((k, _spec(v)) for k, v in launch.args.items())),
            tuple(sorted((k, v) for k, v in launch.constexprs.items() if not k.startswith("BLOCK") and k != "GROUP_M")))


def judge(results: list, launches: list[Launch]) -> list[str]:
    """Problems: a compile error; a fixed config over the per-block shared memory limit; an
    autotuned launcher none of whose configs fits (configs that do not fit are skipped by the
    autotuner, so they are not launchable); a launchable config that spills (stack or local
    memory) unless KNOWN_SPILLS accepts it (or, for an autotune candidate, TUNED_SPILLS_ACCEPTED)."""
    import re
    problems, fits = [], {}
    for i, arch, ru in results:
        launch = launches[i]
        name = f"{launch.label()} sm_{arch}"
        if isinstance(ru, str):
            problems.append(f"{name} COMPILE FAILED: {ru}")
            continue
        ok = ru["shared"] <= SHARED_LIMIT[arch]
        if launch.tuned:
            fits[_group(launch, arch)] = fits.get(_group(launch, arch), False) or ok
        elif not ok:
            problems.append(f"{name} needs {ru['shared']} B of shared memory > {SHARED_LIMIT[arch]}")
        spill = ru.get("stack", 0) + ru.get("local", 0)
        if (ok and spill and not any(re.search(k, name) for k in KNOWN_SPILLS)
                and not (launch.tuned and arch in TUNED_SPILLS_ACCEPTED)):
            problems.append(f"{name} spills {spill} B (stack {ru.get('stack', 0)}, local {ru.get('local', 0)})")
    problems += [f"no autotune config of {g[1]} fits sm_{g[0]}'s shared memory" for g, ok in fits.items() if not ok]
    return problems


def check(archs=(90,), autotuned=True, dtypes=(torch.bfloat16,), jobs: int = 2,
          families: tuple[str, ...] = FAMILIES) -> tuple[list[str], list[str]]:
    """Compile every launch of the op families; returns (report lines, problems)."""
    launches, n_arch_checked = launch_set(autotuned, dtypes, families)
    jobs_list = [(i, a) for i in range(len(launches)) for a in (archs if i < n_arch_checked else archs[-1:])]
    results = compile_all(launches, jobs_list, jobs)
    lines = []
    for i, arch, ru in results:
        name = f"{launches[i].label():84s} {arch:3d}"
        if isinstance(ru, str):
            lines.append(f"{name} COMPILE FAILED: {ru}")
            continue
        ok = ru["shared"] <= SHARED_LIMIT[arch]
        lines.append(f"{name} {ru.get('reg', -1):5d} {ru.get('stack', -1):6d} {ru.get('local', -1):6d} "
                     f"{ru['shared']:7d}{'' if ok else '  SMEM OVER LIMIT'}")
    return lines, judge(results, launches)


ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks" / "resources.md"
TABLE_ARCHS = (90, 80)
TABLE_FORMAT = 2  # bump when the table's layout or content rules change
# what the table is a function of (with triton's version): the kernels and their launchers'
# configs, the ops that pick among them, and the launch lists and rules here
HASHED_INPUTS = ("kernels/*.py", "fastpeft/ops/*.py", "tests/_aot.py")
REGENERATE = ".venv/bin/python -P tests/_aot.py --table"


def inputs_hash(root: Path = ROOT) -> str:
    """sha256 of HASHED_INPUTS' files (path and bytes), triton's version and TABLE_FORMAT: when it
    matches the table's header, the table is what --table would write now (cheap to check)."""
    import hashlib
    from importlib.metadata import version
    h = hashlib.sha256(f"triton {version('triton')}; table format {TABLE_FORMAT}\n".encode())
    for pattern in HASHED_INPUTS:
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def table_launches() -> list[Launch]:
    """Every launch the table covers: the FASTPEFT_AUTOTUNE=0 configs in bf16, fp16 and fp32
    (with the launchers that never autotune), then every autotune config in bf16; a config
    launched both ways is listed once, as fixed."""
    all_dt = (torch.bfloat16, torch.float16, torch.float32)
    launches = {}
    for launch in launch_set(False, all_dt)[0] + launch_set(True, all_dt[:1])[0]:
        launches.setdefault(launch.key(), launch)
    return list(launches.values())


def _family(launch: Launch) -> str:
    return launch.fn.__module__.rsplit(".", 1)[-1]


def _cells(ru, arch: int, num_warps: int) -> list[str]:
    if isinstance(ru, str):
        return ["FAILED", "", "", ""] + (["", ""] if arch == 90 else [])
    spill = ru.get("stack", 0) + ru.get("local", 0)
    over = ru["shared"] > SHARED_LIMIT[arch]
    n, limiter = blocks_per_sm(ru.get("reg", 0), num_warps, ru["shared"], arch)
    cells = [str(ru.get("reg", -1)), str(spill), f"{ru['shared']}{' OVER' if over else ''}",
             "-" if over else f"{n} ({limiter})"]
    if arch == 90:
        wait = ",".join(map(str, ru["main_waits"])) or "-"
        if ru["other_waits"] and ru["other_waits"] != ru["main_waits"]:
            wait += "; other loops " + ",".join(map(str, ru["other_waits"]))
        cells += [ru["mma"] or "-", wait]
    return cells


def render_table(launches: list[Launch], by: dict, problems: list[str], digest: str) -> str:
    """benchmarks/resources.md from the compile results ``by[(launch index, arch)]``."""
    import collections
    order = sorted(range(len(launches)), key=lambda i: (FAMILIES.index(_family(launches[i])),
                                                      launches[i].fn.__name__, launches[i].tuned,
                                                      launches[i].label(), launches[i].spec_id()))
    n_fixed = sum(not launch.tuned for launch in launches)
    out = [
        "# Triton kernel resources: every launchable config on sm_90 and sm_80",
        "",
        f"inputs hash: `{digest}`",
        "",
        "Generated; do not edit. Regenerate from the repository root (TRITON_INTERPRET unset; no GPU",
        "needed; AOT_JOBS=N compile processes, 2 by default; compiles already in triton's on-disk",
        "cache are reused, so after a small change only the changed kernels compile again):",
        "",
        f"    {REGENERATE}",
        "",
        "The inputs hash is the sha256 of " + ", ".join(f"`{g}`" for g in HASHED_INPUTS) + ", triton's",
        "version and the table format: `tests/test_resources.py` recomputes it and fails when it",
        "differs (the table is stale: regenerate it), and fails when a launchable config below spills",
        "or needs more shared memory than a block may have.",
        "",
        "How the rows were made: `tests/_aot.py` runs the real launchers on CPU tensors with recorders",
        "in place of the kernels (SM count 132), so each row is a launch the dispatch makes on a GPU",
        "(kernel, dtype, tiles `BLOCK_M x BLOCK_N x BLOCK_K x BLOCK_R` as present, warps `w`,",
        "stages `s`, constexpr flags), with the JIT's own specialization (`id` tells apart launches",
        "of one label that differ in alignment or in arguments equal to 1); each is compiled for",
        "sm_90 and sm_80 with triton's bundled ptxas. `launched`: `fixed` = a FASTPEFT_AUTOTUNE=0",
        "config or a launcher that never autotunes (all dtypes), `tuned` = one of an autotuner's",
        "configs (bf16).",
        "",
        "Columns: `regs` registers a thread; `spill` stack + local memory bytes a thread (spills);",
        "`smem` shared memory bytes a block (`OVER`: more than a block may have, "
        f"{SHARED_LIMIT[90]} B on sm_90 and {SHARED_LIMIT[80]} B on sm_80; an autotuner skips such",
        "a config); `blocks/SM` resident blocks a multiprocessor and what bounds them, from the",
        "registers (65536 an SM in 4 sub-partitions, allocated 256 a warp), the shared memory",
        "(228 KB an SM on sm_90, 164 KB on sm_80, plus 1 KB reserved a block), 2048 threads and 32",
        "blocks an SM; `MMA` the matrix instruction in the sm_90 PTX (`wgmma` = Hopper warpgroup MMA,",
        "`mma` = mma.sync, `-` = none); `wait` the `wgmma.wait_group N` values in the main loop on",
        "sm_90 (the loop with the most wgmma instructions; other loops' values after `;`): N wgmma",
        "groups may stay in flight, so 0 means each iteration waits for its own MMAs before the next",
        "iteration issues its own (no MMA overlap across iterations); 1 keeps one group in flight.",
        "",
        "Accepted spills (tests/_aot.py says why): the rows marked `[KNOWN_SPILLS]`, and autotune",
        "candidates on " + ", ".join(f"sm_{a}" for a in TUNED_SPILLS_ACCEPTED) + " (an autotuner keeps a "
        "candidate only where it measures fastest; every fixed config, and every config on sm_90,",
        "must not spill).",
        "",
        "## Summary",
        "",
        f"- {len(launches)} launches ({n_fixed} fixed, {len(launches) - n_fixed} autotune-only), each "
        "compiled for sm_90 and sm_80.",
    ]
    spills = [(launches[i], a, ru) for (i, a), ru in sorted(by.items()) if not isinstance(ru, str)
              and ru.get("stack", 0) + ru.get("local", 0) and ru["shared"] <= SHARED_LIMIT[a]]
    out.append(f"- Launchable configs that spill: {len(spills) or 'none'}"
               + ("" if not spills else ": " + "; ".join(
                   f"`{l.label()}` ({l.spec_id()}) sm_{a}: {ru.get('stack', 0) + ru.get('local', 0)} B"
                   for l, a, ru in spills[:40]) + (" ..." if len(spills) > 40 else "")) + ".")
    over = [(launches[i], a) for (i, a), ru in sorted(by.items())
            if not isinstance(ru, str) and ru["shared"] > SHARED_LIMIT[a]]
    out.append(f"- Over the shared-memory limit: {sum(not l.tuned for l, _ in over)} fixed, "
               f"{sum(l.tuned for l, _ in over)} autotune configs (skipped by the autotuner at run time).")
    waits = collections.defaultdict(collections.Counter)
    for i, launch in enumerate(launches):
        ru = by.get((i, 90))
        if isinstance(ru, dict) and ru["mma"]:
            key = ("wgmma wait " + (",".join(map(str, ru["main_waits"])) or "none in a loop")
                   if ru["mma"] == "wgmma" else "mma.sync (no wgmma)")
            waits[launch.fn.__name__][key] += 1
    out.append("- Kernels with a dot on sm_90, configs by the wgmma wait depth of their main loop:")
    out += [f"  - `{k}`: " + ", ".join(f"{w}: {n}" for w, n in sorted(c.items())) for k, c in sorted(waits.items())]
    out += ["", "## Problems", ""] + ([f"- {p}" for p in problems] or ["none"]) + [""]
    header = ("| kernel [config] | id | launched | sm_90 regs | spill | smem | blocks/SM | MMA | wait "
              "| sm_80 regs | spill | smem | blocks/SM |")
    family = None
    for i in order:
        launch = launches[i]
        if _family(launch) != family:
            family = _family(launch)
            out += ["", f"## {family}", "", header, "|" + "---|" * 13]
        row = [f"`{launch.label()}`", launch.spec_id(), "tuned" if launch.tuned else "fixed"]
        row += _cells(by[(i, 90)], 90, launch.num_warps) + _cells(by[(i, 80)], 80, launch.num_warps)
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def read_table(path: Path = TABLE) -> tuple[str | None, list[dict], list[str]]:
    """(inputs hash, rows, problems) of a written table; each row: label, id, launched, and per
    arch regs / spill / smem / over (None where the compile failed)."""
    import re
    text = path.read_text()
    m = re.search(r"^inputs hash: `([0-9a-f]{64})`", text, re.M)
    section = text.split("## Problems", 1)[1].split("\n## ", 1)[0] if "## Problems" in text else ""
    problems = [line[2:] for line in section.splitlines() if line.startswith("- ")]
    rows = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        c = [x.strip() for x in line.strip().strip("|").split("|")]
        row = {"label": c[0].strip("`"), "id": c[1], "launched": c[2]}
        for arch, at in ((90, 3), (80, 9)):
            if c[at] == "FAILED":
                row[arch] = None
                continue
            row[arch] = {"regs": int(c[at]), "spill": int(c[at + 1]), "smem": int(c[at + 2].split()[0]),
                         "over": c[at + 2].endswith("OVER")}
        rows.append(row)
    return (m.group(1) if m else None), rows, problems


def write_table(jobs: int, path: Path = TABLE) -> int:
    """Compile every table launch for sm_90 and sm_80 and write the table; 1 when problems."""
    digest = inputs_hash()
    launches = table_launches()
    print(f"compiling {len(launches)} launches x {len(TABLE_ARCHS)} targets with {jobs} processes", flush=True)
    results = compile_all(launches, [(i, a) for i in range(len(launches)) for a in TABLE_ARCHS], jobs)
    problems = judge(results, launches)
    path.write_text(render_table(launches, {(i, a): ru for i, a, ru in results}, problems, digest))
    print(f"wrote {path}; " + (f"{len(problems)} problems:\n  " + "\n  ".join(problems)
                                                 if problems else "no problems"))
    return 1 if problems else 0


def _warm_one(i: int) -> str | None:
    launch = _POOL_LAUNCHES[i]
    try:
        launch.fn.warmup(**launch.args, **launch.constexprs, grid=(1,),
                         num_warps=launch.num_warps, num_stages=launch.num_stages, **launch.options)
    except Exception as exc:  # OutOfResources for an autotune config that does not fit is expected
        return f"{launch.label()}: {type(exc).__name__}: {exc}"[:300]
    return None


def warm_launches() -> list[Launch]:
    """The benchmark's launches (autotune configs included) and the GPU tests' fixed configs."""
    launches = lora_launches(dtypes=(torch.bfloat16,), shapes=((1, 512, 512), (16, 512, 1024),
                                                               (128, 512, 512), (2048, 512, 512)),
                             ranks=(8, 16, 64), dropout=(0.0,))
    launches += fixed_launches((torch.bfloat16, torch.float16, torch.float32),
                               shapes=((1, 512, 512), (64, 512, 512), (2048, 512, 512), (300, 100, 72)))
    launches += int8_launches(dtypes=(torch.bfloat16,), shapes=((1, 4096, 4096), (16, 4096, 11008),
                                                                (2048, 4096, 4096), (2048, 11008, 4096)))
    launches += fixed_int8_launches((torch.bfloat16, torch.float16, torch.float32))
    launches += quant_launches((torch.bfloat16, torch.float16, torch.float32))
    launches += fakequant_launches((torch.bfloat16, torch.float16, torch.float32))
    launches += bottleneck_launches(dtypes=(torch.bfloat16,), shapes=BOTTLENECK_SHAPES[:1], activations=("relu",))
    launches += bottleneck_launches(dtypes=(torch.bfloat16,), shapes=((4096, 1024, 64), (1, 1024, 64)),
                                 activations=("gelu_tanh",))
    launches += _with_fixed_configs(bottleneck_launches, dtypes=(torch.bfloat16,), shapes=BOTTLENECK_TEST_SHAPES)
    launches += _with_fixed_configs(bottleneck_launches, dtypes=(torch.float16, torch.float32),
                                    shapes=BOTTLENECK_TEST_SHAPES, activations=("gelu",))
    launches += qlinear_launches((torch.bfloat16, torch.float16, torch.float32),
                                 shapes=((1, 4096, 11008), (16, 4096, 11008), (2048, 4096, 4096)),
                                 variants=((4, "zeropoint", 128), (8, "zeropoint", 128), (4, "zeropoint", 32),
                                           (8, "absmax", None)))
    launches += multi_lora_launches((torch.bfloat16, torch.float16, torch.float32))
    launches += multi_lora_launches((torch.bfloat16, torch.float16, torch.float32), shapes=MULTI_LORA_TEST_SHAPES)
    launches += distill_launches((torch.bfloat16,), terms=_DISTILL_TERMS[:1], temperatures=(2.0,), grads=(True,))
    launches += distill_launches((torch.float32, torch.float16), vocabs=(300,), grads=(True,))  # the tests'
    launches += nf4_launches((torch.bfloat16,), shapes=NF4_SHAPES[:1],
                             linear_shapes=((1, 4096, 11008), (16, 4096, 11008), (2048, 4096, 4096)),
                             variants=NF4_LINEAR_VARIANTS[:1])
    for shape, bs in NF4_TEST_SHAPES:  # the GPU tests' (tests/test_nf4.py, tests/test_nf4_linear.py)
        launches += nf4_launches((torch.bfloat16, torch.float16, torch.float32), shapes=(shape,), block_sizes=(bs,),
                                 linear_shapes=())
    launches += nf4_launches((torch.bfloat16, torch.float16, torch.float32), shapes=(), linear_shapes=(),
                             linear_cases=NF4_LINEAR_TEST_CASES)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def warm(jobs: int) -> int:
    """On a GPU machine: compile every launch of the benchmark shapes in parallel processes into
    triton's on-disk cache, so the benchmark and autotuner then find them compiled."""
    import multiprocessing
    launches = warm_launches()
    _POOL_LAUNCHES[:] = launches
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        errors = [e for e in pool.map(_warm_one, range(len(launches))) if e]
    print(f"warmed {len(launches) - len(errors)} of {len(launches)} launches with {jobs} processes")
    for e in errors:
        print("  not compiled:", e)
    return 0




# ---- AOT cache packs: compile here, carry to the GPU machine, install into triton's cache there.
# The JIT looks a kernel up in triton's on-disk cache under sha256(triton_key()-src-backend-
# options-env) (triton/runtime/cache.py get_cache_key): compile_launch(jit_key=True) gives the
# same src, backend (ptxas version, arch) and options parts as the GPU's JIT, but triton_key()
# hashes the bytes of triton's libtriton.so, which differ between the wheels of two Python
# versions (3.11 here, 3.12 there) while their code generation does not (benchmarks/NOTES.md).
# So a pack stores each kernel's key without triton_key, and --install-pack rebuilds the key with
# the GPU machine's triton_key, after checking that everything else in it (triton's version and
# Python sources) is the same and its libtriton is one of EQUIVALENT_LIBTRITON.
PACK = ROOT / "build" / "aot-pack"
EQUIVALENT_LIBTRITON = {  # sha256 of triton/_C/libtriton.so -> its build; all give the same code
    "898772c2cd1cc80fa8d8e5f1dc2f1a38c3a3fb9f7fb9a50a07c249e71ce1a884": "PyPI triton 3.6.0 cp311 manylinux wheel",
    "28daaa70a904e4f8add754e518533e8a69b94ab8b16431ce77d45f1f25282b87": "PyPI triton 3.6.0 cp312 manylinux wheel",
}


def _libtriton_sha() -> str:
    import hashlib
    import sysconfig
    import triton
    ext = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    path = os.path.join(os.path.dirname(triton.__file__), "_C", f"libtriton.{ext}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pack_one(i: int):
    """Compile launch i for sm_90 under the JIT's key; (name, key without triton_key, files) or an error."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.cache import get_cache_key, triton_key
    import hashlib
    launch = _POOL_LAUNCHES[i]
    try:
        signature, constexprs, attrs, options = jit_specialization(launch, 90)
        plain_sig, plain_consts, plain_attrs, _ = _plain_specialization(launch)
        index = {name: (k,) for k, name in enumerate(launch.fn.arg_names)}
        # the plain specialization differs only by empty attributes: the same cubin, already in
        # triton's cache when the table or check() compiled this launch; else compile anew
        same = (plain_sig == signature and {index[k]: v for k, v in plain_consts.items()} == constexprs
                and plain_attrs == {k: v for k, v in attrs.items() if v})
        compiled = compile_launch(launch, 90, jit_key=not same)
        src = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        key = get_cache_key(src, make_backend(GPUTarget("cuda", 90, 32)), options, get_cache_invalidating_env_vars())
        assert key.startswith(triton_key()) and (same or hashlib.sha256(key.encode()).hexdigest() == compiled.hash)
        files = {os.path.basename(p): p for p in compiled.metadata_group.values() if p.endswith((".json", ".cubin"))}
        return compiled.name, key[len(triton_key()):], files
    except Exception as exc:  # an autotune config that does not fit compiles (the GPU skips it)
        return f"{launch.label()}: {type(exc).__name__}: {exc}"[:300]


def write_pack(jobs: int, path: Path = PACK) -> int:
    """Compile warm_launches() for sm_90 under the GPU JIT's keys (triton's cache is reused) and
    write path/manifest.json + path/kernels.tar.xz (metadata and cubins only)."""
    import io
    import json
    import multiprocessing
    import tarfile
    from triton.runtime.cache import triton_key
    launches = warm_launches()
    print(f"compiling {len(launches)} launches for sm_90 with {jobs} processes", flush=True)
    _POOL_LAUNCHES[:] = launches
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        results = pool.map(_pack_one, range(len(launches)), chunksize=1)
    path.mkdir(parents=True, exist_ok=True)
    entries, errors = [], [r for r in results if isinstance(r, str)]
    with tarfile.open(path / "kernels.tar.xz", "w:xz") as tar:
        for n, (name, rest, files) in enumerate(r for r in results if not isinstance(r, str)):
            members = {}
            for fname, fpath in sorted(files.items()):
                data = Path(fpath).read_bytes()
                info = tarfile.TarInfo(f"{n}/{fname}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                members[fname] = info.name
            entries.append({"name": name, "key_rest": rest, "files": members})
    manifest = {"triton_key": triton_key(), "libtriton_sha256": _libtriton_sha(), "arch": 90,
                "equivalent_libtriton": sorted(set(EQUIVALENT_LIBTRITON) | {_libtriton_sha()}), "entries": entries}
    (path / "manifest.json").write_text(json.dumps(manifest))
    size = (path / "kernels.tar.xz").stat().st_size
    print(f"wrote {path}: {len(entries)} kernels, {size / 2**20:.1f} MiB; {len(errors)} launches did not compile")
    for e in errors[:20]:
        print("  not compiled:", e)
    return 0


def install_pack(path: Path = PACK) -> int:
    """On the GPU machine: put the pack's kernels into triton's cache under the keys this
    machine's JIT computes, when this triton is the packing one's up to an equivalent libtriton."""
    import hashlib
    import json
    import tarfile
    import triton
    from triton.runtime.cache import get_cache_manager, triton_key
    manifest = json.loads((path / "manifest.json").read_text())
    here, lib = triton_key(), _libtriton_sha()
    expected = manifest["triton_key"].replace(manifest["libtriton_sha256"], lib)
    if lib not in manifest["equivalent_libtriton"] or expected != here:
        why = ("libtriton.so differs from every build known to generate the same code" if expected == here
               else "triton's version or Python sources differ from the packing machine's")
        print(f"AOT pack NOT installed: {why} (triton {triton.__version__}, libtriton sha256 {lib[:16]})")
        return 0
    installed = 0
    with tarfile.open(path / "kernels.tar.xz", "r:xz") as tar:
        for entry in manifest["entries"]:
            digest = hashlib.sha256((here + entry["key_rest"]).encode()).hexdigest()
            cache = get_cache_manager(digest)
            group = {}
            for fname, member in entry["files"].items():
                data = tar.extractfile(member).read()
                if fname.endswith(".json"):
                    meta = json.loads(data)
                    meta["hash"] = digest
                    data = json.dumps(meta).encode()
                group[fname] = cache.put(data, fname, binary=True)
            cache.put_group(f"{entry['name']}.json", group)
            installed += 1
    same = "same triton_key" if here == manifest["triton_key"] else "re-keyed for this machine's libtriton"
    print(f"AOT pack installed: {installed} sm_90 kernels into triton's cache ({same})")
    return 0


def main(argv: list[str]) -> int:
    """Compile every captured launch for sm_90 (AOT_ARCHS overrides); print one line each."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs the real JIT", file=sys.stderr)
        return 2
    if "--warm" in argv:
        return warm(int(os.environ.get("AOT_JOBS", "8")))
    if "--pack" in argv:
        return write_pack(int(os.environ.get("AOT_JOBS", "2")))
    if "--install-pack" in argv:
        return install_pack(Path(argv[argv.index("--install-pack") + 1]) if argv[-1] != "--install-pack" else PACK)
    if "--hash" in argv:
        print(inputs_hash())
        return 0
    jobs = int(os.environ.get("AOT_JOBS", "2"))
    if "--table" in argv:
        return write_table(jobs)
    archs = tuple(int(a) for a in os.environ.get("AOT_ARCHS", "90").split(","))
    all_dt = (torch.bfloat16, torch.float16, torch.float32)
    print(f"{'launch':84s} {'sm':>3s} {'regs':>5s} {'stack':>6s} {'local':>6s} {'smem':>7s}")
    problems = []
    families = _families()
    if "--fixed" not in argv:
        lines, p = check(archs, autotuned=True, dtypes=all_dt if "--all-dtypes" in argv else all_dt[:1],
                         jobs=jobs, families=families)
        print("\n".join(lines))
        problems += p
    if "--tuned" not in argv:  # the configs used when FASTPEFT_AUTOTUNE=0, in every dtype
        lines, p = check(archs, autotuned=False, dtypes=all_dt, jobs=jobs, families=families)
        print("\n".join(lines))
        problems += p
    print("\n".join(["PROBLEMS:"] + problems) if problems else "all launches compiled and fit")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
