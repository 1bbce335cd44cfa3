"""Pipeline parallelism: the blocks cut into stages over the "pp" ranks, run by torch.distributed.pipelining.

A stage is a contiguous run of decoder blocks; the first stage also embeds the tokens, the last one also holds
the final norm and the head, and computes the loss. With S pipeline ranks and v stages per rank the model is cut
into S x v stages: one per rank for 1F1B, v per rank placed round-robin for interleaved 1F1B (stage i on rank
i mod S), and two per rank placed as a V for DualPipeV (stage i on rank i, stage 2S-1-i on rank i), so the V's
first and last stages share rank 0.

Each rank keeps the `MoELM` itself, with the blocks of other ranks' stages replaced by `nn.Identity` and the
embedding / head removed where it holds neither: parameter names stay those of one process, so seeded init
gives every tensor the values one process would, and a sharded checkpoint written under any pipeline layout
loads into any other (DCP matches tensors by name).

Gradients equal one process's: the head's loss is the micro-batch's token mean (times the data-parallel token
weight), the schedule divides every gradient by the number of micro-batches as `Trainer` divides each
micro-batch's loss, and each stage's balance losses enter the backward at the stage's output through an identity
whose backward adds their gradient (Megatron's MoEAuxLossAutoScaler does the same), since they cannot travel to
the last stage's loss. A stage's balance losses are divided by the number of MoE layers of the whole model,
which makes their sum over stages the one-process mean over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moelm.config import ConfigError
from moelm.constants import IGNORE_INDEX
from moelm.dist.runtime import ParallelContext
from moelm.model.router import Routing
from moelm.model.transformer import MoELM, causal_lm_loss, document_mask

SCHEDULES = ("1f1b", "interleaved_1f1b", "dualpipev")


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: its index, the pipeline rank that runs it, and the blocks it holds."""

    index: int
    rank: int
    layers: range


def stages_per_rank(schedule: str, virtual_stages: int) -> int:
    return {"1f1b": 1, "interleaved_1f1b": virtual_stages, "dualpipev": 2}[schedule]


def plan_stages(num_layers: int, degree: int, schedule: str, virtual_stages: int = 2) -> list[StagePlan]:
    """Every stage of the pipeline, blocks split as evenly as possible (earlier stages take the remainder)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"invalid parallel.pipeline_schedule={schedule!r}: must be one of {', '.join(SCHEDULES)}")
    count = degree * stages_per_rank(schedule, virtual_stages)
    if count > num_layers:
        raise ConfigError(
            f"parallel.pipeline_degree={degree} with parallel.pipeline_schedule={schedule} needs {count} stages "
            f"of at least one block: the model has model.num_hidden_layers={num_layers}"
        )
    plans, start = [], 0
    for index in range(count):
        size = num_layers // count + (index < num_layers % count)
        if schedule == "dualpipev":
            rank = index if index < degree else 2 * degree - 1 - index
        else:
            rank = index % degree
        plans.append(StagePlan(index, rank, range(start, start + size)))
        start += size
    return plans


def check_pipeline_model(model: MoELM, degree: int) -> None:
    """What a pipeline cannot split: MTP reads the embedding and the head's hidden states on one stage, and tied
    embeddings would share one weight between the first and the last stage."""
    config = model.config
    if config.num_nextn_predict_layers:
        raise ConfigError(
            f"parallel.pipeline_degree={degree} needs model.num_nextn_predict_layers=0 (multi-token prediction "
            f"reads the embedding on the last stage), got {config.num_nextn_predict_layers}"
        )
    if config.tie_word_embeddings:
        raise ConfigError(
            f"parallel.pipeline_degree={degree} needs model.tie_word_embeddings=false (the embedding and the head "
            "sit on different stages)"
        )


class _AddLossGradient(torch.autograd.Function):
    """Identity on the hidden states; its backward also gives `loss` the gradient 1 (the schedule scales it with
    every other gradient), so a stage's balance losses train its routers without reaching the last stage."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return hidden.clone()  # not a view: DualPipeV's split backward detaches stage outputs in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad.device)


class PipelineStageModule(nn.Module):
    """The forward of one stage: (token ids or hidden states, positions, document ids) -> the next stage's
    inputs, or the logits on the last stage. The blocks are the rank's `MoELM`'s own modules."""

    def __init__(self, model: MoELM, plan: StagePlan, num_stages: int, num_moe_layers: int) -> None:
        super().__init__()
        self.index, self.num_stages = plan.index, num_stages
        self.is_first, self.is_last = plan.index == 0, plan.index == num_stages - 1
        self.embed_tokens = model.embed_tokens if self.is_first else None
        self.layers = nn.ModuleList(model.layers[i] for i in plan.layers)
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.rotary = model.rotary
        self.attention_kernel = model.attention_kernel
        self.num_moe_layers = max(num_moe_layers, 1)
        self.routings: list[dict[int, Routing]] = []  # per training micro-batch, in the order they ran
        self.balance_values: list[dict[str, float]] = []

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.embed_tokens(x) if self.is_first else x
        mask = document_mask(document_ids, self.attention_kernel)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        routing: dict[int, Routing] = {}
        for block in self.layers:
            hidden, layer_routing = block(hidden, cos, sin, mask)
            if layer_routing is not None:
                routing[block.layer_idx] = layer_routing
        losses: dict[str, torch.Tensor] = {}
        for layer_routing in routing.values():
            for kind, value in layer_routing.losses.items():
                losses[kind] = losses.get(kind, 0.0) + value / self.num_moe_layers
        if self.training and torch.is_grad_enabled():
            self.routings.append(routing)
            self.balance_values.append({kind: float(value) for kind, value in losses.items()})
            if losses:
                hidden = _AddLossGradient.apply(hidden, sum(losses.values()))
        if self.is_last:
            return self.lm_head(self.norm(hidden))
        # Fresh tensors, not views of the chunked batch: split backwards (DualPipeV) detach outputs in place.
        return hidden, position_ids.clone(), document_ids.clone()

    def take_records(self) -> tuple[list[dict[int, Routing]], list[dict[str, float]]]:
        routings, values = self.routings, self.balance_values
        self.routings, self.balance_values = [], []
        return routings, values


class HeldElsewhere(nn.Identity):
    """The place of a block another pipeline rank holds: no parameters, and no MoE layer here."""

    is_moe = False

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx


def keep_own_parts(model: MoELM, plans: list[StagePlan]) -> None:
    """Drop from this rank's model what its stages do not hold (names of the rest unchanged)."""
    owned = {i for plan in plans for i in plan.layers}
    for i in range(len(model.layers)):
        if i not in owned:
            model.layers[i] = HeldElsewhere(i)
    last = model.config.num_hidden_layers - 1
    if 0 not in owned:
        model.embed_tokens = None
    if last not in owned:
        model.norm = None
        model.lm_head = None


@dataclass
class StepRecord:
    """What a pipelined step leaves for the trainer: per micro-batch routings of this rank's layers, and the
    step's loss terms as one process would log them (the same on every rank after `PipelineRunner.step`)."""

    routings: list[dict[int, Routing]]
    values: dict[str, float]


class PipelineRunner:
    """This rank's stages and the schedule that runs a step's micro-batches through all of them."""

    def __init__(
        self,
        model: MoELM,
        context: ParallelContext,
        schedule: str = "1f1b",
        virtual_stages: int = 2,
    ) -> None:
        check_pipeline_model(model, context.pipeline_degree)
        if schedule == "dualpipev" and context.fsdp:
            # Measured here: with a rank holding the V's first and last stage as two FSDP roots, the last stage's
            # split weight backward missed FSDP's reduction (its gradients came out ~35% off the one-process ones).
            raise ConfigError(
                "parallel.pipeline_schedule=dualpipev runs with parallel.fsdp=false (FSDP2 does not reduce the "
                "split weight backward of the V's last stage); or use 1f1b / interleaved_1f1b with FSDP"
            )
        self.context = context
        self.schedule_name = schedule
        self.all_plans = plan_stages(
            model.config.num_hidden_layers, context.pipeline_degree, schedule, virtual_stages
        )
        self.plans = [plan for plan in self.all_plans if plan.rank == context.pp_rank]
        moe_layers = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
        self.modules = [PipelineStageModule(model, plan, len(self.all_plans), moe_layers) for plan in self.plans]
        self._schedules: dict[int, object] = {}
        self._token_weight = None
        self._lm_losses: list[torch.Tensor] = []

    @property
    def holds_first(self) -> bool:
        return any(module.is_first for module in self.modules)

    @property
    def holds_last(self) -> bool:
        return any(module.is_last for module in self.modules)

    def _stage_owner(self, index: int) -> int:
        """The global rank that runs stage `index` in this rank's pipeline."""
        return self.all_plans[index].rank * self.context.dp_size + self.context.dp_rank

    # ------------------------------------------------------------------ training
    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lm_loss = causal_lm_loss(logits, labels)
        self._lm_losses.append(lm_loss.detach())
        if self._token_weight is None:
            return lm_loss
        return lm_loss * self._token_weight((labels[:, 1:] != IGNORE_INDEX).sum())

    def _schedule(self, micro_batches: int):  # noqa: ANN202 - a torch.distributed.pipelining schedule
        if micro_batches in self._schedules:
            return self._schedules[micro_batches]
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import (
            Schedule1F1B,
            ScheduleDualPipeV,
            ScheduleInterleaved1F1B,
        )

        stages = [
            PipelineStage(module, module.index, module.num_stages, self.context.device, group=self.context.pp_group)
            for module in self.modules
        ]
        needed = len(self.all_plans) if self.schedule_name == "dualpipev" else self.context.pipeline_degree
        if micro_batches < needed:
            raise ConfigError(
                f"parallel.pipeline_schedule={self.schedule_name} on {self.context.pipeline_degree} pipeline ranks "
                f"needs train.grad_accum >= {needed} micro-batches per step, got {micro_batches}"
            )
        if self.schedule_name == "1f1b":
            schedule = Schedule1F1B(stages[0], micro_batches, loss_fn=self._loss)
        elif self.schedule_name == "interleaved_1f1b":
            schedule = ScheduleInterleaved1F1B(stages, micro_batches, loss_fn=self._loss)
        else:
            schedule = ScheduleDualPipeV(stages, micro_batches, loss_fn=self._loss)
        self._schedules[micro_batches] = schedule
        return schedule

    def step(self, micro_batches: list[dict[str, torch.Tensor]], token_weight=None) -> StepRecord:  # noqa: ANN001
        """Forward and backward of every micro-batch (this rank's data-parallel rows, on its device); gradients
        are left accumulated and scaled as one process would have them before its reduction."""
        schedule = self._schedule(len(micro_batches))
        self._token_weight, self._lm_losses = token_weight, []
        whole = {key: torch.cat([batch[key] for batch in micro_batches]) for key in micro_batches[0]}
        args = (whole["input_ids"], whole["position_ids"], whole["document_ids"]) if self.holds_first else ()
        target = whole["labels"] if self.holds_last else None
        schedule.step(*args, target=target)
        routings: list[dict[int, Routing]] = [{} for _ in micro_batches]
        balance: dict[str, float] = {}
        for module in self.modules:
            module_routings, values = module.take_records()
            # The first step also runs a forward to learn the shapes stages exchange: its records are dropped.
            module_routings, values = module_routings[-len(micro_batches) :], values[-len(micro_batches) :]
            for index, routing in enumerate(module_routings):
                routings[index].update(routing)
            for entry in values:
                for kind, value in entry.items():
                    balance[kind] = balance.get(kind, 0.0) + value / len(micro_batches)
        lm_losses = self._lm_losses[-len(micro_batches) :]  # after the shape-learning forward, if any
        lm_loss = sum(float(loss) for loss in lm_losses) / len(micro_batches) if self.holds_last else 0.0
        return StepRecord(routings, self._share_over_stages(lm_loss, balance))

    def _share_over_stages(self, lm_loss: float, balance: dict[str, float]) -> dict[str, float]:
        """The step's loss terms summed over the stages of this rank's pipeline (each term lives on one or more
        stages), so every rank logs and checks the one-process values."""
        kinds = sorted(self._balance_kinds(balance))
        values = torch.tensor([lm_loss, *(balance.get(kind, 0.0) for kind in kinds)], dtype=torch.float64)
        dist.all_reduce(values, group=self.context.pp_group)
        out = {"lm_loss": float(values[0])}
        out.update({kind: float(value) for kind, value in zip(kinds, values[1:].tolist(), strict=True)})
        out["loss"] = sum(out.values())
        return out

    def _balance_kinds(self, balance: dict[str, float]) -> set[str]:
        """Every balance-loss kind any stage produced (a stage without MoE layers produces none)."""
        kinds: list[set[str] | None] = [None] * dist.get_world_size(self.context.pp_group)
        dist.all_gather_object(kinds, set(balance), group=self.context.pp_group)
        return set().union(*kinds)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def forward_loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The LM loss of one batch through every stage, forward only (evaluation), on every rank."""
        device, group = self.context.device, self.context.pp_group
        inputs = {key: value.to(device) for key, value in inputs.items()}
        by_index = {module.index: module for module in self.modules}
        me = self.context.rank
        carried: torch.Tensor | None = None
        loss = torch.zeros((), dtype=torch.float32, device=device)
        for index in range(len(self.all_plans)):
            owner = self._stage_owner(index)
            previous = self._stage_owner(index - 1) if index else owner
            if owner == me and previous != me:
                carried = _receive_hidden(previous, inputs["input_ids"].shape, device, group)
            if owner != me:
                if previous == me:
                    _send_hidden(carried, owner, group)
                continue
            module = by_index[index]
            x = inputs["input_ids"] if index == 0 else carried
            out = module(x, inputs["position_ids"], inputs["document_ids"])
            if module.is_last:
                loss = causal_lm_loss(out, inputs["labels"]).float()
            else:
                carried = out[0]
        dist.broadcast(loss, src=self._stage_owner(len(self.all_plans) - 1), group=group)
        return loss


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _send_hidden(hidden: torch.Tensor, peer: int, group: dist.ProcessGroup) -> None:
    header = torch.tensor([_DTYPES.index(hidden.dtype), hidden.shape[-1]], dtype=torch.int64)
    dist.send(header.to(hidden.device), dst=peer, group=group)
    dist.send(hidden.contiguous(), dst=peer, group=group)


def _receive_hidden(peer: int, shape: torch.Size, device: torch.device, group: dist.ProcessGroup) -> torch.Tensor:
    header = torch.empty(2, dtype=torch.int64, device=device)
    dist.recv(header, src=peer, group=group)
    hidden = torch.empty((*shape, int(header[1])), dtype=_DTYPES[int(header[0])], device=device)
    dist.recv(hidden, src=peer, group=group)
    return hidden


@dataclass
class PipelineOutput:
    """The part of `MoELMOutput` evaluation reads."""

    lm_loss: torch.Tensor


class PipelinedModel:
    """A model-like callable for evaluation under pipelining: `model(**batch).lm_loss` as one process computes it."""

    def __init__(self, runner: PipelineRunner) -> None:
        self.runner = runner

    def __call__(self, **inputs: torch.Tensor) -> PipelineOutput:
        return PipelineOutput(self.runner.forward_loss(inputs))
