"""The MoE feed-forward layer: router -> routed experts -> weighted combine, plus always-on shared experts."""

from __future__ import annotations

import torch
from torch import nn

from moelm.config import ModelConfig
from moelm.model.experts import RoutedExperts
from moelm.model.layers import SwiGLU
from moelm.model.router import Router, Routing


class MoE(nn.Module):
    """y = sum_k w_k * Expert_k(x) + Shared(x); returns the output and the layer's Routing for reports."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts > 0
            else None
        )

    def forward(self, x_BTH: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        x_TH = x_BTH.reshape(-1, x_BTH.shape[-1])
        routing = self.gate(x_TH)
        y_TH = self.experts(x_TH, routing)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH.view_as(x_BTH), routing
