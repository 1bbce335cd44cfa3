"""Token dispatch for routed experts: permute (token, expert) pairs into per-expert slabs, and back.

Router, dispatcher and experts are three separate pieces, as torchtitan separates them: the router decides, a
dispatcher moves rows so each expert sees one contiguous slab, the experts only compute on slabs. Expert
parallelism is a second dispatcher (all-to-all between permute and unpermute), not a branch inside the experts.

Shapes: T tokens, k experts per token, E experts, R = rows after dispatch (T*k, less capacity drops), H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moelm.model.router import Routing


class _SortedRows(torch.autograd.Function):
    """rows[r] = x[token_of_row[r]]: each token's row repeated for its k (token, slot) pairs, in sorted order.
    Backward gathers the pairs back into (token, slot) order and sums each token's k rows."""

    @staticmethod
    def forward(ctx, x_TH: torch.Tensor, token_of_row: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x_TH.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad_RH: torch.Tensor):  # noqa: ANN001, ANN205
        (inverse,) = ctx.saved_tensors
        grad_TH = grad_RH.index_select(0, inverse).view(-1, ctx.top_k, grad_RH.shape[-1]).sum(dim=1)
        return grad_TH, None, None, None


class _UnsortRows(torch.autograd.Function):
    """out[i] = rows[inverse[i]] for a permutation; backward is the gather by the permutation itself."""

    @staticmethod
    def forward(ctx, rows_RH: torch.Tensor, inverse: torch.Tensor, order: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(order)
        return rows_RH.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad_RH: torch.Tensor):  # noqa: ANN001, ANN205
        (order,) = ctx.saved_tensors
        return grad_RH.index_select(0, order), None, None


@dataclass(frozen=True)
class DispatchPlan:
    """How rows were permuted, so `combine` can undo it."""

    order_R: torch.Tensor  # (token, slot) pair index of each dispatched row, sorted by expert
    token_of_row_R: torch.Tensor  # source token of each row
    inverse: torch.Tensor | None  # position of each pair among the rows, when the rows are a full permutation
    top_k: int


class TokenDispatcher(Protocol):
    """Moves token rows to their experts' slabs and the experts' outputs back to the tokens."""

    def dispatch(self, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """Rows [R, H] grouped by expert, rows per expert [E], and the plan to undo it."""
        ...

    def combine(self, out_RH: torch.Tensor, plan: DispatchPlan, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Each token's weighted sum of its experts' outputs [T, H]."""
        ...


class LocalDispatcher:
    """Every expert lives in this process: one stable sort of the (token, slot) pairs by expert id.

    Training (dropless): every token owns exactly k rows, so the sort is a permutation and both directions are
    gathers whose backward is the opposite gather; indexing's own backward is an accumulating index_put, a
    serial scatter on CPU. With capacity drops, or without autograd, rows are indexed and combined by
    scatter-add, which is faster when no backward is needed.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(self, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        expert_ids_TK = routing.expert_ids_TK
        if routing.dropped_TK is not None:  # over-capacity assignments sort last and are never computed
            expert_ids_TK = expert_ids_TK.masked_fill(routing.dropped_TK, self.num_experts)
        flat_ids = expert_ids_TK.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.zeros(self.num_experts + 1, dtype=torch.long, device=flat_ids.device)
        counts = counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))[: self.num_experts]
        if routing.dropped_TK is not None:
            order = order[: int(counts.sum())]
        top_k = expert_ids_TK.shape[1]
        token_of_row = order // top_k
        permutation = routing.dropped_TK is None and torch.is_grad_enabled()
        inverse = order.argsort() if permutation else None
        rows_RH = _SortedRows.apply(x_TH, token_of_row, inverse, top_k) if permutation else x_TH[token_of_row]
        return rows_RH, counts, DispatchPlan(order, token_of_row, inverse, top_k)

    def combine(self, out_RH: torch.Tensor, plan: DispatchPlan, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        if plan.inverse is not None:
            # one gather back to (token, slot) order and a batched k-way weighted sum: its backward is a gather
            out_TKH = _UnsortRows.apply(out_RH, plan.inverse, plan.order_R).view(-1, plan.top_k, out_RH.shape[-1])
            return (routing.weights_TK.to(out_RH.dtype).unsqueeze(1) @ out_TKH).squeeze(1)
        row_weights = routing.weights_TK.flatten()[plan.order_R].to(out_RH.dtype)
        return torch.zeros_like(x_TH).index_add_(0, plan.token_of_row_R, out_RH * row_weights.unsqueeze(-1))
