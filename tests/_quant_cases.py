"""Quantized weights and inputs for the quant_linear tests (test_qlinear.py, test_act_quant.py), and
the float64 reference dequantize of their codes."""
import torch

import fastpeft
from fastpeft.ops.quant import QuantizedTensor
from fastpeft.reference import quant as ref

from _utils import DEVICE

OUT = 40  # not a multiple of the kernel's N tile


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_qweight(N, K, bits, scheme, group_size, axis, seed=0):
    w = torch.randn(N, K, generator=_gen(seed + N + K), dtype=torch.float32) / K ** 0.5
    w[0, :] = 0.0  # an all-zero row: scale 1, exact zeros
    return fastpeft.quantize(w.to(DEVICE), bits, scheme, axis=axis, group_size=group_size, backend="torch")


def w_deq64(qw: QuantizedTensor) -> torch.Tensor:
    """The reference dequantize of the codes, in float64."""
    data = qw.data.cpu()
    q = ref.unpack4(data, qw.shape[-1], qw.scheme == "absmax") if qw.bits == 4 else data.to(torch.int32)
    return ref.dequantize_codes(q, qw.scale.cpu(), qw.zero_point.cpu(), qw.axis, qw.group_size).double()


def expected(x, qw, bias):
    y = x.detach().cpu().double() @ w_deq64(qw).t()
    return y if bias is None else y + bias.detach().cpu().double()


def make_x(M, K, dtype, seed=1):
    return torch.randn(M, K, generator=_gen(seed + M * 7 + K), dtype=torch.float32).to(DEVICE, dtype)
