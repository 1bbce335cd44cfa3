"""Data-parallel training state over ranks: FSDP2 sharding, gradient averaging, clipping, full-state gathers.

Gradients must equal the single-process step on the global batch. Each rank's loss is the mean over its shard,
so every gradient is the sum of the ranks' contributions divided by the world size W: FSDP's reduce-scatter over
all ranks does that for dense parameters; routed-expert weights already receive the gradient of every token
routed to them through the all-to-all backward, so they are summed over the ranks holding the same experts and
divided by W as well (FSDP's average over the replica ranks, then 1/P; or an explicit all-reduce without FSDP).

Under bf16 training the FSDP units gather bfloat16 parameters and reduce float32 gradients into float32 master
weights (FSDP2's MixedPrecisionPolicy); routers keep float32 parameters in their own units (routing decisions
are made in float32, as in one process).

Every tensor is cut along dimension 0 only (expert blocks, FSDP shards), so `local_rows` can say where a rank's
piece sits in the whole: seeded init fills just those rows, and sharded checkpoints (moelm.dist.checkpoint) name
them. The full-state helpers below serve older checkpoints (a model directory plus the one-process optimizer
state) and the sample generation of a distributed run.
"""

from __future__ import annotations

import math
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moelm.dist.expert_parallel import is_expert_parameter
from moelm.dist.runtime import ParallelContext
from moelm.model.experts import RoutedExperts
from moelm.model.init import LocalRows
from moelm.model.router import Router


def apply_fsdp(
    model: nn.Module,
    context: ParallelContext,
    param_dtype: torch.dtype | None = None,
    roots: list[nn.Module] | None = None,
) -> None:
    """FSDP2 over the meshes: routed experts over their replica ranks, each block and the root over the
    data-parallel ranks. roots: the modules whose forward runs (pipeline stages); default the model itself.

    param_dtype (bf16 training): the dtype parameters are gathered in; gradients are reduced in float32 into
    float32 shards. Forward inputs are not cast, so the residual stream stays what autocast makes it, as in one
    process."""
    reshard = context.reshard_after_forward
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    float32 = MixedPrecisionPolicy(cast_forward_inputs=False)
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            fully_shard(
                module, mesh=context.expert_mesh["expert_replica"], reshard_after_forward=reshard, mp_policy=policy
            )
        elif isinstance(module, Router) and param_dtype is not None:
            fully_shard(module, mesh=context.dense_mesh, reshard_after_forward=reshard, mp_policy=float32)
    # MTP: only its transformer block is a unit; its norms and projection are also used outside its forward.
    for block in [*model.layers, *(module.block for module in model.mtp)]:
        if not isinstance(block, nn.Identity):  # a block another pipeline stage holds
            fully_shard(block, mesh=context.dense_mesh, reshard_after_forward=reshard, mp_policy=policy)
    for root in roots if roots is not None else [model]:
        fully_shard(root, mesh=context.dense_mesh, reshard_after_forward=reshard, mp_policy=policy)


def local_rows(name: str, tensor: torch.Tensor, context: ParallelContext) -> LocalRows:
    """Where this rank's piece of parameter (or optimizer moment) `name` sits in the whole tensor."""
    local, start, shape = tensor, 0, tensor.shape
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        if local.dim():
            _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
            start = offset[0]
    if context.expert_degree > 1 and is_expert_parameter(name):
        start += context.ep_rank * shape[0]
        shape = torch.Size((shape[0] * context.expert_degree, *shape[1:]))
    return LocalRows(local.data if isinstance(local, nn.Parameter) else local, shape, start)


def finish_expert_gradients(model: nn.Module, context: ParallelContext) -> None:
    """With FSDP: expert gradients arrive averaged over their replica ranks (W/P of them); the one-process
    gradient divides their sum by W, so they are scaled by 1/P. (FSDP2's own gradient divide factor would do
    this in the reduce-scatter, but takes a pre-multiplied sum that gloo does not implement.)"""
    if context.expert_degree == 1:
        return
    for name, param in model.named_parameters():
        if param.grad is not None and is_expert_parameter(name):
            param.grad.div_(context.expert_degree)


def average_gradients(model: nn.Module, context: ParallelContext) -> None:
    """Without FSDP: sum every gradient over the ranks that share the parameter, divide by the world size."""
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        group = context.replica_group if is_expert_parameter(name) else None
        dist.all_reduce(param.grad, group=group if group is not None else context.dp_group)
        param.grad /= context.dp_size


def clip_grad_norm(model: nn.Module, max_norm: float, context: ParallelContext) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the global model: each element of each gradient counted once, whether
    it is sharded (FSDP), split (experts) or replicated (plain data parallelism)."""
    squares = torch.zeros((), dtype=torch.float64, device=context.device)
    grads = []
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        grads.append(grad)
        total = grad.double().pow(2).sum()
        if not context.fsdp:  # replicated copies of the same values: count each once
            expert = is_expert_parameter(name)
            total = total / (context.dp_size // context.expert_degree if expert else context.dp_size)
        squares += total
    dist.all_reduce(squares)  # every rank: the stages of a pipeline hold different parameters
    norm = squares.sqrt().float()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if math.isfinite(float(norm)):
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))
    return norm


# ---------------------------------------------------------------------------------------------- full state
def _full(tensor: torch.Tensor, name: str, context: ParallelContext) -> torch.Tensor:
    """The whole tensor on every rank: FSDP shards gathered, then expert blocks gathered over the expert group."""
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
    if context.expert_degree > 1 and is_expert_parameter(name):
        blocks = [torch.empty_like(full) for _ in range(context.expert_degree)]
        dist.all_gather(blocks, full.contiguous(), group=context.ep_group)
        full = torch.cat(blocks)
    return full.cpu()


def reshard_all(model: nn.Module) -> None:
    """Return every FSDP unit to its sharded parameters (without reshard_after_forward, a forward outside training,
    such as evaluation, leaves them gathered)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_model_state(model: nn.Module, context: ParallelContext) -> dict[str, torch.Tensor]:
    """Every parameter and buffer unsharded, in the single-process state-dict layout (all ranks call this)."""
    reshard_all(model)
    state = {name: _full(param, name, context) for name, param in model.named_parameters()}
    for name, buffer in model.named_buffers():
        if name in model.state_dict():
            state[name] = buffer.detach().cpu()
    return state


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, context: ParallelContext) -> dict:
    """The optimizer's state_dict as one process would hold it (moments unsharded), on every rank."""
    names = {id(p): n for n, p in model.named_parameters()}
    local = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, param in enumerate(params):
        entry = optimizer.state.get(param, {})
        state[index] = {
            key: _full(value, names[id(param)], context) if torch.is_tensor(value) and value.dim() else value
            for key, value in entry.items()
        }
    return {"state": state, "param_groups": local["param_groups"]}


def _shard_like(full: torch.Tensor, param: torch.Tensor, name: str, context: ParallelContext) -> torch.Tensor:
    """Cut a full tensor the way `param` is cut on this rank (expert block, then FSDP placement)."""
    if context.expert_degree > 1 and is_expert_parameter(name):
        rows = full.shape[0] // context.expert_degree
        full = full[context.ep_rank * rows : (context.ep_rank + 1) * rows]
    full = full.to(context.device)
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements)
    return full.clone()


def load_full_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    state: dict,
    context: ParallelContext,
    full_names: list[str] | None = None,
) -> None:
    """Load a full (single-process layout) optimizer state into this rank's sharded optimizer.

    full_names: the one-process model's parameter names in order, where this rank holds only some of them (a
    pipeline stage): the saved state numbers parameters by that order."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    position = {name: index for index, name in enumerate(full_names)} if full_names is not None else None
    sharded = {}
    groups = [dict(group) for group in state["param_groups"]]
    if position is not None:  # each group lists this rank's parameters only
        first = 0
        for group, local in zip(groups, optimizer.param_groups, strict=True):
            group["params"] = list(range(first, first + len(local["params"])))
            first += len(local["params"])
    for index, param in enumerate(params):
        saved = position[names[id(param)]] if position is not None else index
        entry = state["state"].get(saved, state["state"].get(str(saved), {}))
        sharded[index] = {
            key: _shard_like(value, param, names[id(param)], context)
            if torch.is_tensor(value) and value.dim()
            else value
            for key, value in entry.items()
        }
    optimizer.load_state_dict({"state": sharded, "param_groups": groups})


def shard_batch(inputs: dict[str, torch.Tensor], context: ParallelContext) -> dict[str, torch.Tensor]:
    """This rank's rows of a global micro-batch (every [B, ...] tensor cut into world-size equal parts)."""
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() and value.shape[0] % context.dp_size == 0:
            rows = value.shape[0] // context.dp_size
            out[key] = value[context.dp_rank * rows : (context.dp_rank + 1) * rows]
        else:
            out[key] = value
    return out


def token_share(context: ParallelContext):  # noqa: ANN201 - Callable[[Tensor], Tensor]
    """The loss weight of a term this rank averaged over `tokens` predicted tokens: world size x its share of
    the term's tokens over all ranks. With gradients averaged over ranks, the weighted rank means add up to the
    global batch's mean, even where shards hold different numbers of ignored labels (document ends, SFT
    prompts, MTP targets across documents)."""

    def weight(tokens: torch.Tensor) -> torch.Tensor:
        local = tokens.detach().to(torch.float64)
        total = local.clone()
        dist.all_reduce(total, group=context.dp_group)
        return (local * context.dp_size / total.clamp(min=1)).float()

    return weight


def reduce_mean(values: dict[str, float], context: ParallelContext) -> dict[str, float]:
    """The mean of each logged scalar over the ranks (each rank saw its own shard of the batch)."""
    if not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, group=context.dp_group)
    return dict(zip(values, (tensor / context.dp_size).tolist(), strict=True))

