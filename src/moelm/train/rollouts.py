"""GRPO rollouts as a batch source: prompts drawn, completions sampled and scored, groups kept, a micro-batch built.

Micro-batch `index` is a pure function of the run's seed, the index and the prompt sampler's state (part of the
checkpoint), so a resumed run draws the same rollouts. With DAPO's dynamic sampling a group whose rewards are all
equal (zero advantage, no gradient) is set aside and more prompts are drawn, up to `grpo.max_sampling_rounds`
rounds; if the rounds run out the batch is topped up with set-aside groups, so its size never changes. Groups from
different rounds are merged into one batch: prompts left-padded, completions right-padded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moelm.model.replay import moe_layers
from moelm.train.grpo_loss import group_advantages, nan_mean_std
from moelm.train.prompts import Prompt, PromptSampler

if TYPE_CHECKING:
    from moelm.train.grpo import GRPOTrainer

# The reward functions that say whether a completion is right (1.0 = passed), for the prompts' pass rates.
CORRECTNESS = ("accuracy", "code")


@dataclass
class Rollout:
    """One micro-batch of completions with everything the loss needs (tensors) and what to log (metrics)."""

    inputs: dict[str, torch.Tensor]
    metrics: dict[str, float]


@dataclass
class Group:
    """One prompt's completions, cut out of the sampled batch they were drawn in."""

    prompt_ids: list[list[int]]  # per completion, the prompt's tokens (no padding)
    completion: torch.Tensor  # [G, C] sampled tokens, right-padded
    completion_mask: torch.Tensor  # [G, C]
    truncated: torch.Tensor  # [G] bool
    rewards: torch.Tensor  # [G], NaN where nothing could judge
    per_function: dict[str, list[float | None]]

    @property
    def informative(self) -> bool:
        """Whether its rewards differ, so its advantages (and gradient) are not all zero."""
        std = nan_mean_std(self.rewards)[1]
        return bool(std > 0)


def split_groups(
    sample: dict[str, Any], rewards: torch.Tensor, per_function: dict[str, list], per_prompt: int
) -> list[Group]:
    """The sampled batch's rows, group by group (consecutive `per_prompt` rows share a prompt)."""
    completion_mask = sample["completion_mask"]
    width = sample["input_ids"].shape[1] - completion_mask.shape[1]
    groups = []
    for first in range(0, len(rewards), per_prompt):
        rows = slice(first, first + per_prompt)
        prompt_ids = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(sample["input_ids"][rows, :width], sample["attention_mask"][rows, :width], strict=True)
        ]
        groups.append(
            Group(
                prompt_ids,
                sample["input_ids"][rows, width:],
                completion_mask[rows],
                sample["truncated"][rows],
                rewards[rows],
                {name: values[rows] for name, values in per_function.items()},
            )
        )
    return groups


def merge_groups(groups: list[Group], pad_id: int) -> dict[str, Any]:
    """One batch of every group's rows: prompts left-padded to the longest, completions right-padded."""
    rows = [(ids, g.completion[i], g.completion_mask[i]) for g in groups for i, ids in enumerate(g.prompt_ids)]
    prompt_width = max(len(ids) for ids, _, _ in rows)
    completion_width = max(int(g.completion.shape[1]) for g in groups)
    input_ids = torch.full((len(rows), prompt_width + completion_width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion_mask = torch.zeros(len(rows), completion_width, dtype=torch.long)
    for r, (ids, completion, mask) in enumerate(rows):
        input_ids[r, prompt_width - len(ids) : prompt_width] = torch.tensor(ids, dtype=torch.long)
        attention[r, prompt_width - len(ids) : prompt_width] = 1
        input_ids[r, prompt_width : prompt_width + len(completion)] = completion
        completion_mask[r, : len(mask)] = mask
    attention[:, prompt_width:] = completion_mask
    per_function = {name: [v for g in groups for v in g.per_function[name]] for name in groups[0].per_function}
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion_mask,
        "truncated": torch.cat([g.truncated for g in groups]),
        "rewards": torch.cat([g.rewards for g in groups]),
        "per_function": per_function,
    }


def gather_groups(groups: list[Group]) -> list[Group]:
    """Every rank's groups, in rank order, on every rank."""
    import torch.distributed as dist

    gathered: list[list[Group] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, groups)
    return [group for part in gathered for group in part or []]


def passed(group: Group) -> list[bool]:
    """Per completion: a correctness function gave it full marks (or, without one, its reward is positive)."""
    judges = [group.per_function[name] for name in CORRECTNESS if name in group.per_function]
    if not judges:
        return [bool(r > 0) for r in group.rewards.nan_to_num(0.0).tolist()]
    return [any(values[i] is not None and values[i] >= 1.0 for values in judges) for i in range(len(group.rewards))]


@dataclass
class RolloutBatches:
    """Rollouts as a BatchSource: micro-batch `index` samples prompts and completions seeded by its index."""

    trainer: GRPOTrainer
    sampler: PromptSampler
    val_prompts: list[Prompt]
    cache: dict[int, Rollout] = field(default_factory=dict)

    @property
    def train_prompts(self) -> list[Prompt]:
        return self.sampler.prompts

    def train_batch(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        grpo = self.trainer.recipe.grpo
        rollout_index = index // grpo.num_iterations
        if rollout_index not in self.cache:
            self.cache = {rollout_index: self._rollout(rollout_index)}  # only the live one is kept
        rollout = self.cache[rollout_index]
        return rollout.inputs, dict(rollout.metrics)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Greedy completions of the held-out prompts, scored by the same reward functions."""
        if not self.val_prompts:
            return {}
        sample = self.trainer.sample(self.val_prompts, 1, 0.0, 1.0, None)
        rewards, per_function = self.trainer.score(self.val_prompts, sample, 1)
        metrics = {"eval_reward": float(rewards.nan_to_num(0.0).mean())}  # unjudged completions count as 0
        for name, values in per_function.items():
            judged = [v for v in values if v is not None]
            if judged:
                metrics[f"eval_reward/{name}"] = sum(judged) / len(judged)
        return metrics

    def _draw_groups(self, rollout_index: int) -> tuple[list[Group], dict[str, float]]:
        """Sample rounds of `train.batch_size` prompts until that many informative groups are kept (dynamic
        sampling) or one round (without it); the batch's groups and what the drawing cost."""
        trainer, grpo = self.trainer, self.trainer.recipe.grpo
        seed, want = trainer.recipe.train.seed, trainer.recipe.train.batch_size
        rng = np.random.default_rng([seed, rollout_index])
        kept: list[Group] = []
        spare: list[Group] = []
        rounds, drawn, seconds = 0, 0, 0.0
        limit = grpo.max_sampling_rounds if grpo.dynamic_sampling else 1
        context = trainer.context
        while len(kept) < want and rounds < limit:
            indices = self.sampler.draw(rng, want)  # every rank draws the same prompts
            share = slice(context.rank * want // context.world_size, (context.rank + 1) * want // context.world_size)
            chosen = [self.sampler.prompts[i] for i in indices[share]]  # and samples its own share of them
            first_row = share.start * grpo.num_generations
            seeds = [  # per global row: the rows a rank samples are those one process would sample
                int(seed * 1_000_003 + rollout_index * 4099 + row + rounds * 7_919_191)
                for row in range(first_row, first_row + len(chosen) * grpo.num_generations)
            ]
            start = time.perf_counter()
            sample = trainer.sample(chosen, grpo.num_generations, grpo.temperature, grpo.top_p, seeds)
            seconds += time.perf_counter() - start
            rewards, per_function = trainer.score(chosen, sample, grpo.num_generations)
            groups = split_groups(sample, rewards, per_function, grpo.num_generations)
            if context.distributed:  # rewards travel with their groups: every rank holds the whole batch
                groups = gather_groups(groups)
            self.sampler.observe(indices, [passed(g) for g in groups])
            for group in groups:
                (kept if group.informative or not grpo.dynamic_sampling else spare).append(group)
            rounds += 1
            drawn += len(groups)
        informative = sum(g.informative for g in kept + spare)
        batch = (kept + spare)[:want]
        cost = {
            "rollout_seconds": seconds,
            "sampling_rounds": float(rounds),
            "frac_reward_zero_std_drawn": 1 - informative / drawn,  # before dynamic sampling's filter
        }
        return batch, cost

    def _rollout(self, rollout_index: int) -> Rollout:
        trainer, grpo = self.trainer, self.trainer.recipe.grpo
        groups, cost = self._draw_groups(rollout_index)
        merged = merge_groups(groups, trainer.model.config.pad_token_id or 0)
        rewards = merged["rewards"]
        advantages = group_advantages(rewards, grpo.num_generations, grpo.scale_rewards)
        judged = rewards[torch.isfinite(rewards)]
        group_std = nan_mean_std(rewards.view(-1, grpo.num_generations), dim=1)[1]
        lengths = merged["completion_mask"].sum(1).float()
        metrics: dict[str, float] = {
            "tokens": float(lengths.sum()),
            "reward": float(judged.mean()) if len(judged) else 0.0,
            "reward_std": float(judged.std()) if len(judged) > 1 else 0.0,
            "frac_reward_zero_std": float((~(group_std > 0)).float().mean()),  # NaN std (< 2 judged) counts
            "frac_unjudged": float(1 - len(judged) / len(rewards)),
            "completion_length": float(lengths.mean()),
            "completion_length_min": float(lengths.min()),
            "completion_length_max": float(lengths.max()),
            "terminated_frac": float(1 - merged["truncated"].float().mean()),
            "truncated_frac": float(merged["truncated"].float().mean()),
            "rollout_tokens_per_s": float(lengths.sum()) / max(cost["rollout_seconds"], 1e-9),
            **cost,
            **self.sampler.metrics(),
        }
        for name, values in merged["per_function"].items():
            scored = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
            if len(scored):
                metrics[f"reward/{name}"] = float(scored.mean())
                metrics[f"reward/{name}_std"] = float(scored.std()) if len(scored) > 1 else 0.0
        mask = merged["completion_mask"].clone()
        if grpo.mask_truncated:
            mask[merged["truncated"]] = 0
        inputs = {
            "input_ids": merged["input_ids"],
            "attention_mask": merged["attention_mask"],
            "completion_mask": mask,
            "advantages": advantages,
        }
        if (grpo.routing_drift or grpo.routing_replay) and moe_layers(trainer.model):  # a dense model routes nothing
            inputs["rollout_experts"] = trainer.rollout_experts(inputs)
        if grpo.num_iterations > 1:  # the policy moves during the reuse: keep the sampling-time log-probs
            with torch.no_grad():
                inputs["old_logprobs"] = trainer.completion_logprobs(trainer.model, inputs)[0]
        return Rollout(inputs, metrics)
