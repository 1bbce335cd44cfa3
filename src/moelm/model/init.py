"""Seeded initialisation that does not depend on how the model is laid out: one random stream per tensor.

`MoELM.__init__` draws every weight from the global generator in module order, so the values of a tensor depend
on everything built before it, and a rank that holds a slice of the model cannot produce its slice without
drawing the whole model. Here each tensor draws from its own generator, seeded from the run's seed and the
tensor's name, and each routed expert from one of its own (seed, name, expert index): a rank fills only the
rows it keeps (a dense tensor is drawn whole, one tensor at a time, then cut; an expert bank only for the
experts the rank holds), and a one-process run, a 4-rank FSDP run and an expert-parallel run start from the same
weights. The distributions are `MoELM.init_weights`'s: Normal(0, initializer_range) for projections,
embeddings, experts and router, ones for norms, zeros for biases and the router's noise weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from moelm.model.experts import RoutedExperts
from moelm.model.layers import RMSNorm, RotaryEmbedding
from moelm.model.router import Router


class LocalRows(NamedTuple):
    """Where a rank's piece of a tensor sits in the whole: the local tensor holds rows [start, start + n) of a
    tensor of `global_shape` (every layout moelm uses cuts dimension 0 only)."""

    local: torch.Tensor
    global_shape: torch.Size
    start: int


LocalRowsFn = Callable[[str, torch.Tensor], LocalRows]


def whole(name: str, tensor: torch.Tensor) -> LocalRows:
    """The layout of one process: every tensor is whole."""
    return LocalRows(tensor.data, tensor.shape, 0)


def stream_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one tensor (or one expert of a bank) from the run's seed and its name."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _normal(shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)


def _rules(model: nn.Module) -> dict[str, str]:
    """'normal' | 'ones' | 'zeros' | 'experts' for every parameter name."""
    rules = {}
    for prefix, module in model.named_modules():
        for name, _ in module.named_parameters(prefix=prefix, recurse=False):
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, RoutedExperts):
                rules[name] = "experts"
            elif isinstance(module, RMSNorm):
                rules[name] = "ones"
            elif leaf in ("bias", "noise_weight"):
                rules[name] = "zeros"
            else:
                rules[name] = "normal"
    return rules


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int, std: float, local_rows: LocalRowsFn = whole) -> None:
    """Fill every parameter (this rank's rows of it, as `local_rows` says) and reset the buffers."""
    rules = _rules(model)
    for name, param in model.named_parameters():
        rule, place = rules[name], local_rows(name, param)
        local, rows = place.local, place.local.shape[0] if place.local.dim() else 0
        if rule == "ones":
            local.fill_(1.0)
        elif rule == "zeros":
            local.zero_()
        elif rule == "experts":
            for row in range(rows):
                expert = place.start + row
                local[row].copy_(_normal(place.global_shape[1:], std, stream_seed(seed, name, expert)))
        else:
            full = _normal(place.global_shape, std, stream_seed(seed, name))
            local.copy_(full[place.start : place.start + rows] if local.dim() else full)
    reset_buffers(model)


@torch.no_grad()
def reset_buffers(model: nn.Module) -> None:
    """Buffers a model built on the meta device and moved with `to_empty` holds as garbage: routing biases start
    at zero, rotary tables are recomputed from the config."""
    for module in model.modules():
        if isinstance(module, Router):
            module.e_score_correction_bias.zero_()
        elif isinstance(module, RotaryEmbedding):
            dim = module.inv_freq.shape[0] * 2
            module.inv_freq.copy_(RotaryEmbedding(model.config, dim).inv_freq)
