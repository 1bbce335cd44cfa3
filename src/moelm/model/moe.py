"""The MoE feed-forward layer: router -> routed experts -> weighted combine, plus always-on shared experts."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelm.config import ModelConfig, MoEOptions
from moelm.model.balance import capacity, capacity_drops, cv_squared, router_z_loss, sequence_balance_loss, switch_loss
from moelm.model.experts import RoutedExperts
from moelm.model.layers import SwiGLU
from moelm.model.router import Router, Routing


class MoE(nn.Module):
    """y = sum_k w_k * Expert_k(x) + Shared(x); returns the output and the layer's Routing (with its losses)."""

    def __init__(self, config: ModelConfig, options: MoEOptions | None = None) -> None:
        super().__init__()
        self.config = config
        self.options = options = options or MoEOptions()
        self.gate = Router(config, options.load_loss_coef)
        self.experts = RoutedExperts(config, options.expert_backend)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts > 0
            else None
        )
        self.checkpoint_ffn = options.activation_checkpointing == "moe"
        # Routing replay (RL): experts chosen by an earlier forward of the same tokens, [B, T, k]; set and cleared
        # by moelm.model.replay.replay_routing around one forward.
        self.replay_BTK: torch.Tensor | None = None

    def forward(self, x_BTH: torch.Tensor, token_mask_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:
        hidden = x_BTH.shape[-1]
        x_TH = x_BTH.reshape(-1, hidden)
        batch = x_BTH.shape[0] if x_BTH.dim() == 3 else 1  # [T, H] input: one sequence
        seq_len = x_TH.shape[0] // batch
        token_mask_T = None if token_mask_BT is None else token_mask_BT.reshape(-1).bool()
        routing = self._route(x_TH, token_mask_T)
        routing = routing.with_layer_results(
            routing.dropped_TK, self._balance_losses(routing, batch, seq_len, token_mask_BT)
        )
        if self.checkpoint_ffn and self.training and torch.is_grad_enabled():
            y_TH = checkpoint(self._ffn, x_TH, routing, use_reentrant=False)
        else:
            y_TH = self._ffn(x_TH, routing)
        return y_TH.view_as(x_BTH), routing

    def _route(self, x_TH: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> Routing:
        """The router's choice, with over-capacity assignments marked when a capacity factor applies."""
        replay = None if self.replay_BTK is None else self.replay_BTK.reshape(-1, self.gate.top_k)
        if replay is not None and replay.shape[0] != x_TH.shape[0]:
            raise ValueError(f"routing replay holds {replay.shape[0]} tokens for a forward of {x_TH.shape[0]}")
        routing = self.gate(x_TH, token_mask_T, replay)
        capacity_factor = self.options.capacity_factor if self.training else self.options.eval_capacity_factor
        if capacity_factor is None:
            return routing
        slots = capacity(x_TH.shape[0], self.gate.num_experts, self.gate.top_k, capacity_factor)
        return routing.with_layer_results(capacity_drops(routing.expert_ids_TK, self.gate.num_experts, slots), {})

    def decode(self, x_BTH: torch.Tensor) -> torch.Tensor:
        """The layer for a captured decode graph: fixed shapes, no balance losses (inference only)."""
        x_TH = x_BTH.reshape(-1, x_BTH.shape[-1])
        routing = self._route(x_TH)
        y_TH = self.experts.decode(x_TH, routing)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH.view_as(x_BTH)

    def _ffn(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        y_TH = self.experts(x_TH, routing)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH

    def _balance_losses(
        self, routing: Routing, batch: int, seq_len: int, token_mask_BT: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The configured auxiliary losses of this layer, each already multiplied by its coefficient."""
        config, losses = self.options, {}
        mask_T = routing.token_mask_T
        if config.aux_loss_alpha > 0:
            losses["aux_loss"] = config.aux_loss_alpha * switch_loss(routing.logits_TE, routing.expert_ids_TK, mask_T)
        if config.seq_aux_loss_alpha > 0:
            losses["seq_aux_loss"] = config.seq_aux_loss_alpha * sequence_balance_loss(
                routing.scores_TE.view(batch, seq_len, -1),
                routing.expert_ids_TK.view(batch, seq_len, -1),
                token_mask_BT,
            )
        if config.router_z_loss_coef > 0:
            losses["z_loss"] = config.router_z_loss_coef * router_z_loss(routing.logits_TE, mask_T)
        if config.importance_loss_coef > 0:
            gates_TK = routing.weights_TK if mask_T is None else routing.weights_TK * mask_T.unsqueeze(-1)
            importance = torch.zeros(self.gate.num_experts, device=gates_TK.device, dtype=gates_TK.dtype)
            importance = importance.scatter_add(0, routing.expert_ids_TK.flatten(), gates_TK.flatten())
            losses["importance_loss"] = config.importance_loss_coef * cv_squared(importance)
        return losses
