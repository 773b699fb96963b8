"""LoRA inputs and the check of fastpeft.lora_linear against the float64 reference (output and every
gradient), for test_lora_op.py and test_lora_random.py."""
import torch

import fastpeft
from fastpeft import _backend
from fastpeft.reference import lora as ref

from _dtypes import DTYPES  # noqa: F401 (the tests' dtypes: bf16 on the CPU too)
from _utils import DEVICE, assert_close

KERNEL_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" and _backend.cuda_ext_status()[0] else [])


def make(M, K, N, r, dtype, bias=True, lead=(), adapter_dtype=None, device=DEVICE):
    g = torch.Generator().manual_seed(1000 * M + 10 * K + N + r)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    adt = adapter_dtype or dtype
    x = rnd(*lead, M, K).to(device, dtype).requires_grad_()
    w = (rnd(N, K) / K ** 0.5).to(device, dtype)
    b = rnd(N).to(device, dtype) if bias else None
    A = (rnd(r, K) / K ** 0.5).to(device, adt).requires_grad_()
    B = (rnd(N, r) / r ** 0.5).to(device, adt).requires_grad_()
    return x, w, b, A, B


def check_against_reference(x, w, b, A, B, s, p, seed, backend, dtype, **kw):
    y = fastpeft.lora_linear(x, w, b, A, B, s, dropout_p=p, training=True, seed=seed, backend=backend, **kw)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(y.device)
    y.backward(dy.to(y.dtype))
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, A, B)]
    yr = ref.lora_linear(leaves[0], w.cpu().double(), None if b is None else b.cpu().double(),
                         leaves[1], leaves[2], s, p, seed)
    yr.backward(dy.cpu())
    assert_close("y", y, yr, dtype)
    for name, t, leaf in zip(("dx", "dA", "dB"), (x, A, B), leaves):
        assert t.grad is not None, f"{name} missing"
        assert t.grad.dtype == t.dtype
        assert_close(name, t.grad, leaf.grad, dtype)
