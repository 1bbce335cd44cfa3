"""Low-rank adapters (LoRA) on attention projections, shared / dense SwiGLUs and each routed expert.

An adapted projection computes W x + (alpha / r) · B A x with A [r, in] and B [out, r]: PEFT's parametrisation
(A drawn as nn.Linear draws its weights, B zero, so a fresh adapter leaves the model unchanged). Routed experts get
one rank-r pair per expert, stored as banks [E, r, in] / [E, out, r] so the rows of every expert pass through
one grouped GEMM per factor (the bank's own GEMM is unchanged); a fused gate/up projection of a shared or dense
SwiGLU gets one pair per half, as transformers' separate gate_proj / up_proj each get theirs in PEFT.

Adapters hang off the layers they adapt (`Linear.adapter`, `RoutedExperts.adapter`), so the base model's state
dict and HF names are untouched and an adapter's tensors are named by the module they adapt. Every path of an
adapted model, decode included (`Linear.effective_weight`, merged expert banks), computes the adapted function;
decoding is cheaper on merged weights, so `merge_lora` folds the adapters in for good and `lora_merged` for a block
of generation inside training (it restores the exact base weights afterwards, so resumed training stays bitwise
the same).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelm.model.experts import RoutedExperts
from moelm.model.layers import Linear

TARGETS = ("attention", "experts", "shared_experts", "dense_mlp")
DEFAULT_TARGETS = ("attention", "experts", "shared_experts")


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: rank r, alpha (scaling alpha / r), dropout on the adapter's input, target kinds."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"invalid lora rank {self.rank!r}: must be an integer >= 1")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(
                f"invalid lora targets {list(self.targets)}: must be a non-empty subset of {list(TARGETS)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _lora_a_(weight: torch.Tensor) -> None:
    """PEFT's (and nn.Linear's) draw: uniform within ±1/sqrt(fan_in), fan_in the last dimension."""
    bound = 1.0 / math.sqrt(weight.shape[-1])
    nn.init.uniform_(weight, -bound, bound)


class LinearAdapter(nn.Module):
    """B A x for a Linear whose output is `parts` equal slices (2 for a fused gate/up), each with its own pair."""

    def __init__(self, in_features: int, out_features: int, parts: int, spec: LoraSpec) -> None:
        super().__init__()
        self.scaling = spec.scaling
        self.lora_A = nn.Parameter(torch.empty(parts, spec.rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(parts, out_features // parts, spec.rank))
        _lora_a_(self.lora_A)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts, rank = self.lora_A.shape[:2]
        h = F.linear(self.dropout(x), self.lora_A.flatten(0, 1))  # [..., parts * r] in one GEMM
        if parts == 1:
            return F.linear(h, self.lora_B[0]) * self.scaling
        out = torch.einsum("...pr,por->...po", h.unflatten(-1, (parts, rank)), self.lora_B.to(h.dtype))
        return out.flatten(-2) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update to the weight, [out, in]."""
        return (torch.bmm(self.lora_B, self.lora_A) * self.scaling).flatten(0, 1)


class ExpertAdapter(nn.Module):
    """One rank-r pair per routed expert for gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""

    def __init__(self, experts: RoutedExperts, spec: LoraSpec) -> None:
        super().__init__()
        num, inter = experts.num_experts, experts.intermediate_size
        hidden = experts.gate_up_proj.shape[-1]
        self.scaling = spec.scaling
        self.gate_up_A = nn.Parameter(torch.empty(num, spec.rank, hidden))
        self.gate_up_B = nn.Parameter(torch.zeros(num, 2 * inter, spec.rank))
        self.down_A = nn.Parameter(torch.empty(num, spec.rank, inter))
        self.down_B = nn.Parameter(torch.zeros(num, hidden, spec.rank))
        _lora_a_(self.gate_up_A)
        _lora_a_(self.down_A)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def gate_up(self, rows_RH: torch.Tensor, grouped) -> torch.Tensor:  # noqa: ANN001 - (rows, bank) -> rows
        """The gate/up update of rows grouped by expert, through `grouped(rows, bank)` = rows_e @ bank_e^T."""
        return grouped(grouped(self.dropout(rows_RH), self.gate_up_A), self.gate_up_B) * self.scaling

    def down(self, rows_RI: torch.Tensor, grouped) -> torch.Tensor:  # noqa: ANN001
        return grouped(grouped(self.dropout(rows_RI), self.down_A), self.down_B) * self.scaling

    def per_expert(self) -> _PerExpert:
        """The banks unbound once (their backward stacks per-expert gradients), for the loop over experts."""
        return _PerExpert(self)

    def delta_banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The updates to both banks, [E, 2I, H] and [E, H, I]."""
        return (
            torch.bmm(self.gate_up_B, self.gate_up_A) * self.scaling,
            torch.bmm(self.down_B, self.down_A) * self.scaling,
        )


class _PerExpert:
    def __init__(self, adapter: ExpertAdapter) -> None:
        self.gate_up_A, self.gate_up_B = adapter.gate_up_A.unbind(0), adapter.gate_up_B.unbind(0)
        self.down_A, self.down_B = adapter.down_A.unbind(0), adapter.down_B.unbind(0)
        self.dropout, self.scaling = adapter.dropout, adapter.scaling

    def gate_up(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(rows), self.gate_up_A[expert])
        return F.linear(h, self.gate_up_B[expert]) * self.scaling

    def down(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(rows), self.down_A[expert]), self.down_B[expert]) * self.scaling


# ---------------------------------------------------------------------------------------------- targets
_LAYER = r"layers\.\d+\."
_TARGET_PATTERNS = {
    "attention": re.compile(_LAYER + r"self_attn\.\w+$"),
    "experts": re.compile(_LAYER + r"mlp\.experts$"),
    "shared_experts": re.compile(_LAYER + r"mlp\.shared_experts\.(gate_up_proj|down_proj)$"),
    "dense_mlp": re.compile(_LAYER + r"mlp\.(gate_up_proj|down_proj)$"),
}


def target_of(name: str) -> str | None:
    """The target kind of a module path (`layers.3.self_attn.q_a_proj` -> attention); MTP layers are never
    adapted (HF's DeepseekV3 model, and so PEFT, has none)."""
    for kind, pattern in _TARGET_PATTERNS.items():
        if pattern.fullmatch(name):
            return kind
    return None


def attach_lora(model: nn.Module, spec: LoraSpec) -> int:
    """Freeze the model and add fresh adapters to every targeted layer; returns the trainable parameter count.

    The random draws follow the module order, so a seeded call gives the same adapters every time."""
    if any(True for _ in adapted_modules(model)):
        raise ValueError("the model already has LoRA adapters")
    model.requires_grad_(False)
    found = 0
    for name, module in model.named_modules():
        kind = target_of(name)
        if kind is None or kind not in spec.targets:
            continue
        if isinstance(module, RoutedExperts):
            if module.gate_up_scale is not None:
                raise ValueError("LoRA needs float expert banks; the model is int8")
            module.adapter = ExpertAdapter(module, spec).to(module.gate_up_proj.device)
        elif isinstance(module, Linear):
            parts = 2 if name.endswith("gate_up_proj") else 1
            adapter = LinearAdapter(module.in_features, module.out_features, parts, spec)
            module.adapter = adapter.to(module.weight.device)
        else:
            continue
        found += 1
    if not found:
        raise ValueError(f"lora targets {list(spec.targets)} match no layer of this model")
    return sum(p.numel() for p in lora_parameters(model))


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every layer that carries an adapter, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (Linear, RoutedExperts)) and module.adapter is not None:
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in adapted_modules(model))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, module in adapted_modules(model) for p in module.adapter.parameters()]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under their names in the model's state dict (`<module path>.adapter.<tensor>`);
    moelm.model.peft_format maps them to PEFT's."""
    return {
        f"{name}.adapter.{key}": value.detach()
        for name, module in adapted_modules(model)
        for key, value in module.adapter.state_dict().items()
    }


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors into the attached adapters; every adapter tensor must be present with its shape."""
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ValueError(f"{source}: adapter tensors do not match the model's adapters ({detail})")
    for name, target in expected.items():
        value = state[name]
        if value.shape != target.shape:
            raise ValueError(
                f"{source}: {name} has shape {list(value.shape)}, the model's adapter {list(target.shape)}"
            )
        target.copy_(value)


def _weights_of(module: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(weight, its update) for one adapted module."""
    if isinstance(module, RoutedExperts):
        gate_up, down = module.adapter.delta_banks()
        return [(module.gate_up_proj, gate_up), (module.down_proj, down)]
    return [(module.weight, module.adapter.delta())]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weights and remove it: a plain model with the adapted function."""
    for _, module in list(adapted_modules(model)):
        for weight, delta in _weights_of(module):
            weight.add_(delta.to(weight.dtype))
        module.adapter = None
    return model


@contextlib.contextmanager
def lora_merged(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its adapters folded in for the block (generation, which reads weights directly), then the
    bitwise-exact base weights and the adapters back. Without adapters, the model unchanged."""
    saved = []
    with torch.no_grad():
        for _, module in list(adapted_modules(model)):
            pairs = _weights_of(module)
            saved.append((module, module.adapter, [(weight, weight.detach().clone()) for weight, _ in pairs]))
            for weight, delta in pairs:
                weight.add_(delta.to(weight.dtype))
            module.adapter = None
    try:
        yield model
    finally:
        with torch.no_grad():
            for module, adapter, weights in saved:
                for weight, original in weights:
                    weight.copy_(original)
                module.adapter = adapter
