"""Run under torchrun by test_dist.py to check sharded checkpoints from inside the ranks.

`die-in-save OUT STEPS DIE_AT ...`: pre-train with rank 1 killed right after it wrote its shards of the step-DIE_AT
checkpoint (before rank 0 sealed it). `memory RESULT ...`: one step of a mid-size model, then rank 0's resident
memory sampled while the ranks save a sharded checkpoint and load it back; writes the peak rises beside the
size of the full (unsharded) training state, and the rise of gathering that state (the old way) as a check."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from conftest import TINY_RUN

from moelm.dist.checkpoint import SHARDS_DIR
from moelm.dist.meters import ResidentPeak
from moelm.dist.runtime import end_process
from moelm.dist.sharding import full_optimizer_state
from moelm.dist.strategy import ParallelStrategy
from moelm.train.recipe import load_recipe
from moelm.train.trainer import Trainer


def die_in_save(out: str, steps: str, die_at: str, *overrides: str) -> None:
    original = ParallelStrategy.save_shards

    def save_then_die(self, directory, model, optimizer) -> None:  # noqa: ANN001
        original(self, directory, model, optimizer)
        if self.context.rank == 1 and f"step-{die_at}-" in str(directory):
            os._exit(9)

    ParallelStrategy.save_shards = save_then_die
    recipe = load_recipe(None, [*TINY_RUN, f"train.max_steps={steps}", "log.sample_tokens=0", *overrides])
    Trainer(recipe, Path(out), echo=lambda line: None).run()


def memory(out: str, result: str, *overrides: str) -> None:
    recipe = load_recipe(None, [*TINY_RUN, "train.max_steps=1", "log.sample_tokens=0", *overrides])
    trainer = Trainer(recipe, Path(out), echo=lambda line: None)
    trainer.setup()
    trainer.train_step([trainer.batches.train_batch(0)], trainer.loss)
    trainer.state.step = 1
    named = trainer.model.named_parameters()
    parameters = sum(trainer.parallel.local_rows(name, p).global_shape.numel() for name, p in named)
    with ResidentPeak() as save:
        trainer.save()
    with ResidentPeak() as load:
        trainer.parallel.load_shards(
            Path(out) / "checkpoints" / "step-1" / SHARDS_DIR, trainer.model, trainer.optimizer
        )
    with ResidentPeak() as gathered:  # the instrument's check: what a gathered (one-process layout) save holds
        held = (
            trainer.parallel.full_model(trainer.model),
            full_optimizer_state(trainer.optimizer, trainer.model, trainer.context),
        )
    del held
    if trainer.context.is_main:
        full_state = parameters * 4 * 3  # float32 weights and AdamW's two moments
        peaks = {"save": save.peak, "load": load.peak, "gathered": gathered.peak}
        Path(result).write_text(json.dumps({**peaks, "full_state": full_state}))


if __name__ == "__main__":
    {"die-in-save": die_in_save, "memory": memory}[sys.argv[1]](*sys.argv[2:])
    end_process(0)
