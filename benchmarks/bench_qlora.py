"""QLoRA benchmark: LoRA (r=16) on a frozen NF4 base with double quantization (Dettmers et al.,
2023), fastpeft against PEFT + bitsandbytes and against a bf16 LoRA layer.

GPU (bf16 activations, layers 4096x4096 and 4096x14336, M = 1, 16, 2048, 8192), forward and
forward+backward (dx, dA, dB):
  base      the bf16 LoRA layer: fastpeft.lora_linear on the unquantized bf16 weight (what the
            4-bit layer is compared to: within 1.3x, and at M = 1 at least 2x faster, reading a
            quarter of the weight's bytes)
  unfused   dequantize the whole weight (fastpeft's kernel), F.linear, then the LoRA path
            (what PEFT + bitsandbytes do, in fastpeft's kernels)
  peft      PEFT's LoRA layer on bitsandbytes' Linear4bit (nf4, compress_statistics), where both
            are installed (the peer: fwd+bwd >= 1.5x faster at M = 2048)
  fastpeft  LoRALinear.from_linear(QuantLinear nf4): the module a QLoRA user trains (auto)
  fastpeft[int4]  LoRA on fastpeft's int4 zero-point base of the same float weight (groups of
            64 where K allows, else per row): fastpeft.ops.qlinear.quant_lora_linear's fused
            path (role "other": other codes than the rest, so its output is not checked here,
            tests/test_qlora.py checks it; and it is not a variant auto could pick)
Every implementation reads the same 4-bit codes (bitsandbytes quantizes, fastpeft reads its codes
with QuantizedTensor.from_bnb; fastpeft quantizes itself where bitsandbytes is absent), so all are
checked against one fp32 computation on the dequantized weight. Adapters are fp32, as PEFT keeps
them on a 4-bit base.

GPU, end to end (op ``qlora_train_step``): one QLoRA training step (forward, loss, backward, AdamW
on the adapters) of a Llama-shaped model built from a config (TRAIN: 8 layers of 2048 / 5632,
4 x 512 tokens; quick: 2 layers), every linear layer but the LM head 4-bit, LoRA r = 16 on all
of them: fastpeft (quantize_model nf4 + inject_lora) against PEFT on bitsandbytes' Linear4bit,
and the bf16 model with fastpeft's LoRA as the base. Recorded: ms a step, tokens/s, peak memory
(torch.cuda.max_memory_allocated over one step, the model included, the float model the variants
are copied from not) and the first step's loss
(the three start from the same weights: the two 4-bit models' losses agree).

CPU: fp32 activations on smaller layers, the torch path against the same baselines; bitsandbytes'
4-bit ops run on the CPU too.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import common
from common import timing_record

BENCH, OP = "qlora", "lora_linear_4bit"
M_VALUES = (1, 16, 2048, 8192)
KN_VALUES = ((4096, 4096), (4096, 14336))        # (in features K, out features N)
QUICK = dict(M=(1, 2048), KN=((4096, 4096),))
R, ALPHA = 16, 32.0                                # scaling 2
BLOCK = 64                                         # bitsandbytes' default NF4 block
CPU_SHAPES = [(256, 1024, 1024), (1, 1024, 2816)]  # (M, K, N)


def target_for(mode: str, M: int) -> dict | None:
    """Issue 18's targets on an H100 / H200 (measured, never asserted)."""
    t: dict = {}
    if mode == "fwdbwd" and M == 2048:
        t["min_speedup_vs_peer"] = 1.5
    if M == 1 and mode == "fwd":
        t["max_ratio_vs_base"] = 0.5  # decode reads a quarter of the bytes: at least 2x faster than bf16
    elif M >= 2048:
        t["max_ratio_vs_base"] = 1.3
    return t or None


def flops_bytes(mode: str, M: int, K: int, N: int, elt: int, weight_bytes: float) -> tuple[float, float]:
    """Useful FLOPs and minimum HBM bytes of one call (the weight as stored: ``weight_bytes``)."""
    lora_f = 2 * M * K * R + 2 * M * R * N
    f = 2 * M * N * K + lora_f
    b = elt * (M * K + M * N) + weight_bytes + 4 * (R * K + N * R)
    if mode == "fwd":
        return f, b
    return 2 * f + 2 * M * R * K + 2 * M * N * R, 2 * b + elt * M * K


def run(ctx: common.Context) -> list[dict]:
    return run_gpu(ctx) if ctx.cuda else run_cpu(ctx)


# ---------------------------------------------------------------------------------------------
# the layers


def bnb_status() -> tuple[bool, str]:
    try:
        import bitsandbytes as bnb
        bnb.nn.Linear4bit  # noqa: B018
        return True, f"bitsandbytes {bnb.__version__}"
    except Exception as exc:
        return False, f"not installed/failed: {common.short_error(exc)}"


def bnb_layer(weight: torch.Tensor, compute_dtype: torch.dtype):
    """bitsandbytes' Linear4bit (nf4, double quantization) holding ``weight``, quantized on its device."""
    import bitsandbytes as bnb
    N, K = weight.shape
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=compute_dtype, compress_statistics=True,
                              quant_type="nf4")
    layer.load_state_dict({"weight": weight.detach().float().cpu()})
    return layer.to(weight.device)  # quantizes (on the GPU, or on the CPU with bitsandbytes' CPU ops)


def peft_on(base: torch.nn.Module, A: torch.Tensor, B: torch.Tensor):
    """PEFT's LoRA wrapped around ``base`` (a bnb Linear4bit: PEFT's bnb dispatch), adapters = A, B."""
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(One(), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


class Problem:
    """One layer: a float weight quantized to NF4 once (bitsandbytes' codes where installed), the
    fastpeft and PEFT layers over those codes, the bf16 LoRA layer over the float weight, x and dy."""

    def __init__(self, M, K, N, dtype, device, seed, bnb_ok, peft_ok):
        import fastpeft
        g = torch.Generator(device=device).manual_seed(seed)
        rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, device=device) * scale
        W = rnd(N, K, scale=K ** -0.5)
        self.A, self.B = rnd(R, K, scale=K ** -0.5), rnd(N, R, scale=R ** -0.5)
        self.x, self.dy = rnd(M, K).to(dtype), rnd(M, N).to(dtype)
        self.s = ALPHA / R
        self.peft = self.peft_error = None
        if bnb_ok:
            l4 = bnb_layer(W, dtype)
            q = fastpeft.QuantizedTensor.from_bnb(l4.weight, l4.weight.quant_state)
            if peft_ok:
                try:
                    self.peft = peft_on(l4, self.A, self.B)
                except Exception as exc:
                    self.peft_error = f"failed: {common.short_error(exc)}"
            else:
                self.peft_error = "PEFT not installed"
        else:
            q = fastpeft.quantize(W.to(dtype), bits=4, scheme="nf4", block_size=BLOCK, double_quant=True)
            self.peft_error = "bitsandbytes not installed"
        self.q = q
        self.W_deq = fastpeft.dequantize(q).float()          # the weight every 4-bit layer multiplies by
        self.W16 = W.to(dtype)                               # the bf16 LoRA layer's (unquantized)
        self.layer = fastpeft.LoRALinear.from_linear(fastpeft.QuantLinear.from_quantized(q), r=R, lora_alpha=ALPHA)
        with torch.no_grad():
            self.layer.lora_A.copy_(self.A)
            self.layer.lora_B.copy_(self.B)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in (q.data, q.scale, q.nested_scale,
                                                                       q.nested_offset) if t is not None)
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
        base4 = fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="zeropoint",
                                                 group_size=64 if K % 64 == 0 else None)
        self.layer_int4 = fastpeft.LoRALinear.from_linear(base4, r=R, lora_alpha=ALPHA)
        with torch.no_grad():
            self.layer_int4.lora_A.copy_(self.A)
            self.layer_int4.lora_B.copy_(self.B)
        q4 = base4.qweight
        self.int4_bytes = sum(t.numel() * t.element_size() for t in (q4.data, q4.scale, q4.zero_point))
        self.xg = self.x.clone().requires_grad_(True)
        self.Ag, self.Bg = self.A.clone().requires_grad_(True), self.B.clone().requires_grad_(True)
        self.A16 = self.A.to(dtype).requires_grad_(True)
        self.B16 = self.B.to(dtype).requires_grad_(True)

    def leaves(self, impl: str) -> list[torch.Tensor]:
        if impl == "peft":
            return [self.xg, self.peft.lora_A["default"].weight, self.peft.lora_B["default"].weight]
        if impl == "base":
            return [self.xg, self.A16, self.B16]
        if impl == "fastpeft[int4]":
            return [self.xg, self.layer_int4.lora_A, self.layer_int4.lora_B]
        if impl.startswith("fastpeft"):
            return [self.xg, self.layer.lora_A, self.layer.lora_B]
        return [self.xg, self.Ag, self.Bg]


def unfused(p: Problem, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """PEFT + bitsandbytes' arithmetic in fastpeft's kernels: the whole weight dequantized, a dense
    GEMM, then the LoRA path in the adapters' dtype (PEFT casts x to it) added in x's dtype."""
    import fastpeft
    W = fastpeft.dequantize(p.q).to(x.dtype)
    y = F.linear(x, W)
    return y + (F.linear(F.linear(x.to(A.dtype), A), B) * p.s).to(x.dtype)


def _reference_fp32(p: Problem) -> tuple[torch.Tensor, dict]:
    xr, Ar, Br = (t.float().requires_grad_(True) for t in (p.x, p.A, p.B))
    y = F.linear(xr, p.W_deq) + F.linear(F.linear(xr, Ar), Br) * p.s
    y.backward(p.dy.float())
    return y.detach(), {"dx": xr.grad, "dA": Ar.grad, "dB": Br.grad}


def _impls(mode: str, shape: dict, p0: Problem, elt: int, cuda: bool) -> list[common.Impl]:
    import fastpeft
    M, K, N = shape["M"], shape["K"], shape["N"]
    fwd = mode == "fwd"
    f, b = flops_bytes(mode, M, K, N, elt, p0.weight_bytes)
    f16, b16 = flops_bytes(mode, M, K, N, elt, elt * N * K)
    f4, b4 = flops_bytes(mode, M, K, N, elt, p0.int4_bytes)
    target = target_for(mode, M) if cuda else None

    def grads(name):
        return None if fwd else (lambda p: p.leaves(name))

    def call(fn):
        return fn if fwd else common.with_backward(fn)

    return [
        common.Impl("base", "base", call(lambda p: fastpeft.lora_linear(
            p.x if fwd else p.xg, p.W16, None, p.A16, p.B16, p.s)), grads=grads("base"), flops=f16, bytes=b16,
            check=False),
        common.Impl("unfused", "unfused", call(lambda p: unfused(p, p.x if fwd else p.xg, p.Ag, p.Bg)),
                    grads=grads("unfused"), flops=f, bytes=b),
        common.Impl("peft", "peer", call(lambda p: p.peft(p.x if fwd else p.xg)), error=p0.peft_error,
                    grads=grads("peft"), flops=f, bytes=b, capturable=False),
        common.Impl("fastpeft[auto]", "auto", call(lambda p: p.layer(p.x if fwd else p.xg)),
                    grads=grads("fastpeft[auto]"), flops=f, bytes=b, target=target),
        common.Impl("fastpeft[int4]", "other", call(lambda p: p.layer_int4(p.x if fwd else p.xg)),
                    grads=grads("fastpeft[int4]"), flops=f4, bytes=b4, check=False),
    ]


def _measure_shape(ctx, shape: dict, dtype, sets: list[Problem]) -> list[dict]:
    dname, elt = common.DTYPE_NAMES[dtype], dtype.itemsize
    p0 = sets[0]
    graph, _ = common.use_graphs(ctx, lambda p: F.linear(p.x, p.W16), sets)
    y_ref, grads_ref = _reference_fp32(p0)
    records = []
    for mode, want in (("fwd", {"y": y_ref}), ("fwdbwd", grads_ref)):
        impls = _impls(mode, shape, p0, elt, ctx.cuda)
        records += common.time_impls(ctx, BENCH, OP, mode, shape, dname, impls, sets, graph=graph, want=want)
    return records


def _meta(ctx, bnb_why: str, peft_why: str) -> None:
    ctx.bench_meta[BENCH] = {
        "peer": f"PEFT LoRA on bitsandbytes Linear4bit (nf4, double quant): {peft_why}; {bnb_why}",
        "r": R, "lora_alpha": ALPHA, "block_size": BLOCK, "double_quant": True, "adapters": "fp32",
        "base": "fastpeft.lora_linear on the bf16 (unquantized) weight",
    }


# ---------------------------------------------------------------------------------------------
# GPU


def run_gpu(ctx: common.Context) -> list[dict]:
    bnb_ok, bnb_why = bnb_status()
    peft_ok, peft_why = common.peft_status()
    _meta(ctx, bnb_why, peft_why)
    ms, kns = (QUICK["M"], QUICK["KN"]) if ctx.quick else (M_VALUES, KN_VALUES)
    shapes = [{"M": M, "K": K, "N": N, "r": R} for (K, N) in kns for M in ms]

    def measure_shape(shape):
        M, K, N = shape["M"], shape["K"], shape["N"]
        n = common.input_copies(N * K // 2 + 2 * (M * K + M * N))
        sets = [Problem(M, K, N, torch.bfloat16, ctx.device, 1000 + j, bnb_ok, peft_ok) for j in range(n)]
        return _measure_shape(ctx, shape, torch.bfloat16, sets)

    records = common.run_shapes(ctx, shapes, measure_shape, _placeholders, _describe)
    return records + train_step(ctx, TRAIN_QUICK if ctx.quick else TRAIN, bnb_ok and peft_ok,
                                peft_why if not peft_ok else bnb_why)


# ---------------------------------------------------------------------------------------------
# GPU, end to end: a QLoRA training step of a Llama-shaped model

TRAIN = dict(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=4, vocab=32000, batch=4, seq=512)
TRAIN_QUICK = dict(TRAIN, layers=2)
TRAIN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_OP = "qlora_train_step"


def _llama(cfg: dict, device: torch.device) -> torch.nn.Module:
    """A bf16 LlamaForCausalLM from ``cfg`` with seeded random weights (built on ``device``)."""
    import transformers
    c = transformers.LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"],
                                 intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
                                 num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                                 max_position_embeddings=cfg["seq"])
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(c).to(torch.bfloat16)


def _bnb_model(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's QLoRA: every nn.Linear but the LM head replaced by bitsandbytes' Linear4bit (nf4,
    double quantization, bf16 compute) over the same weight, then PEFT's LoRA on TRAIN_TARGETS."""
    from peft import LoraConfig, get_peft_model
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                setattr(mod, child_name, bnb_layer(child.weight, torch.bfloat16))
    model.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TRAIN_TARGETS))


def _train_variants(peer_ok: bool, peer_why: str) -> list[tuple[str, str, object, str | None]]:
    """(impl, role, prepare(bf16 model) -> model to train, error) of the training-step comparison."""
    import fastpeft

    def lora(m):
        return fastpeft.inject_lora(m, TRAIN_TARGETS, r=R, lora_alpha=ALPHA)

    def qlora(m):
        fastpeft.quantize_model(m, weights="nf4", double_quant=True, compute_dtype=torch.bfloat16, skip=("lm_head",))
        return lora(m)

    return [("bf16 LoRA", "base", lora, None), ("peft", "peer", _bnb_model, None if peer_ok else peer_why),
            ("fastpeft[auto]", "auto", qlora, None)]


def train_step(ctx: common.Context, cfg: dict, peer_ok: bool, peer_why: str) -> list[dict]:
    """One record per variant (``_train_variants``): ms a step (``common.measure``: do_bench on the
    GPU), tokens/s, peak memory of one more step (CUDA only) and the first step's loss."""
    shape = {"layers": cfg["layers"], "hidden": cfg["hidden"], "tokens": cfg["batch"] * cfg["seq"], "r": R}
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=torch.Generator().manual_seed(1))
    ids = ids.to(ctx.device)
    ctx.log(f"qlora: training step, Llama {cfg['layers']} x {cfg['hidden']} / {cfg['intermediate']}, "
            f"{shape['tokens']} tokens")
    records = []
    float_model = _llama(cfg, ctx.device)  # each variant starts from a copy of it
    source_bytes = sum(t.numel() * t.element_size() for t in (*float_model.parameters(), *float_model.buffers()))
    for impl, role, prepare, error in _train_variants(peer_ok, peer_why):
        if error is not None:
            records.append(timing_record(BENCH, TRAIN_OP, "step", shape, "bf16", impl, role, error=error))
            continue
        try:
            model = prepare(copy.deepcopy(float_model)).train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step(model=model, opt=opt):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            first_loss = float(step().detach())
            m = common.measure(step, ctx)
            peak = None
            if ctx.device.type == "cuda":
                ctx.sync()
                torch.cuda.reset_peak_memory_stats()
                step()
                ctx.sync()
                peak = (torch.cuda.max_memory_allocated() - source_bytes) / 2**30  # the source model not counted
            tps = shape["tokens"] / (m.ms / 1e3) if m.ms else None
            records.append(timing_record(BENCH, TRAIN_OP, "step", shape, "bf16", impl, role, m,
                                         tokens_per_s=tps, peak_mem_gib=peak, first_loss=first_loss,
                                         trainable=sum(p.numel() for p in params)))
            ctx.log(f"  {impl}: {common._f(m.ms, '.1f')} ms a step, {common._f(tps, ',.0f')} tokens/s, "
                    f"peak {common._f(peak, '.2f')} GiB, first loss {first_loss:.4f}")
        except common.Interrupted:
            raise
        except Exception as exc:  # e.g. out of memory: record, go on
            records.append(timing_record(BENCH, TRAIN_OP, "step", shape, "bf16", impl, role,
                                         error=f"failed: {common.short_error(exc)}"))
        finally:
            model = opt = step = None  # step's defaults hold the model: the next variant's peak must not count it
            ctx.empty_cache()
    return records


def _placeholders(shape: dict, error: str) -> list[dict]:
    return [timing_record(BENCH, OP, mode, shape, "bf16", "fastpeft[auto]", "auto", error=error)
            for mode in ("fwd", "fwdbwd")]


def _describe(p: dict) -> str:
    return (f"{common._f(p.get('ratio_vs_base'), '.2f')}x bf16 LoRA, "
            f"{common._f(p.get('speedup_vs_peer'), '.2f')}x vs PEFT+bnb")


# ---------------------------------------------------------------------------------------------
# CPU: the torch path's timing (correctness: tests/test_qlora.py, tests/test_nf4_linear.py)


def run_cpu(ctx: common.Context) -> list[dict]:
    import fastpeft
    with fastpeft.use_backend("torch"):  # the CPU path (under TRITON_INTERPRET "auto" would take the interpreter)
        return _run_cpu(ctx)


def _run_cpu(ctx: common.Context) -> list[dict]:
    bnb_ok, bnb_why = bnb_status()
    peft_ok, peft_why = common.peft_status()
    _meta(ctx, bnb_why, peft_why)
    ctx.log("qlora: CPU timings (fp32, torch path; the peer is PEFT on bitsandbytes' CPU Linear4bit)")
    records: list[dict] = []
    for (M, K, N) in CPU_SHAPES[:1] if ctx.quick else CPU_SHAPES:
        shape = {"M": M, "K": K, "N": N, "r": R}
        sets = [Problem(M, K, N, torch.float32, ctx.device, 99, bnb_ok, peft_ok)]
        recs = _measure_shape(ctx, shape, torch.float32, sets)
        common.log_cpu_timings(ctx, recs)
        records += recs
        ctx.save_partial(records)
    return records
