"""Weight-only int8 for decode: each output channel of a projection stored as int8 with one float32 scale.

Decode at batch 1 reads every active weight once per token, so its speed is the bytes it reads; int8 reads a
quarter of float32's. The compiled decode step multiplies the int8 values inside the fused multiply-reduce that
streams them (moelm.model.kernels.cpu), so nothing is widened in memory. Quantised: attention projections except
`kv_b_proj` (the absorbed attention reads it as a matrix, not through a linear), dense and shared SwiGLUs, the
routed expert banks and an untied output head. Kept in float: embeddings (a lookup), norms, the router (its
top-k is the model's most precision-sensitive decision) and `kv_b_proj`. Inference only: nothing trains or saves
an int8 model.
"""

from __future__ import annotations

import torch

from moelm.model.experts import RoutedExperts
from moelm.model.layers import Linear
from moelm.model.transformer import MoELM

QUANTIZATIONS = ("int8",)


def int8_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per output channel) with each channel's largest magnitude mapped to 127."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    values = (weight / scale.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return values, scale


@torch.no_grad()
def quantize_int8(model: MoELM) -> MoELM:
    """Replace the model's projection weights by int8 channels in place (see the module docstring)."""
    if model.training:
        raise ValueError("int8 weights are for inference: call model.eval() first")
    tied = model.config.tie_word_embeddings
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.weight.dtype != torch.int8:
            if name.endswith("kv_b_proj") or (tied and name == "lm_head"):
                continue
            values, scale = int8_channels(module.weight)
            module.weight = torch.nn.Parameter(values, requires_grad=False)
            module.weight_scale = scale
        elif isinstance(module, RoutedExperts) and module.gate_up_scale is None:
            values, module.gate_up_scale = int8_channels(module.gate_up_proj)
            module.gate_up_proj = torch.nn.Parameter(values, requires_grad=False)
            values, module.down_scale = int8_channels(module.down_proj)
            module.down_proj = torch.nn.Parameter(values, requires_grad=False)
    return model


def is_quantized(model: MoELM) -> bool:
    """Whether any weight of the model is int8."""
    return any(p.dtype == torch.int8 for p in model.parameters())
