"""One GRPO optimizer step over fixed micro-batches of unequal completion lengths, alone or under torchrun (used
by test_grpo_objectives.py): writes rank 0's view of the full gradients of the step."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import capture_gradients

from moelm.dist.runtime import end_process
from moelm.train.grpo import GRPOTrainer
from moelm.train.recipe import load_recipe

MICRO_BATCHES, ROWS, PROMPT, COMPLETION = 3, 4, 3, 5
# Completion tokens per row of each micro-batch: every micro-batch and every half (one rank's share) differs.
LENGTHS = [[5, 1, 2, 4], [3, 3, 5, 5], [1, 2, 1, 4]]


def fixed_micro_batches(vocab: int) -> list[tuple[dict[str, torch.Tensor], dict[str, float]]]:
    """Rollout-shaped inputs: prompt + right-padded completion, completion mask, non-zero advantages."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for lengths in LENGTHS:
        ids = torch.randint(3, vocab, (ROWS, PROMPT + COMPLETION), generator=generator)
        completion_mask = torch.zeros(ROWS, COMPLETION, dtype=torch.long)
        for row, length in enumerate(lengths):
            completion_mask[row, :length] = 1
        attention = torch.cat([torch.ones(ROWS, PROMPT, dtype=torch.long), completion_mask], dim=1)
        advantages = torch.randn(ROWS, generator=generator)
        inputs = {
            "input_ids": ids,
            "attention_mask": attention,
            "completion_mask": completion_mask,
            "advantages": advantages,
        }
        batches.append((inputs, {"tokens": float(completion_mask.sum())}))
    return batches


def recipe_overrides(task_overrides: list[str], aggregation: str) -> list[str]:
    return [
        *task_overrides,
        f"grpo.aggregation={aggregation}",
        f"grpo.max_completion_tokens={COMPLETION + 3}",  # dr_grpo divides by the maximum, not the padded width
        "optim.grad_clip=1e9",  # the captured gradient is the raw one
        f"train.grad_accum={MICRO_BATCHES}",
        "train.batch_size=2",
        "log.sample_tokens=0",
    ]


def step_gradients(base: Path, out: Path, overrides: list[str]) -> tuple[GRPOTrainer, dict[str, torch.Tensor]]:
    """Set up a GRPOTrainer and run one train_step on the fixed micro-batches; the full gradients it applied."""
    trainer = GRPOTrainer(load_recipe(None, overrides), out, echo=lambda _: None, base_model=base)
    trainer.setup()
    grads = capture_gradients(trainer)
    trainer.train_step(fixed_micro_batches(trainer.model.config.vocab_size), trainer.loss)
    return trainer, grads


def main(base: str, out: str, result: str, aggregations: str, *task_overrides: str) -> None:
    """Each comma-separated aggregation in turn (one process group, a fresh trainer each)."""
    results, is_main = {}, True
    for aggregation in aggregations.split(","):
        overrides = recipe_overrides(list(task_overrides), aggregation)
        trainer, results[aggregation] = step_gradients(Path(base), Path(out) / aggregation, overrides)
        is_main = trainer.context.is_main
    if is_main:
        torch.save(results, result)


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_process(0)  # as `torchrun -m moelm` workers end
