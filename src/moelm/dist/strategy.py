"""One object that knows how training is laid out over ranks, so the training loop does not have to.

`ParallelStrategy` owns building (meta device, then each rank's shards only), sharding (expert parallelism,
FSDP2 with its mixed-precision policy), the per-rank cut of each batch, gradient reduction and clipping, metric
reduction, and saving and loading. A run without torchrun is the same object with a world of one: every method
then does what one process does (the batch stays whole, gradients are clipped locally, checkpoints are a model
directory plus the trainer state), so `Trainer` calls it without asking where it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from moelm.dist.runtime import ParallelContext
from moelm.model.init import LocalRows, seeded_init_
from moelm.model.transformer import MoELM

if TYPE_CHECKING:
    from moelm.dist.pipeline import PipelineRunner


class ParallelStrategy:
    """Layout, collectives and checkpoint format of one run (see the module docstring)."""

    def __init__(
        self,
        context: ParallelContext,
        mixed_precision: torch.dtype | None = None,
        pipeline_schedule: str = "1f1b",
        virtual_stages: int = 2,
    ) -> None:
        self.context = context
        self.mixed_precision = mixed_precision  # FSDP2's gather dtype (bf16 training); None: float32 gathers
        self.pipeline_schedule, self.virtual_stages = pipeline_schedule, virtual_stages
        self.pipeline: PipelineRunner | None = None  # this rank's stages, once a model is laid out over them

    # ------------------------------------------------------------------ where this rank stands
    @property
    def distributed(self) -> bool:
        return self.context.distributed

    @property
    def is_main(self) -> bool:
        return self.context.is_main

    @property
    def device(self) -> torch.device:
        return self.context.device

    # ------------------------------------------------------------------ building
    def materialize(self, model: MoELM, seed: int) -> MoELM:
        """A model built on the meta device, laid out over the ranks, then given values on this rank's shards only:
        the seeded per-tensor init of `moelm.model.init`, equal for every world size and expert degree."""
        self._lay_out(model)
        model.to_empty(device=self.device)
        seeded_init_(model, seed, model.config.initializer_range, self.local_rows)
        return model

    @torch.no_grad()
    def load_pretrained(self, model: MoELM, path: Path) -> MoELM:
        """A model built on the meta device from the directory `path` (`MoELM.from_pretrained(..., device="meta")`),
        laid out over the ranks, then given this rank's rows of each stored tensor, read one tensor at a time:
        no rank holds the whole model (a pipeline rank does not even read other stages' tensors)."""
        from moelm.model.hf import pretrained_tensors
        from moelm.model.init import reset_buffers

        tensors = pretrained_tensors(model, path, wanted=lambda name: name in held)  # whole shapes, before layout
        self._lay_out(model)
        model.to_empty(device=self.device)
        reset_buffers(model)
        held = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, whole in tensors:
            target = held[name]
            if isinstance(target, nn.Parameter):
                place = self.local_rows(name, target)
                rows = place.local.shape[0] if place.local.dim() else 0
                place.local.copy_(whole[place.start : place.start + rows] if place.local.dim() else whole)
            else:
                target.copy_(whole)
        return model

    def distribute(self, model: MoELM) -> MoELM:
        """A model with values (a loaded base model, a full-state checkpoint): moved, then laid out."""
        model.to(self.device)
        self._lay_out(model)
        return model

    def _lay_out(self, model: MoELM) -> None:
        """Pipeline stages (this rank keeps its own blocks), then expert parallelism, then FSDP2."""
        if not self.distributed:
            return
        from moelm.dist.expert_parallel import shard_experts
        from moelm.dist.sharding import apply_fsdp

        context = self.context
        roots = None
        if context.pipeline_degree > 1:
            from moelm.dist.pipeline import PipelineRunner, keep_own_parts

            self.pipeline = PipelineRunner(model, context, self.pipeline_schedule, self.virtual_stages)
            keep_own_parts(model, self.pipeline.plans)
            roots = self.pipeline.modules
        if context.expert_degree > 1:
            shard_experts(model, context.ep_group, context.expert_degree, context.ep_rank)
        if context.fsdp:
            apply_fsdp(model, context, self.mixed_precision, roots)

    def local_rows(self, name: str, tensor: torch.Tensor) -> LocalRows:
        """Which rows of the whole tensor `name` this rank holds (expert block, then FSDP shard)."""
        from moelm.dist.sharding import local_rows

        return local_rows(name, tensor, self.context)

    def optimizer_options(self) -> dict[str, Any]:
        """AdamW's fused kernel takes plain tensors only: sharded parameters take the foreach path."""
        return {"fused": None if self.distributed else True}

    # ------------------------------------------------------------------ a step
    def check_batch_size(self, batch_size: int) -> None:
        """Each rank reads an equal share of the global batch."""
        ranks = self.context.dp_size
        if batch_size % ranks:
            what = "world size" if ranks == self.context.world_size else "data-parallel ranks of a pipeline stage"
            raise ValueError(
                f"train.batch_size={batch_size} must be a multiple of the {what} {ranks}"
                " (each rank reads an equal share of the global batch)"
            )

    def local_batch(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global micro-batch, cut on the host, then moved to the device."""
        if self.distributed:
            from moelm.dist.sharding import shard_batch

            inputs = shard_batch(inputs, self.context)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def token_weight(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The per-term loss weight that makes rank means add up to the global mean (None in one process)."""
        if not self.distributed:
            return None
        from moelm.dist.sharding import token_share

        return token_share(self.context)

    def accumulate(
        self,
        micro_batches: list[tuple[dict[str, torch.Tensor], dict[str, float]]],
        loss_of: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float], Any]],
        autocast: contextlib.AbstractContextManager,
        observe: Callable[[Any], None],
    ) -> tuple[dict[str, float], float, Any]:
        """Forward and backward of a step's micro-batches (each this rank's rows), gradients accumulated as the
        mean over them: one by one through `loss_of`, or all at once through the pipeline schedule, whose last
        stage computes the LM loss. `observe` sees each micro-batch's routing. Returns the metrics averaged over
        the micro-batches, the step's token count and the last routing."""
        totals: dict[str, float] = {}
        tokens, routing, count = 0.0, {}, len(micro_batches)

        def add(values: dict[str, float]) -> None:
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + value / count

        routings = None
        if self.pipeline is not None:
            with autocast:
                record = self.pipeline.step([self.local_batch(inputs) for inputs, _ in micro_batches], self.token_weight())
            totals, routings = dict(record.values), record.routings
        for index, (inputs, batch_metrics) in enumerate(micro_batches):
            batch_metrics = dict(batch_metrics)
            tokens += batch_metrics.pop("tokens")
            if routings is None:
                with autocast:
                    loss, loss_metrics, routing = loss_of(self.local_batch(inputs))  # rows cut before they travel
                (loss / count).backward()
                add(loss_metrics)
            else:
                routing = routings[index]
            observe(routing)
            add(batch_metrics)
        return totals, tokens, routing

    def reduce_gradients(self, model: nn.Module) -> None:
        """Gradients as one process would have them: plain data parallelism all-reduces here; FSDP reduce-scattered
        them in the backward (expert gradients get their last factor here)."""
        if not self.distributed:
            return
        from moelm.dist.sharding import average_gradients, finish_expert_gradients

        if self.context.fsdp:
            finish_expert_gradients(model, self.context)
        else:
            average_gradients(model, self.context)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global gradient norm (each element counted once) after clipping to max_norm."""
        if not self.distributed:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        from moelm.dist.sharding import clip_grad_norm

        return clip_grad_norm(model, max_norm, self.context)

    def reduce_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """Each logged scalar averaged over the ranks (each saw its own shard of the batch)."""
        if not self.distributed:
            return values
        from moelm.dist.sharding import reduce_mean

        return reduce_mean(values, self.context)

    def exchange_metrics(self, model: nn.Module, elapsed: float) -> dict[str, float]:
        """The step's all-to-all traffic of expert parallelism (nothing without it)."""
        if not self.distributed or self.context.expert_degree == 1:
            return {}
        from moelm.dist.expert_parallel import take_exchange_stats

        stats = take_exchange_stats(model)
        return {"dist/a2a_bytes_sent": stats.bytes_sent, "dist/a2a_time_share": stats.seconds / elapsed}

    # ------------------------------------------------------------------ agreement between ranks
    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may write files), the others after it (they read them)."""
        if not self.distributed:
            yield
            return
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def agreed_stop(self, requested: int | None) -> int | None:
        """A signal seen by any rank stops every rank at the same step (else the collectives would hang)."""
        if not self.distributed:
            return requested
        flag = torch.tensor([requested or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def rank_rng_states(self) -> list[torch.Tensor]:
        """Every rank's CPU generator state (each rank draws its own dropout and noise)."""
        states = [torch.get_rng_state()]
        if self.distributed:
            states = [None] * self.context.world_size
            dist.all_gather_object(states, torch.get_rng_state())
        return states

    # ------------------------------------------------------------------ whole models
    def reshard(self, model: nn.Module) -> None:
        """FSDP units back to their shards after a forward outside training (evaluation)."""
        if self.distributed and self.context.fsdp:
            from moelm.dist.sharding import reshard_all

            reshard_all(model)
            for stage in self.pipeline.modules if self.pipeline is not None else ():
                reshard_all(stage)

    def evaluation_model(self, model: MoELM) -> Callable:
        """What held-out evaluation calls as `model(**batch)`: the model, or its stages run forward in turn."""
        if self.pipeline is None:
            return model
        from moelm.dist.pipeline import PipelinedModel

        return PipelinedModel(self.pipeline)

    def full_model(self, model: MoELM) -> MoELM:
        """An unsharded CPU copy of the model (every rank takes part in the gathers); the model itself in one
        process. Only sample generation under torchrun asks for it."""
        if not self.distributed:
            return model
        if self.pipeline is not None:
            raise ValueError("a pipelined model is never gathered whole: read its exported model directory instead")
        from moelm.dist.sharding import full_model_state

        state = full_model_state(model, self.context)
        with torch.device("meta"):
            full = MoELM(model.config, model.options)
        full.load_state_dict(state, assign=True)
        if full.config.tie_word_embeddings:
            full.lm_head.weight = full.embed_tokens.weight
        full.rotary = type(full.rotary)(full.config, full.rotary.inv_freq.shape[0] * 2)
        return full.eval()

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> None:
        """A one-process optimizer state (an older or one-process checkpoint) cut into this rank's shards."""
        if not self.distributed:
            optimizer.load_state_dict(state)
            return
        from moelm.dist.sharding import load_full_optimizer_state

        full_names = None
        if self.pipeline is not None:  # this rank holds some parameters: the saved state numbers all of them
            with torch.device("meta"):
                full_names = [name for name, _ in MoELM(model.config, model.options).named_parameters()]
        load_full_optimizer_state(optimizer, model, state, self.context, full_names)

    # ------------------------------------------------------------------ sharded checkpoints
    @property
    def sharded_checkpoints(self) -> bool:
        """Under torchrun each rank writes its own shards (DCP); one process writes a model directory."""
        return self.distributed

    def save_shards(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """This rank's shards of weights and optimizer moments into `directory` (all ranks call it)."""
        from moelm.dist.checkpoint import save_shards

        save_shards(directory, model, optimizer, self.context)

    def load_shards(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Fill this rank's shards from a sharded checkpoint written on any layout."""
        from moelm.dist.checkpoint import load_shards

        load_shards(directory, model, optimizer, self.context)
