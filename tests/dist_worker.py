"""Run under torchrun (or alone) by test_dist.py: a held-out evaluation, then one optimizer step of the tiny
recipe; writes rank 0's view of the full (unsharded) gradients, the step's loss and the routing biases after it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import TINY_RUN, capture_gradients

from moelm.dist.runtime import end_process
from moelm.train.recipe import load_recipe
from moelm.train.trainer import Trainer


def main(out: str, result: str, *overrides: str) -> None:
    recipe = load_recipe(None, [*TINY_RUN, "train.max_steps=1", "log.sample_tokens=0", *overrides])
    trainer = Trainer(recipe, Path(out), echo=lambda line: None)
    trainer.setup()
    grads = capture_gradients(trainer)
    trainer.evaluate(trainer.model, trainer.batches)  # a forward outside training first, as runs do
    batch = [trainer.batches.train_batch(i) for i in range(recipe.train.grad_accum)]
    record = trainer.train_step(batch, trainer.loss)
    biases = {n: b.clone() for n, b in trainer.model.named_buffers() if n.endswith("e_score_correction_bias")}
    if trainer.context.is_main:
        torch.save({"grads": grads, "loss": record["loss"], "grad_norm": record["grad_norm"], "biases": biases}, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[3:])
    end_process(0)  # as `torchrun -m moelm` workers end
