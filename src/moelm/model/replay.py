"""Routing replay and routing drift: reuse the experts an earlier forward chose for the same tokens.

In RL the rollout and the training forward of the same tokens can route them to different experts (the policy
moved, the balancing biases moved, the batch or precision differs), so the importance ratio compares two
different sub-networks. `replay_routing` makes a forward reuse recorded expert ids (gate weights recomputed, so
the router still learns); `routed_experts` records them from a forward's output, and `drift` measures how often
two records disagree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from moelm.model.moe import MoE
from moelm.model.router import Routing


def moe_layers(model: nn.Module) -> dict[int, MoE]:
    """The trunk's MoE feed-forward layers by layer index (MTP blocks are not replayed)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("routing replay needs a MoELM (a model with .layers)")
    return {i: block.mlp for i, block in enumerate(layers) if isinstance(block.mlp, MoE)}


def routed_experts(
    routing: Mapping[int, Routing], batch: int, layers: list[int], natural: bool = False
) -> torch.Tensor:
    """Each token's selected experts as [B, L, T, k] (int16), layers in the given order, from a forward's
    `out.routing` over a [B, T] batch; sorted along k so that equal sets compare equal. `natural`: under routing
    replay, the experts each router would have chosen instead of the replayed ones."""
    stacked = []
    for layer in layers:
        chosen = routing[layer].natural_ids_TK if natural else None
        ids = (routing[layer].expert_ids_TK if chosen is None else chosen).sort(dim=-1).values
        stacked.append(ids.view(batch, -1, ids.shape[-1]))
    return torch.stack(stacked, dim=1).to(torch.int16)


@contextmanager
def replay_routing(model: nn.Module, experts_BLTK: torch.Tensor) -> Iterator[None]:
    """Within the block, every forward of `model` over a [B, T] batch selects the recorded experts."""
    layers = moe_layers(model)
    if experts_BLTK.shape[1] != len(layers):
        raise ValueError(f"routing replay holds {experts_BLTK.shape[1]} MoE layers; the model has {len(layers)}")
    for position, layer in enumerate(layers.values()):
        layer.replay_BTK = experts_BLTK[:, position]
    try:
        yield
    finally:
        for layer in layers.values():
            layer.replay_BTK = None


def drift(first_BLTK: torch.Tensor, second_BLTK: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Per layer [L], the share of masked tokens whose selected expert sets differ between two records."""
    differs = (first_BLTK.sort(dim=-1).values != second_BLTK.sort(dim=-1).values).any(dim=-1)  # [B, L, T]
    weights = mask_BT.to(torch.float32).unsqueeze(1)
    return (differs.float() * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2)).clamp(min=1)
