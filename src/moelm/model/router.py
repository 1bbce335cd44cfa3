"""The router: which experts each token goes to, and with what combine weight.

Follows DeepSeek-V3's "noaux_tc" routing exactly (fp32 logits, sigmoid scores, a selection-only bias,
group-limited top-k with -inf masking, normalised and scaled weights); softmax scoring gives the
DeepSeek-V2 / Mixtral variant, with the group score taken as the group's best expert as V2 does.
The router never touches expert weights: it returns a `Routing` value that the experts consume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from moelm.config import ModelConfig
from moelm.model.balance import assignment_counts, cv_squared, smooth_load
from moelm.model.layers import init_normal_

NOISE_EPS = 1e-2  # floor on the noise std, as in Shazeer et al.'s reference code, so the load CDF is defined


@dataclass(frozen=True)
class Routing:
    """One MoE layer's routing decision for T tokens: an immutable value.

    The router creates it with its own losses; the MoE layer, once it knows the capacity drops and the balance
    losses, returns a new value with them (`with_layer_results`) instead of writing into this one, so a value a
    caller holds (the trainer, telemetry, an activation-checkpoint replay) never changes under it.
    """

    expert_ids_TK: torch.Tensor  # long [T, k]
    weights_TK: torch.Tensor  # float32 [T, k], combine weights (unbiased scores, normalised and scaled)
    logits_TE: torch.Tensor  # float32 [T, E], router logits
    scores_TE: torch.Tensor  # float32 [T, E], sigmoid or softmax of the logits
    tokens_per_expert_E: torch.Tensor  # float32 [E], assignments each expert received (padding excluded)
    token_mask_T: torch.Tensor | None = None  # bool [T], False for padding tokens
    dropped_TK: torch.Tensor | None = None  # bool [T, k], assignments over an expert's capacity
    losses: Mapping[str, torch.Tensor] = field(default_factory=dict)  # balance losses, coefficients applied
    natural_ids_TK: torch.Tensor | None = None  # under routing replay: the experts the router itself would pick

    def __post_init__(self) -> None:
        object.__setattr__(self, "losses", MappingProxyType(dict(self.losses)))

    def with_layer_results(self, dropped_TK: torch.Tensor | None, losses: Mapping[str, torch.Tensor]) -> Routing:
        """A copy carrying the layer's capacity drops and its balance losses beside the router's own."""
        return dataclasses.replace(self, dropped_TK=dropped_TK, losses={**self.losses, **losses})


class Router(nn.Module):
    """Gate projection plus DeepSeek's group-limited top-k selection."""

    def __init__(self, config: ModelConfig, load_loss_coef: float = 0.0) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))
        init_normal_(self.weight, config.initializer_range)
        self.load_loss_coef = load_loss_coef  # MoEOptions.load_loss_coef (needs noisy_gating)
        # Shazeer 2017 learned noise scale; zero-initialised as in the paper (noise std starts at softplus(0)).
        self.noise_weight = (
            nn.Parameter(torch.zeros(self.num_experts, config.hidden_size, dtype=torch.float32))
            if config.noisy_gating
            else None
        )
        # Selection-only balancing bias (aux-loss-free balancing); persistent, never trained by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's own signature
        """Move with the model but stay float32 whatever dtype the rest of the model is cast to."""
        names = [n for n in ("weight", "noise_weight", "e_score_correction_bias") if getattr(self, n) is not None]
        before = {name: getattr(self, name).data for name in names}
        super()._apply(fn, recurse)
        for name in names:
            old, new = before[name], getattr(self, name).data
            # Re-derive from the fp32 original (not the down-cast copy) unless it held no data (meta).
            kept = new.float() if old.is_meta else old.to(device=new.device, dtype=torch.float32)
            if isinstance(getattr(self, name), nn.Parameter):
                getattr(self, name).data = kept
            else:
                setattr(self, name, kept)
        return self

    def forward(
        self, x_TH: torch.Tensor, token_mask_T: torch.Tensor | None = None, replay_TK: torch.Tensor | None = None
    ) -> Routing:
        """Scores, top-k selection and combine weights; `replay_TK` fixes the selected experts (routing replay:
        the gate weights are still recomputed from this forward's scores, so gradients reach the router)."""
        logits = F.linear(x_TH.float(), self.weight.float())
        losses = {}
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(x_TH.float(), self.noise_weight)) + NOISE_EPS
            clean_logits = logits
            logits = clean_logits + torch.randn_like(clean_logits) * noise_std
            if self.load_loss_coef > 0:
                load = smooth_load(clean_logits, logits, noise_std, self.top_k)
                losses["load_loss"] = self.load_loss_coef * cv_squared(load)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            choice = self._mask_to_best_groups(choice)
        # sorted: column 0 holds each token's first choice, which capacity limits serve first
        expert_ids = choice.topk(self.top_k, dim=-1, sorted=True).indices
        natural_ids = None
        if replay_TK is not None:
            natural_ids, expert_ids = expert_ids, replay_TK.to(device=choice.device, dtype=torch.long)
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        counts = assignment_counts(expert_ids, self.num_experts, token_mask_T)
        return Routing(
            expert_ids, weights, logits, scores, counts, token_mask_T, losses=losses, natural_ids_TK=natural_ids
        )

    def _mask_to_best_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Keep the topk_group best groups; experts elsewhere get -inf (0 would lose to a negative bias)."""
        grouped = choice_TE.unflatten(-1, (self.n_group, -1))
        if self.scoring_func == "sigmoid":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        best_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
