"""Building blocks shared by attention and feed-forward layers: RMSNorm, SwiGLU, RoPE with YaRN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moelm.config import ModelConfig
from moelm.model.kernels.cpu import linear


class Linear(nn.Linear):
    """nn.Linear routed through `linear` so CPU bf16 models stay fast; same parameters and state dict, plus a
    per-output-channel `weight_scale` once the weight is int8 (moelm.model.quantize), and an optional low-rank
    `adapter` whose output is added to the product (moelm.model.lora; None keeps the plain layer)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Linear's signature
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None)
        self.adapter: nn.Module | None = None

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # random init of a meta tensor costs seconds of torch._refs import, for nothing
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias, self.weight_scale)
        if self.adapter is not None:
            out = out + self.adapter(x)
        return out

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by: with an adapter, the weight plus its low-rank update (for code
        that reads the weight itself instead of calling the layer, as MLA's absorbed decode does)."""
        if self.adapter is None:
            return self.weight
        return self.weight + self.adapter.delta().to(self.weight.dtype)


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device (loading builds there, then reads weights)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def init_normal_(tensor: torch.Tensor, std: float) -> None:
    """Normal(0, std) init in place, skipped for meta tensors (they hold no data to fill)."""
    if not tensor.is_meta:
        nn.init.normal_(tensor, std=std)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, then scaled, as DeepSeek and HF do."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class SwiGLU(nn.Module):
    """Dense gated FFN down(silu(gate(x)) * up(x)); gate and up share one GEMM (rows: gate first)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1, else 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(config: ModelConfig, dim: int) -> torch.Tensor:
    """Blend interpolated and original frequencies with a linear ramp between the YaRN correction dims."""
    rs = config.rope_scaling or {}
    base = config.rope_theta
    factor = float(rs["factor"])
    original_len = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep_original = 1 - ramp
    return interpolation * (1 - keep_original) + extrapolation * keep_original


def rope_attention_factor(config: ModelConfig) -> float:
    """Scale applied to cos/sin under YaRN (HF convention: mscale / mscale_all_dim, else mscale(factor))."""
    if config.rope_type != "yarn":
        return 1.0
    rs = config.rope_scaling or {}
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    factor = float(rs["factor"])
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def softmax_scale(config: ModelConfig, head_dim: int) -> float:
    """head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's long-context fix)."""
    scale = head_dim**-0.5
    if config.rope_type == "yarn":
        mscale_all_dim = (config.rope_scaling or {}).get("mscale_all_dim")
        if mscale_all_dim:
            scale *= yarn_mscale(float(config.rope_scaling["factor"]), mscale_all_dim) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables for interleaved-pair RoPE, with optional YaRN frequency scaling."""

    def __init__(self, config: ModelConfig, dim: int) -> None:
        super().__init__()
        with torch.device("cpu"):  # a few floats, computed for real even when the model is built on meta
            if config.rope_type == "yarn":
                inv_freq = _yarn_inv_freq(config, dim)
            else:
                inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = rope_attention_factor(config)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [B, T, dim/2] for the given positions."""
        angles = position_ids[..., None].float() * self.inv_freq.float()
        cos = (angles.cos() * self.attention_factor).to(dtype)
        sin = (angles.sin() * self.attention_factor).to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x [B, T, heads, dim] by cos/sin [B, T, dim/2]."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rotated.flatten(-2)
