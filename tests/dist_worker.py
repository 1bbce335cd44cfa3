"""Run under torchrun (or alone) by test_dist.py: a held-out evaluation, then one optimizer step of the tiny
recipe; writes rank 0's view of the full (unsharded) initial weights and gradients, the step's loss, the routing
biases after it and the dtype the first block's attention weight had inside its forward. Under pipeline
parallelism the first data-parallel rank of each stage writes its stage's part to RESULT.stage<N>."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from conftest import TINY_RUN, capture_gradients

from moelm.dist.meters import SavedTensorMeter, measured_state_bytes
from moelm.dist.runtime import end_process
from moelm.train.recipe import load_recipe
from moelm.train.trainer import Trainer


def main(out: str, result: str, *overrides: str) -> None:
    recipe = load_recipe(None, [*TINY_RUN, "train.max_steps=1", "log.sample_tokens=0", *overrides])
    trainer = Trainer(recipe, Path(out), echo=lambda line: None)
    trainer.setup()
    grads = capture_gradients(trainer)
    initial = gathered_state(trainer)
    seen = {}
    block = next(module for module in trainer.model.layers if not isinstance(module, torch.nn.Identity))

    def record_dtype(module, _args) -> None:  # noqa: ANN001
        seen.setdefault("dtype", str(module.self_attn.o_proj.weight.dtype))

    block.register_forward_pre_hook(record_dtype)
    evaluation = trainer.evaluate(trainer.model, trainer.batches)  # a forward outside training first, as runs do
    batch = [trainer.batches.train_batch(i) for i in range(recipe.train.grad_accum)]
    if os.environ.get("MOELM_TEST_WARM_STEP"):  # measure a steady step (a pipeline's first learns its shapes)
        trainer.train_step(batch, trainer.loss)
    measured = measure_state(trainer)
    if trainer.context.expert_degree > 1:  # the evaluation's exchanges are not the step's
        from moelm.dist.expert_parallel import take_exchange_stats

        take_exchange_stats(trainer.model)
    with SavedTensorMeter(list(trainer.model.parameters())) as meter:
        record = trainer.train_step(batch, trainer.loss)
    measured.update(activations=float(meter.peak), a2a_bytes=float(record.get("dist/a2a_bytes_sent", 0.0)))
    biases = {n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("e_score_correction_bias")}
    context = trainer.context
    if context.dp_rank == 0:
        saved = {"grads": grads, "loss": record["loss"], "grad_norm": record["grad_norm"], "biases": biases}
        saved.update(initial=initial, gathered_dtype=seen["dtype"], val_loss=evaluation["val_loss"])
        saved["measured"] = measured
        saved["record"] = {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
        torch.save(saved, f"{result}.stage{context.pp_rank}" if context.pipeline_degree > 1 else result)


def measure_state(trainer: Trainer) -> dict[str, float]:
    """This rank's parameter and gradient bytes just before the optimizer step, moment bytes just after."""
    measured: dict[str, float] = {}
    step = trainer.optimizer.step

    def measuring_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        before = measured_state_bytes(trainer.model, trainer.optimizer)
        result = step(*args, **kwargs)
        after = measured_state_bytes(trainer.model, trainer.optimizer)
        measured.update(parameters=before["parameters"], gradients=before["gradients"], optimizer=after["optimizer"])
        return result

    trainer.optimizer.step = measuring_step
    return measured


def gathered_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer this rank's stage holds, gathered over its data-parallel ranks."""
    from moelm.dist.sharding import full_model_state

    if not trainer.context.distributed:
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return {k: v.clone() for k, v in full_model_state(trainer.model, trainer.context).items()}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[3:])
    end_process(0)  # as `torchrun -m moelm` workers end
