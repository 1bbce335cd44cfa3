"""FP8 block-scaled weights as DeepSeek publishes V3 / R1: `float8_e4m3fn` tensors with a float32
`weight_scale_inv` per block of `weight_block_size` (128 x 128; edge blocks partial), so weight = fp8 * scale.

Dequantisation happens per tensor as it is read, so a checkpoint is never held twice in memory; quantisation
writes the same format back so a fine-tuned model round-trips.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448 for e4m3
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


class FP8FormatError(ValueError):
    """An FP8 tensor whose scales are missing or do not match the block size; the message names the tensor."""


def quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, object]:
    """The `quantization_config` entry of config.json that DeepSeek's FP8 checkpoints carry."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def block_size(hf_config: dict[str, object]) -> tuple[int, int] | None:
    """The weight block size of an FP8 checkpoint's config.json, or None for an unquantised one."""
    quant = hf_config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size") or list(DEFAULT_BLOCK)
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise FP8FormatError(f"quantization_config.weight_block_size={block!r}: expected two positive integers")
    return int(block[0]), int(block[1])


def _expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return scale.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]


def dequantize(name: str, weight: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int]) -> torch.Tensor:
    """float32 weight from an FP8 tensor and its per-block scales, checking the scales' shape."""
    if scale is None:
        raise FP8FormatError(f"FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r} (block scales)")
    if weight.dim() != 2:
        raise FP8FormatError(f"FP8 tensor {name!r} has shape {tuple(weight.shape)}: block scaling needs 2-D weights")
    expected = (math.ceil(weight.shape[0] / block[0]), math.ceil(weight.shape[1] / block[1]))
    if tuple(scale.shape) != expected:
        raise FP8FormatError(
            f"{name + SCALE_SUFFIX!r} has shape {tuple(scale.shape)}, expected {expected} for a {tuple(weight.shape)} "
            f"weight in {block[0]}x{block[1]} blocks (wrong weight_block_size?)"
        )
    return weight.float() * _expand(scale.float(), weight.shape, block)


def quantize(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale per block) with each block's largest magnitude mapped to the FP8 maximum."""
    weight = weight.float()
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = weight.new_zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight
    blocks = padded.view(grid[0], block[0], grid[1], block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantized = (weight / _expand(scale, weight.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def is_quantized_weight(hf_name: str, tensor: torch.Tensor) -> bool:
    """Which tensors DeepSeek stores in FP8: the 2-D projection weights (not embeddings, head, norms, router)."""
    return tensor.dim() == 2 and hf_name.endswith("proj.weight") and "shared_head" not in hf_name
