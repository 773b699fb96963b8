"""Compile the Triton kernels for a GPU on a machine without one.

The launchers in fastpeft.kernels are run on CPU tensors with their kernels swapped
for recorders, so the exact arguments, flags and configs that a GPU launch would
use are captured; each captured launch is then compiled ahead of time for a chosen
target (sm_90 for the H200) with the same specialization the JIT would apply
(ints equal to 1 become constants, multiples of 16 get a divisibility hint).

``python tests/_aot.py`` prints registers, spills and shared memory per launch (``--tuned``:
the autotune configs only, ``--fixed``: the FASTPEFT_AUTOTUNE=0 configs only; AOT_FAMILIES=int8,
=lora, =quant, =qlinear, =fakequant, =bottleneck, =multi_lora or =distill restricts it to one op family);
``--warm`` (on a GPU machine) compiles the benchmark's launches in parallel into triton's
cache before ``make gpu-check`` times them.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile

import torch

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use
_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}


@dataclasses.dataclass
class Launch:
    fn: object                    # the JITFunction
    args: dict                    # runtime args by name
    constexprs: dict              # constexpr args by name
    num_warps: int = 4
    num_stages: int = 3
    tuned: bool = False           # one of an autotuner's configs (may not fit: it is then skipped)

    def key(self) -> tuple:
        spec = tuple((k, _spec(v)) for k, v in self.args.items())
        return (self.fn.__name__, spec, tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages)

    def label(self) -> str:
        c = self.constexprs
        blocks = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R") if k in c)
        flags = ",".join([k for k, v in c.items() if v is True] + ([f"ACT={c['ACT']}"] if "ACT" in c else []))
        dt = next((str(v.dtype).replace("torch.", "") for v in self.args.values() if isinstance(v, torch.Tensor)), "")
        return f"{self.fn.__name__}[{dt} {blocks} w{self.num_warps}s{self.num_stages} {flags}]"


def _spec(v):
    if isinstance(v, torch.Tensor):
        return ("ptr", v.dtype)
    if isinstance(v, bool):
        return ("i1",)
    if isinstance(v, int):
        return ("int", 1 if v == 1 else (16 if v % 16 == 0 else 0))
    return (type(v).__name__,)


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
            self.sink.append(Launch(self.fn, runtime, consts, tuned=cfg is not None, **o))


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
    finally:
        _backend.interpreter_active = saved_interp
        _common.sm_count = saved_sm_count
        for n, v in saved.items():
            setattr(module, n, v)
    return sink


def compile_launch(launch: Launch, arch: int = 90):
    """Compile one captured launch for sm_<arch>; returns triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def resource_usage(compiled) -> dict:
    """Registers, stack (spills) and local memory from cuobjdump, plus shared memory."""
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
    return out


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
                     a8: bool = True) -> list[Launch]:
    """Every launch fastpeft.kernels.qlinear's fused dequantize-GEMM makes (fixed configs: it
    does not autotune) for each dtype, (M, K, N) and (bits, scheme, group size); with ``a8``
    also the int8-activation kernel's (dynamic and static activation scales)."""
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
                    kq.quant_linear(x, data, torch.ones(slots), torch.zeros(slots, dtype=torch.int32),
                                    bits, scheme, g, b)
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
    variant; fp32 (3xTF32, its own tiles) every shape, the grouped variants. Plus the decode
    path (_qlinear_gemv_kernel, split-K sum) at the benchmark's layer sizes in the 16-bit
    dtypes: its tiles depend on the group size and its split on N and K."""
    launches = qlinear_launches(dtypes=dtypes[:1])
    for dtype in dtypes[1:]:
        if dtype == torch.float32:
            launches += qlinear_launches(dtypes=(dtype,), variants=QLINEAR_VARIANTS[::2])
        else:
            launches += qlinear_launches(dtypes=(dtype,), shapes=QLINEAR_SHAPES[:1], variants=QLINEAR_VARIANTS[:1])
    half = tuple(d for d in dtypes if d != torch.float32)
    launches += qlinear_launches(dtypes=half, shapes=QLINEAR_DECODE_SHAPES, variants=QLINEAR_DECODE_VARIANTS)
    launches += qlinear_launches(dtypes=half[:1], shapes=((2, 4096, 11008),), variants=QLINEAR_DECODE_VARIANTS[:2])
    # rows of codes that are not whole int32 words (odd K / 2 or K): the byte-reading variant
    launches += qlinear_launches(dtypes=half[:1], shapes=((1, 4094, 4096),),
                                 variants=QLINEAR_DECODE_VARIANTS[1:4:2])
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


FAMILIES = ("lora", "int8", "quant", "qlinear", "fakequant", "bottleneck", "multi_lora", "distill")


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


def check(archs=(90,), autotuned=True, dtypes=(torch.bfloat16,), jobs: int = 2,
          families: tuple[str, ...] = FAMILIES) -> tuple[list[str], list[str]]:
    """Compile every launch of the op families; returns (report lines, problems)."""
    import multiprocessing

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
    n_arch_checked = len(launches)
    if "distill" in families and not autotuned:  # the other variants: the newest target only
        launches += fixed_distill_launches(dtypes, every_variant=True)
    if "quant" in families and not autotuned:  # no autotuning: the fixed pass compiles its launches
        # elementwise kernels without tensor cores or large shared memory: every shape in the
        # first dtype, one shape in the others, for the newest target only (keeps CI short)
        launches += quant_launches(dtypes=dtypes[:1])
        launches += quant_launches(dtypes=dtypes[1:], shapes=QUANT_SHAPES[:1]) if dtypes[1:] else []
    if "fakequant" in families and not autotuned:  # elementwise, fixed configs: like quant
        launches += fakequant_launches(dtypes=dtypes[:1])
        launches += fakequant_launches(dtypes=dtypes[1:], shapes=FAKEQUANT_SHAPES[:1]) if dtypes[1:] else []
    _POOL_LAUNCHES[:] = launches
    jobs_list = [(i, a) for i in range(len(launches)) for a in (archs if i < n_arch_checked else archs[-1:])]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        results = pool.map(_compile_report, jobs_list)
    lines, problems = [], []
    fits: dict[tuple, bool] = {}
    for i, arch, ru in results:
        launch = launches[i]
        name = f"{launch.label():84s} {arch:3d}"
        if isinstance(ru, str):
            problems.append(f"{name} COMPILE FAILED: {ru}")
            lines.append(problems[-1])
            continue
        ok = ru["shared"] <= SHARED_LIMIT[arch]
        group = (arch, launch.fn.__name__, tuple(sorted((k, _spec(v)) for k, v in launch.args.items())),
                 tuple(sorted((k, v) for k, v in launch.constexprs.items() if not k.startswith("BLOCK")
                              and k != "GROUP_M")))
        if launch.tuned:
            fits[group] = fits.get(group, False) or ok
        elif not ok:
            problems.append(f"{name} needs {ru['shared']} B of shared memory > {SHARED_LIMIT[arch]}")
        lines.append(f"{name} {ru.get('reg', -1):5d} {ru.get('stack', -1):6d} {ru.get('local', -1):6d} "
                     f"{ru['shared']:7d}{'' if ok else '  SMEM OVER LIMIT'}")
    problems += [f"no autotune config of {g[1]} fits sm_{g[0]}'s shared memory" for g, ok in fits.items() if not ok]
    return lines, problems


def _warm_one(i: int) -> str | None:
    launch = _POOL_LAUNCHES[i]
    try:
        launch.fn.warmup(**launch.args, **launch.constexprs, grid=(1,),
                         num_warps=launch.num_warps, num_stages=launch.num_stages)
    except Exception as exc:  # OutOfResources for an autotune config that does not fit is expected
        return f"{launch.label()}: {type(exc).__name__}: {exc}"[:300]
    return None


def warm(jobs: int) -> int:
    """On a GPU machine: compile every launch of the benchmark shapes in parallel processes into
    triton's on-disk cache, so the benchmark and autotuner then find them compiled."""
    import multiprocessing
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
    _POOL_LAUNCHES[:] = launches
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        errors = [e for e in pool.map(_warm_one, range(len(launches))) if e]
    print(f"warmed {len(launches) - len(errors)} of {len(launches)} launches with {jobs} processes")
    for e in errors:
        print("  not compiled:", e)
    return 0


def main(argv: list[str]) -> int:
    """Compile every captured launch for sm_90 (AOT_ARCHS overrides); print one line each."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs the real JIT", file=sys.stderr)
        return 2
    if "--warm" in argv:
        return warm(int(os.environ.get("AOT_JOBS", "8")))
    archs = tuple(int(a) for a in os.environ.get("AOT_ARCHS", "90").split(","))
    all_dt = (torch.bfloat16, torch.float16, torch.float32)
    print(f"{'launch':84s} {'sm':>3s} {'regs':>5s} {'stack':>6s} {'local':>6s} {'smem':>7s}")
    problems = []
    families = _families()
    if "--fixed" not in argv:
        lines, p = check(archs, autotuned=True, dtypes=all_dt if "--all-dtypes" in argv else all_dt[:1],
                         families=families)
        print("\n".join(lines))
        problems += p
    if "--tuned" not in argv:  # the configs used when FASTPEFT_AUTOTUNE=0, in every dtype
        lines, p = check(archs, autotuned=False, dtypes=all_dt, families=families)
        print("\n".join(lines))
        problems += p
    print("\n".join(["PROBLEMS:"] + problems) if problems else "all launches compiled and fit")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
