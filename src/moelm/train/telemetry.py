"""Router telemetry: per-layer load statistics as flat named scalars, and a collapse warning.

Loggers write the flat dict as is (`moe/layer3/load_max_over_mean`, `moe/dropped_frac`, ...); the collapse
monitor watches max/mean load over steps because one skewed batch is noise but a skew that persists is an
expert collapse in the making.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from moelm.model.router import Routing


def layer_metrics(routing: Routing) -> dict[str, float]:
    """Load, idle, entropy, dropped fraction and loss values of one MoE layer's routing."""
    counts = routing.tokens_per_expert_E.detach().float()
    mean_load = counts.mean().clamp(min=1e-9)
    probs = routing.scores_TE.detach().float()
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    entropy_T = -(probs * probs.clamp(min=1e-20).log()).sum(dim=-1)
    mask = routing.token_mask_T
    if mask is not None:
        entropy = (entropy_T * mask).sum() / mask.sum().clamp(min=1)
    else:
        entropy = entropy_T.mean()
    dropped = 0.0
    if routing.dropped_TK is not None:
        dropped_TK = routing.dropped_TK if mask is None else routing.dropped_TK & mask.unsqueeze(-1)
        dropped = dropped_TK.sum().item() / max(counts.sum().item(), 1.0)
    metrics = {
        "load_max_over_mean": (counts.max() / mean_load).item(),
        "idle_frac": (counts == 0).float().mean().item(),
        "routing_entropy": entropy.item(),
        "dropped_frac": dropped,
    }
    metrics.update({name: value.detach().float().item() for name, value in routing.losses.items()})
    return metrics


def routing_metrics(
    routing: Mapping[int, Routing], model: nn.Module | None = None, per_expert: bool = True
) -> dict[str, float]:
    """Flat `moe/layer{i}/...` scalars plus model-wide means `moe/...`; bias statistics when a model is given;
    `per_expert=False` leaves out the tokens-per-expert counts (E scalars per layer)."""
    flat: dict[str, float] = {}
    per_name: dict[str, list[float]] = {}
    for layer_idx, layer_routing in sorted(routing.items()):
        for name, value in layer_metrics(layer_routing).items():
            flat[f"moe/layer{layer_idx}/{name}"] = value
            per_name.setdefault(name, []).append(value)
        if per_expert:
            counts = layer_routing.tokens_per_expert_E.detach().float().tolist()
            for expert, count in enumerate(counts):
                flat[f"moe/layer{layer_idx}/tokens_expert{expert}"] = count
    for name, values in per_name.items():
        flat[f"moe/{name}"] = sum(values) / len(values)
    if model is not None:
        biases = [
            module.e_score_correction_bias.detach().float()
            for module in model.modules()
            if hasattr(module, "e_score_correction_bias")
        ]
        if biases:
            stacked = torch.cat(biases)
            flat["moe/bias_abs_mean"] = stacked.abs().mean().item()
            flat["moe/bias_min"] = stacked.min().item()
            flat["moe/bias_max"] = stacked.max().item()
    return flat


class CollapseMonitor:
    """Warns when a layer's max/mean load stays above `threshold` for `patience` consecutive steps."""

    def __init__(self, threshold: float = 4.0, patience: int = 50) -> None:
        self.threshold = threshold
        self.patience = patience
        self.streaks: dict[int, int] = {}
        self.warned: set[int] = set()

    def update(self, routing: Mapping[int, Routing]) -> list[int]:
        """Record one step; returns the layers that just crossed `patience` (and warns about them)."""
        fired = []
        for layer_idx, layer_routing in routing.items():
            counts = layer_routing.tokens_per_expert_E.detach().float()
            ratio = (counts.max() / counts.mean().clamp(min=1e-9)).item()
            streak = self.streaks.get(layer_idx, 0) + 1 if ratio > self.threshold else 0
            self.streaks[layer_idx] = streak
            if streak == self.patience:
                fired.append(layer_idx)
                warnings.warn(
                    f"MoE layer {layer_idx}: max/mean expert load above {self.threshold} for {streak} steps "
                    f"(now {ratio:.2f}); the router may be collapsing",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return fired
