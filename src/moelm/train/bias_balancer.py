"""Aux-loss-free balancing (DeepSeek-V3): after each optimizer step, nudge every expert's selection bias
toward the mean load. Training machinery: it hooks the optimizer and all-reduces counts across data-parallel
ranks; the model only exposes the per-layer counts it reads (`Routing.tokens_per_expert_E`) and the bias
buffers it updates (`MoELM.balancing_biases`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from moelm.model.router import Routing
from moelm.model.transformer import MoELM


class BiasBalancer:
    """Aux-loss-free balancing: b_i += gamma * sign(mean load - load_i) once per optimizer step.

    Feed it every micro-batch's `MoELMOutput.routing` with `observe`; `step()` (or the hook from
    `register(optimizer)`) applies the update from the counts accumulated since the last step, summed over
    data-parallel ranks when torch.distributed is initialised, then resets them. Counts come from returned
    routing values, so activation-checkpoint recomputation cannot double them.
    """

    def __init__(
        self, model: MoELM, rate: float, centered: bool = False, group: dist.ProcessGroup | None = None
    ) -> None:
        self.rate = rate
        self.centered = centered
        self.group = group  # the ranks that split each batch (a pipeline stage's ranks hold the same layers)
        self.biases: dict[int, torch.Tensor] = model.balancing_biases()
        self.counts: dict[int, torch.Tensor] = {}

    def observe(self, routing: Mapping[int, Routing]) -> None:
        """Add one micro-batch's (padding-free) assignment counts."""
        with torch.no_grad():
            for layer_idx, layer_routing in routing.items():
                if layer_idx not in self.biases:
                    continue
                counts = layer_routing.tokens_per_expert_E.detach().float()
                previous = self.counts.get(layer_idx)
                self.counts[layer_idx] = counts if previous is None else previous + counts

    @torch.no_grad()
    def step(self) -> dict[int, torch.Tensor]:
        """Apply one update per layer from the accumulated counts; returns the updates applied."""
        updates = {}
        for layer_idx, counts in self.counts.items():
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts, group=self.group)
            update = self.rate * torch.sign(counts.mean() - counts)
            if self.centered:
                update = update - update.mean()
            self.biases[layer_idx].add_(update.to(self.biases[layer_idx].device))
            updates[layer_idx] = update
        self.counts = {}
        return updates

    def register(self, optimizer: torch.optim.Optimizer):  # noqa: ANN201 - torch's RemovableHandle
        """Run `step()` after every `optimizer.step()`; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.step())
