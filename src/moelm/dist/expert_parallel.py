"""Expert parallelism: each rank of an expert group holds E/P routed experts; tokens travel by all-to-all.

Per MoE layer (references §10): sort the local (token, expert) pairs by expert as the local dispatcher does ->
exchange the per-expert counts (`all_to_all_single`) so every rank knows how many rows each peer sends it for
each of its experts -> exchange the rows with those split sizes -> regroup the received rows (they arrive
source-rank-major, expert-minor) into one slab per local expert -> the experts compute -> undo the regroup ->
the reverse all-to-all -> the local dispatcher's combine. Both exchanges are autograd functions whose backward is
the exchange with the split sizes swapped. Shared experts, attention and the router stay data-parallel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moelm.model.dispatch import DispatchPlan, LocalDispatcher
from moelm.model.experts import RoutedExperts
from moelm.model.router import Routing


@dataclass
class ExchangeStats:
    """What the all-to-alls of a rank moved (forward and backward): bytes that left the rank, and seconds spent
    in the exchanges (gloo and NCCL on the default stream block until done, so wall time is the cost)."""

    bytes_sent: int = 0
    seconds: float = 0.0


class _AllToAll(torch.autograd.Function):
    """Rows sent in blocks of `send` sizes, received in blocks of `receive` sizes; backward swaps them."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, receive: list[int], send: list[int], group, stats) -> torch.Tensor:  # noqa: ANN001
        ctx.receive, ctx.send, ctx.group, ctx.stats = receive, send, group, stats
        return _exchange(rows, receive, send, group, stats)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return _exchange(grad, ctx.send, ctx.receive, ctx.group, ctx.stats), None, None, None, None


def _exchange(rows: torch.Tensor, receive: list[int], send: list[int], group, stats: ExchangeStats) -> torch.Tensor:  # noqa: ANN001
    start = time.perf_counter()
    out = rows.new_empty((sum(receive), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), receive, send, group=group)
    own = dist.get_rank(group)
    row_bytes = rows[0].numel() * rows.element_size() if rows.dim() and rows.shape[0] else 0
    stats.bytes_sent += (sum(send) - send[own]) * row_bytes
    stats.seconds += time.perf_counter() - start
    return out


@dataclass(frozen=True)
class ExpertParallelPlan:
    """What `combine` needs to send each expert output back and undo the local sort."""

    local: DispatchPlan
    send: list[int]  # rows this rank sent to each peer
    receive: list[int]  # rows it received from each peer
    regroup: torch.Tensor  # received row index of each row of the expert-major slabs
    ungroup: torch.Tensor  # the inverse permutation


class ExpertParallelDispatcher:
    """The TokenDispatcher of an expert-parallel layer (see the module docstring)."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup, degree: int) -> None:
        self.local = LocalDispatcher(num_experts)
        self.group, self.degree = group, degree
        self.local_experts = num_experts // degree
        self.stats = ExchangeStats()

    def dispatch(self, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelPlan]:
        rows_RH, counts_E, local_plan = self.local.dispatch(x_TH, routing)
        send_PE = counts_E.view(self.degree, self.local_experts).contiguous()
        receive_PE = torch.empty_like(send_PE)
        dist.all_to_all_single(receive_PE, send_PE, group=self.group)
        send = send_PE.sum(1).tolist()
        receive_counts = receive_PE.tolist()
        receive = [sum(row) for row in receive_counts]
        received = _AllToAll.apply(rows_RH, receive, send, self.group, self.stats)
        # Received rows: one block per source rank, each sorted by local expert. Slabs want expert-major order.
        starts, at = [], 0
        for row in receive_counts:
            starts.append([])
            for count in row:
                starts[-1].append(at)
                at += count
        pieces = [
            torch.arange(starts[p][e], starts[p][e] + receive_counts[p][e], device=x_TH.device)
            for e in range(self.local_experts)
            for p in range(self.degree)
        ]
        regroup = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=x_TH.device)
        ungroup = regroup.argsort()
        slabs = received.index_select(0, regroup)
        counts_local = receive_PE.sum(0)
        return slabs, counts_local, ExpertParallelPlan(local_plan, send, receive, regroup, ungroup)

    def combine(
        self, out_RH: torch.Tensor, plan: ExpertParallelPlan, x_TH: torch.Tensor, routing: Routing
    ) -> torch.Tensor:
        back_in_received_order = out_RH.index_select(0, plan.ungroup)
        returned = _AllToAll.apply(back_in_received_order, plan.send, plan.receive, self.group, self.stats)
        return self.local.combine(returned, plan.local, x_TH, routing)


def shard_experts(model: nn.Module, group: dist.ProcessGroup, degree: int, ep_rank: int) -> None:
    """Keep this rank's contiguous block of E/P experts in every routed-expert layer and route through
    all-to-all. The model must hold all experts (every rank built it from the same seed or checkpoint)."""
    for module in model.modules():
        if not isinstance(module, RoutedExperts):
            continue
        local = module.num_experts // degree
        block = slice(ep_rank * local, (ep_rank + 1) * local)
        module.gate_up_proj = nn.Parameter(module.gate_up_proj.data[block].clone())
        module.down_proj = nn.Parameter(module.down_proj.data[block].clone())
        module.dispatcher = ExpertParallelDispatcher(module.num_experts, group, degree)
        module.expert_parallel = (degree, ep_rank)


def take_exchange_stats(model: nn.Module) -> ExchangeStats:
    """The all-to-all traffic of every expert-parallel layer since the last call (and reset the counters)."""
    total = ExchangeStats()
    for module in model.modules():
        dispatcher = getattr(module, "dispatcher", None)
        if isinstance(dispatcher, ExpertParallelDispatcher):
            total.bytes_sent += dispatcher.stats.bytes_sent
            total.seconds += dispatcher.stats.seconds
            dispatcher.stats = ExchangeStats()
    return total


def is_expert_parameter(name: str) -> bool:
    """Routed-expert weights: split over the expert group, replicated (and sharded) over the replica group."""
    return name.endswith(("experts.gate_up_proj", "experts.down_proj"))
