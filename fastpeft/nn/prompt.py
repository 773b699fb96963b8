"""The soft prompt of prompt tuning (Lester et al., 2021): num_virtual_tokens trainable
embeddings prepended to a sequence of token embeddings."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks


class PromptTuning(nn.Module):
    """A soft prompt P [num_virtual_tokens, embedding_dim] (a Parameter, ``.weight``).

    forward(inputs_embeds [B, n, D]) -> cat([P, ..., P], inputs_embeds) [B, T + n, D]: P is
    repeated over the batch and cast to inputs_embeds' dtype (P itself stays in its own dtype,
    float32 by default, as PEFT keeps it).

    init: "random" draws P ~ N(0, 1), which is PEFT's RANDOM init (nn.Embedding's default), from
    ``generator`` or the global RNG; a floating tensor [num_virtual_tokens, embedding_dim] (e.g.
    token embeddings) is copied.
    """

    def __init__(self, num_virtual_tokens: int, embedding_dim: int, init: str | torch.Tensor = "random", *,
                 generator: torch.Generator | None = None, device=None, dtype=None):
        super().__init__()
        self.num_virtual_tokens = _checks.positive_int("num_virtual_tokens", num_virtual_tokens)
        self.embedding_dim = _checks.positive_int("embedding_dim", embedding_dim)
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in _checks.FLOAT_DTYPES and dtype != torch.float64:
            raise TypeError(f"PromptTuning dtype must be floating point, got {dtype}")
        shape = (self.num_virtual_tokens, self.embedding_dim)
        if isinstance(init, str):
            if init != "random":
                raise ValueError(f"PromptTuning init must be 'random' or a tensor of shape {shape}, got {init!r}")
            gen_device = generator.device if generator is not None else "cpu"
            weight = torch.randn(shape, generator=generator, device=gen_device)
        elif isinstance(init, torch.Tensor):
            if not init.is_floating_point():
                raise TypeError(f"PromptTuning init tensor must be floating point, got {init.dtype} "
                                f"(token ids go through fastpeft.add_prompt_tuning)")
            if tuple(init.shape) != shape:
                raise ValueError(f"PromptTuning init tensor has shape {tuple(init.shape)} but the prompt is "
                                 f"[num_virtual_tokens, embedding_dim] = {shape}")
            weight = init.detach()
        else:
            raise TypeError(f"PromptTuning init must be 'random' or a tensor, got {type(init).__name__}")
        if device is None and isinstance(init, torch.Tensor):
            device = init.device
        self.weight = nn.Parameter(weight.to(device=device, dtype=dtype, copy=True))

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        _checks.tensor("inputs_embeds", inputs_embeds, ndim=3)
        if inputs_embeds.shape[-1] != self.embedding_dim:
            raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)} but the prompt has "
                             f"embedding_dim {self.embedding_dim}")
        _checks.same_device(inputs_embeds=inputs_embeds, prompt=self.weight)
        prompt = self.weight.to(inputs_embeds.dtype).unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)
        return torch.cat((prompt, inputs_embeds), dim=1)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, embedding_dim={self.embedding_dim}"
