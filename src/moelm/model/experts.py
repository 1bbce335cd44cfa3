"""Routed experts stored as 3D tensors, computing on contiguous per-expert slabs of rows.

Weights: gate/up fused `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I], the layout
recent transformers uses in memory. A dispatcher (moelm.model.dispatch) brings each expert its rows as one slab;
the slabs run as one grouped GEMM (`grouped_mm`) where the device supports it, or as one GEMM per expert that
received tokens. Decode has its own fixed-shape path (no sort, no host sync) for captured graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moelm.config import ModelConfig
from moelm.model.dispatch import LocalDispatcher, TokenDispatcher
from moelm.model.kernels import grouped_gemm
from moelm.model.kernels.cpu import linear, weight_product
from moelm.model.layers import init_normal_
from moelm.model.router import Routing


class RoutedExperts(nn.Module):
    """E SwiGLU experts of width moe_intermediate_size, applied to the tokens the router assigned them."""

    def __init__(self, config: ModelConfig, backend: str = "auto") -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.intermediate_size = config.moe_intermediate_size
        self.backend = backend  # MoEOptions.expert_backend
        hidden = config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_size, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, self.intermediate_size))
        init_normal_(self.gate_up_proj, config.initializer_range)
        init_normal_(self.down_proj, config.initializer_range)
        # per-output-channel scales [E, out] once the banks are int8 (moelm.model.quantize); None in float
        self.register_buffer("gate_up_scale", None)
        self.register_buffer("down_scale", None)
        # Expert parallelism replaces this with a dispatcher that exchanges rows between ranks.
        self.dispatcher: TokenDispatcher = LocalDispatcher(self.num_experts)
        self._backends: dict[tuple, str] = {}
        # Low-rank per-expert updates (moelm.model.lora.ExpertAdapter); None keeps the plain banks.
        self.adapter: nn.Module | None = None

    def forward(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        local = isinstance(self.dispatcher, LocalDispatcher)  # expert parallelism holds only some experts here
        if local and routing.dropped_TK is None and not torch.is_grad_enabled() and routing.expert_ids_TK.numel() <= 4:
            return self._gathered(x_TH, routing.expert_ids_TK, routing.weights_TK)  # a token or two: no sort
        rows_RH, counts_E, plan = self.dispatcher.dispatch(x_TH, routing)
        out_RH = self.compute(rows_RH, counts_E)
        return self.dispatcher.combine(out_RH, plan, x_TH, routing)

    def compute(self, rows_RH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Each expert on its contiguous slab of rows (counts_E rows per expert, in expert order)."""
        if self._backend_for(rows_RH) == "grouped_mm":
            return self._grouped(rows_RH, counts_E)
        return self._loop(rows_RH, counts_E)

    def float_banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) as floating-point tensors: the parameters themselves, or int8 banks widened
        with their scales for this call (int8 is a batch-1 decode format; prefill pays for the widening), or the
        banks plus an attached adapter's low-rank updates (merged per call: decode and a token or two only)."""
        if self.adapter is not None:  # merged for this call: the paths that read weights per assignment
            gate_up_delta, down_delta = self.adapter.delta_banks()
            return self.gate_up_proj + gate_up_delta, self.down_proj + down_delta
        if self.gate_up_scale is None:
            return self.gate_up_proj, self.down_proj
        return (
            self.gate_up_proj.float() * self.gate_up_scale.unsqueeze(-1),
            self.down_proj.float() * self.down_scale.unsqueeze(-1),
        )

    def _backend_for(self, rows_RH: torch.Tensor) -> str:
        """The kernel for this device, dtype and autograd state, resolved once per combination."""
        key = (rows_RH.device, rows_RH.dtype, torch.is_grad_enabled())
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = grouped_gemm.expert_backend(self.backend, *key)
        return backend

    def decode(self, x_TH: torch.Tensor, routing: Routing, fused: bool | None = None) -> torch.Tensor:
        """Fixed-shape dispatch for a captured decode graph (no sort, no host sync).

        fused (default: while torch.compile traces): each assignment's expert rows are read through its
        expert id inside a multiply-reduce, which inductor turns into one kernel that streams exactly the
        chosen experts' weights, with no gathered copy (a batched GEMM over every expert was several times
        slower at decode batch sizes; benchmarks/decode.py measures the whole step). Used up to 2E
        assignments; beyond that every expert runs on every token. Eagerly, the sorted dispatch of `forward`
        (which gathers the experts' weights for a token or two): running every expert on every token reads
        and multiplies all E experts where a 16-token step touches about two thirds of them (small preset:
        9.7 ms vs 6.0 ms per layer at 16 tokens, 19.3 vs 8.4 at 64)."""
        weights_TK = routing.weights_TK
        if routing.dropped_TK is not None:
            weights_TK = weights_TK.masked_fill(routing.dropped_TK, 0.0)
        expert_ids_TK = routing.expert_ids_TK
        assignments = expert_ids_TK.numel()
        fused = torch.compiler.is_compiling() if fused is None else fused
        if fused and assignments <= 2 * self.num_experts:
            return self._streamed(x_TH, expert_ids_TK, weights_TK)
        if not fused and not torch.compiler.is_compiling():
            return self.forward(x_TH, routing)
        combine_TE = torch.zeros(x_TH.shape[0], self.num_experts, dtype=x_TH.dtype, device=x_TH.device)
        combine_TE = combine_TE.scatter(1, expert_ids_TK, weights_TK.to(x_TH.dtype))
        gate_up_proj, down_proj = self.float_banks()
        gate, up = weight_product(_times_transposed, x_TH, gate_up_proj).chunk(2, dim=-1)  # [E, T, I] each
        out_ETH = weight_product(_times_transposed, F.silu(gate) * up, down_proj)
        return torch.einsum("te,eth->th", combine_TE, out_ETH)

    def _streamed(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Every assignment as a matrix-vector product written as multiply + sum over the indexed weights, so a
        compiler fuses the indexing into the reduction (eagerly this would materialise the products)."""
        return self._per_assignment(
            x_TH, expert_ids_TK, weights_TK, lambda w_RPQ, x_RQ: (w_RPQ * x_RQ[:, None]).sum(-1)
        )

    def _gathered(self, x_TH: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Decode of a token or two: gather the few chosen experts' weights and run one batched GEMM each
        way; cheaper than sorting and dispatching when there are fewer assignments than experts."""
        return self._per_assignment(
            x_TH,
            expert_ids_TK,
            weights_TK,
            lambda w_RPQ, x_RQ: weight_product(_times_transposed, x_RQ[:, None], _widened(w_RPQ, x_RQ))[:, 0],
        )

    def _per_assignment(
        self,
        x_TH: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        matvec: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Each (token, expert) pair through its expert's weights, indexed per pair, then the weighted k-way sum;
        `matvec(weights [R, P, Q], rows [R, Q]) -> [R, P]` decides how the products are computed."""
        top_k = expert_ids_TK.shape[1]
        flat_ids = expert_ids_TK.flatten()
        rows_RH = x_TH.repeat_interleave(top_k, dim=0)
        gate_up_proj, down_proj = (self.gate_up_proj, self.down_proj) if self.adapter is None else self.float_banks()
        gate_up_RP = matvec(gate_up_proj[flat_ids], rows_RH)
        if self.gate_up_scale is not None:  # int8 banks: the product of the integers, then each channel's scale
            gate_up_RP = gate_up_RP * self.gate_up_scale[flat_ids]
        gate, up = gate_up_RP.chunk(2, dim=-1)
        out_RH = matvec(down_proj[flat_ids], F.silu(gate) * up)
        if self.down_scale is not None:
            out_RH = out_RH * self.down_scale[flat_ids]
        out_RH = out_RH.to(x_TH.dtype)
        weights_R = weights_TK.flatten().to(out_RH.dtype)
        return (out_RH * weights_R.unsqueeze(-1)).view(-1, top_k, x_TH.shape[-1]).sum(dim=1)

    def _grouped(self, rows_RH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offsets = counts_E.cumsum(0).to(torch.int32)

        def grouped(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return grouped_gemm.grouped_mm(rows, weight.transpose(1, 2), offsets)

        gate_up_proj, down_proj = self._base_banks()
        gate_up = weight_product(grouped, rows_RH, gate_up_proj)
        if self.adapter is not None:  # two rank-r grouped GEMMs beside the bank's one, each way
            gate_up = gate_up + self.adapter.gate_up(rows_RH, grouped)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        out = weight_product(grouped, hidden, down_proj)
        if self.adapter is not None:
            out = out + self.adapter.down(hidden, grouped)
        return out

    def _base_banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The banks without any adapter (the slab paths add the adapter's low-rank products themselves)."""
        if self.adapter is None:
            return self.float_banks()
        return self.gate_up_proj, self.down_proj

    def _loop(self, rows_RH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # unbind once: its backward stacks the per-expert gradients into one [E, ...] tensor, where indexing
        # the parameter per expert would allocate a full-size zero gradient for every expert.
        gate_up_proj, down_proj = self._base_banks()
        gate_up_weights, down_weights = gate_up_proj.unbind(0), down_proj.unbind(0)
        adapter = self.adapter.per_expert() if self.adapter is not None else None  # unbound once, as the banks
        outputs = []
        for expert, rows in enumerate(rows_RH.split(counts_E.tolist())):
            if rows.shape[0] == 0:
                continue
            gate_up = linear(rows, gate_up_weights[expert])
            if adapter is not None:
                gate_up = gate_up + adapter.gate_up(expert, rows)
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
            out = linear(hidden, down_weights[expert])
            outputs.append(out if adapter is None else out + adapter.down(expert, hidden))
        if not outputs:
            return rows_RH.new_zeros(rows_RH.shape)
        return torch.cat(outputs)


def _times_transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T over the last two dimensions (weights are stored [out, in], as nn.Linear's)."""
    return x @ weight.transpose(-2, -1)


def _widened(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An int8 weight as x's dtype for a matmul (its scale is applied to the product); others unchanged."""
    return weight.to(x.dtype) if weight.dtype == torch.int8 else weight
