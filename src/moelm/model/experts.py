"""Routed experts stored as 3D tensors, dispatched by sorting token-expert pairs by expert.

Weights: gate/up fused `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I], the layout
recent transformers uses in memory. The T*k (token, expert) pairs are sorted by expert so each expert sees one
contiguous slab of rows; the slabs run as one grouped GEMM (`grouped_mm`) where the device supports it, or as one
GEMM per expert that received tokens. Outputs are weighted and scattered back with a single index_add.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moelm.config import ModelConfig
from moelm.model import grouped_gemm
from moelm.model.layers import cpu_has_native_bf16, linear
from moelm.model.router import Routing


def resolve_backend(requested: str, x: torch.Tensor) -> str:
    """Pick the dispatch kernel: one grouped GEMM where torch has a fast one, else a GEMM per expert.

    Measured with torch 2.13 on 2 CPU cores (benchmarks/moe_layer.py, benchmarks/forward.py): with gradients
    grouped_mm beats the loop in float32, forward-only the loop wins (small preset forward went from 1.23x to
    0.83x transformers when grouped_mm was used there), and torch's CPU grouped_mm in bf16 is far slower on CPUs
    without bf16 hardware (transformers' bf16 MoE layer: 38 tok/s against our loop's 1,456 at T=4096).
    """
    if requested == "loop" or not grouped_gemm.available:
        return "loop"
    if requested == "grouped_mm":
        return "grouped_mm"
    if not x.is_cuda and not torch.is_grad_enabled():
        return "loop"  # CPU inference: the loop visits only the experts that received tokens
    if x.is_cuda:
        return "grouped_mm" if x.dtype in (torch.bfloat16, torch.float32) else "loop"
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_has_native_bf16()):
        return "grouped_mm"
    return "loop"


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


class RoutedExperts(nn.Module):
    """E SwiGLU experts of width moe_intermediate_size, applied to the tokens the router assigned them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.intermediate_size = config.moe_intermediate_size
        self.backend = config.expert_backend
        hidden = config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_size, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, self.intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=config.initializer_range)
        nn.init.normal_(self.down_proj, std=config.initializer_range)

    def forward(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        if routing.dropped_TK is None and not torch.is_grad_enabled() and routing.expert_ids_TK.numel() <= 4:
            return self._gathered(x_TH, routing.expert_ids_TK, routing.weights_TK)
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
        # Training: every token owns exactly k rows, so the sort is a permutation of the (token, slot) pairs and
        # both directions are gathers whose backward is the opposite gather; indexing's own backward is an
        # accumulating index_put, a serial scatter on CPU (probe: 5 ms per call at T=2048, k=4).
        sorted_pairs = routing.dropped_TK is None and torch.is_grad_enabled()
        inverse = order.argsort() if sorted_pairs else None
        rows_RH = _SortedRows.apply(x_TH, token_of_row, inverse, top_k) if sorted_pairs else x_TH[token_of_row]
        if resolve_backend(self.backend, x_TH) == "grouped_mm":
            out_RH = self._grouped(rows_RH, counts)
        else:
            out_RH = self._loop(rows_RH, counts)
        if sorted_pairs:
            # Undo the sort with one gather and a batched k-way weighted sum, whose backward is a gather too
            # instead of scatter-add's. Without autograd the scatter-add below is faster (benchmarks/forward.py
            # tiny float32 fell from 1.34x to 1.16x transformers with the gather there).
            out_TKH = _UnsortRows.apply(out_RH, inverse, order).view(-1, top_k, out_RH.shape[-1])
            return (routing.weights_TK.to(out_RH.dtype).unsqueeze(1) @ out_TKH).squeeze(1)
        row_weights = routing.weights_TK.flatten()[order].to(out_RH.dtype)
        out_RH = out_RH * row_weights.unsqueeze(-1)
        return torch.zeros_like(x_TH).index_add_(0, token_of_row, out_RH)

    def decode(self, x_TH: torch.Tensor, routing: Routing, fused: bool | None = None) -> torch.Tensor:
        """Fixed-shape dispatch for a captured decode graph (no sort, no host sync).

        fused (default: while torch.compile traces): each assignment's expert rows are read through its
        expert id inside a multiply-reduce, which inductor turns into one kernel that streams exactly the
        chosen experts' weights, with no gathered copy (a batched GEMM over every expert was several times
        slower at decode batch sizes; benchmarks/decode.py measures the whole step). Used up to 2E
        assignments; beyond that every expert runs on every token. Eagerly, a few assignments gather their
        experts' weights for one batched GEMM, more run every expert."""
        weights_TK = routing.weights_TK
        if routing.dropped_TK is not None:
            weights_TK = weights_TK.masked_fill(routing.dropped_TK, 0.0)
        expert_ids_TK = routing.expert_ids_TK
        assignments = expert_ids_TK.numel()
        fused = torch.compiler.is_compiling() if fused is None else fused
        if fused and assignments <= 2 * self.num_experts:
            return self._streamed(x_TH, expert_ids_TK, weights_TK)
        if 2 * assignments <= self.num_experts:
            return self._gathered(x_TH, expert_ids_TK, weights_TK)
        combine_TE = torch.zeros(x_TH.shape[0], self.num_experts, dtype=x_TH.dtype, device=x_TH.device)
        combine_TE = combine_TE.scatter(1, expert_ids_TK, weights_TK.to(x_TH.dtype))
        gate, up = (x_TH @ self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # [E, T, I] each
        out_ETH = (F.silu(gate) * up) @ self.down_proj.transpose(1, 2)
        return torch.einsum("te,eth->th", combine_TE, out_ETH)

    def _streamed(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Every assignment as a matrix-vector product written as multiply + sum over the indexed weights, so a
        compiler fuses the indexing into the reduction (eagerly this would materialise the products)."""
        return self._per_assignment(
            x_TH, expert_ids_TK, weights_TK, lambda w_RNK, x_RK: (w_RNK * x_RK[:, None]).sum(-1)
        )

    def _gathered(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Decode of a token or two: gather the few chosen experts' weights and run one batched GEMM each
        way; cheaper than sorting and dispatching when there are fewer assignments than experts."""
        return self._per_assignment(
            x_TH, expert_ids_TK, weights_TK, lambda w_RNK, x_RK: (x_RK[:, None] @ w_RNK.transpose(1, 2))[:, 0]
        )

    def _per_assignment(
        self,
        x_TH: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        matvec: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Each (token, expert) pair through its expert's weights, indexed per pair, then the weighted k-way sum;
        `matvec(weights [R, N, K], rows [R, K]) -> [R, N]` decides how the products are computed."""
        top_k = expert_ids_TK.shape[1]
        flat_ids = expert_ids_TK.flatten()
        rows_RH = x_TH.repeat_interleave(top_k, dim=0)
        gate, up = matvec(self.gate_up_proj[flat_ids], rows_RH).chunk(2, dim=-1)
        out_RH = matvec(self.down_proj[flat_ids], F.silu(gate) * up)
        weights_R = weights_TK.flatten().to(out_RH.dtype)
        return (out_RH * weights_R.unsqueeze(-1)).view(-1, top_k, x_TH.shape[-1]).sum(dim=1)

    def _grouped(self, rows_RH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offsets = counts_E.cumsum(0).to(torch.int32)
        hidden_RI2 = grouped_gemm.grouped_mm(rows_RH, self.gate_up_proj.transpose(1, 2), offsets)
        gate, up = hidden_RI2.chunk(2, dim=-1)
        return grouped_gemm.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offsets)

    def _loop(self, rows_RH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # unbind once: its backward stacks the per-expert gradients into one [E, ...] tensor, where indexing
        # the parameter per expert would allocate a full-size zero gradient for every expert (benchmarks/
        # moe_layer.py T=64 went from 4 to 103 tok/s with this change).
        gate_up_weights, down_weights = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outputs = []
        for expert, rows in enumerate(rows_RH.split(counts_E.tolist())):
            if rows.shape[0] == 0:
                continue
            gate, up = linear(rows, gate_up_weights[expert]).chunk(2, dim=-1)
            outputs.append(linear(F.silu(gate) * up, down_weights[expert]))
        if not outputs:
            return rows_RH.new_zeros(rows_RH.shape)
        return torch.cat(outputs)

    def expert_forward(self, expert: int, x_NH: torch.Tensor) -> torch.Tensor:
        """One expert on some rows; the plain definition the dispatch paths must agree with."""
        gate, up = linear(x_NH, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj[expert])
