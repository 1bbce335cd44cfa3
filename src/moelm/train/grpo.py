"""GRPO on verifiable rewards (DeepSeekMath, R1) on the same trainer as pre-training and SFT.

Each micro-batch is a rollout: `train.batch_size` prompts, `grpo.num_generations` completions each from moelm's
own batched engine (seeded per rollout and row, so a resumed run draws the same completions), scored by the
recipe's reward functions, turned into group-normalised advantages. The loss recomputes the completions'
log-probabilities under the policy (logits / temperature, the sampling distribution) and applies `grpo_loss`;
with `num_iterations` > 1 a rollout is reused with the log-probabilities stored when it was drawn. The MoE parts
stay on: aux losses the config asks for join the loss, aux-free bias updates and load telemetry continue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moelm.config import ConfigError
from moelm.data.builtin import builtin_corpus
from moelm.data.chat import render_chat
from moelm.data.source_specs import BuiltinSource, JsonlSource, SourceSpec
from moelm.data.sources import DataError, jsonl_records
from moelm.infer.generate import left_pad, stream
from moelm.infer.sampling import SamplingParams
from moelm.model.transformer import MoELM
from moelm.train.grpo_loss import clip_fractions, group_advantages, grpo_loss, k3_kl, nan_mean_std
from moelm.train.rewards import REWARDS, combine, overlong_penalty
from moelm.train.sft import SFTTrainer
from moelm.train.trainer import MicroBatch


@dataclass
class Prompt:
    """One task to reinforce: what the model is asked, and what its answer is checked against."""

    text: str  # the question (rendered through the chat template when grpo.chat_template)
    answer: str | None
    domain: str | None
    tests: list[str] | None = None
    difficulty: int = 1


def load_prompts(sources: list[SourceSpec]) -> list[Prompt]:
    """Prompts from builtin records (math, logic, code with its asserts) or JSONL {prompt, answer[, tests]}."""
    prompts: list[Prompt] = []
    for number, source in enumerate(sources):
        if isinstance(source, BuiltinSource):
            hardest = source.max_difficulty or 99
            records = builtin_corpus(source.num_records, seed=source.seed, domains=tuple(source.domains))
            for record in (r for r in records if r.difficulty <= hardest):
                tests = record.text.split("\n\n\n", 1)[1].strip().splitlines() if record.domain == "code" else None
                prompts.append(Prompt(record.prompt, record.answer, record.domain, tests, record.difficulty))
        elif isinstance(source, JsonlSource):
            path = Path(source.path)
            for line, row in jsonl_records(path):
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise DataError(f"{path}:{line}: expected an object with a string 'prompt'")
                answer = row.get("answer")
                tests = row.get("tests")
                prompts.append(Prompt(row["prompt"], None if answer is None else str(answer), row.get("domain"), tests))
        else:
            raise ConfigError(f"grpo.sources[{number}] needs format builtin or jsonl, got {source.format!r}")
    if not prompts:
        raise DataError("the GRPO sources hold no prompts")
    return prompts


@dataclass
class Rollout:
    """One micro-batch of completions with everything the loss needs (tensors) and what to log (metrics)."""

    inputs: dict[str, torch.Tensor]
    metrics: dict[str, float]


@dataclass
class RolloutBatches:
    """Rollouts as a BatchSource: micro-batch `index` samples prompts and completions seeded by its index."""

    trainer: GRPOTrainer
    train_prompts: list[Prompt]
    val_prompts: list[Prompt]
    cache: dict[int, Rollout] = field(default_factory=dict)

    def train_batch(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        grpo = self.trainer.recipe.grpo
        rollout_index = index // grpo.num_iterations
        if rollout_index not in self.cache:
            self.cache = {rollout_index: self._rollout(rollout_index)}  # only the live one is kept
        rollout = self.cache[rollout_index]
        return rollout.inputs, dict(rollout.metrics)

    def _rollout(self, rollout_index: int) -> Rollout:
        trainer, grpo = self.trainer, self.trainer.recipe.grpo
        seed = trainer.recipe.train.seed
        rng = np.random.default_rng([seed, rollout_index])
        chosen = [self.train_prompts[i] for i in rng.choice(len(self.train_prompts), trainer.recipe.train.batch_size)]
        generators = [
            torch.Generator().manual_seed(int(seed * 1_000_003 + rollout_index * 4099 + row))
            for row in range(len(chosen) * grpo.num_generations)
        ]
        start = time.perf_counter()
        sample = self.trainer.sample(chosen, grpo.num_generations, grpo.temperature, grpo.top_p, generators)
        rollout_seconds = time.perf_counter() - start
        rewards, per_function = self.trainer.score(chosen, sample, grpo.num_generations)
        advantages = group_advantages(rewards, grpo.num_generations, grpo.scale_rewards)
        judged = rewards[torch.isfinite(rewards)]
        group_std = nan_mean_std(rewards.view(-1, grpo.num_generations), dim=1)[1]
        lengths = sample["completion_mask"].sum(1).float()
        metrics: dict[str, float] = {
            "tokens": float(lengths.sum()),
            "reward": float(judged.mean()) if len(judged) else 0.0,
            "reward_std": float(judged.std()) if len(judged) > 1 else 0.0,
            "frac_reward_zero_std": float((~(group_std > 0)).float().mean()),  # NaN std (< 2 judged) counts
            "frac_unjudged": float(1 - len(judged) / len(rewards)),
            "completion_length": float(lengths.mean()),
            "completion_length_min": float(lengths.min()),
            "completion_length_max": float(lengths.max()),
            "terminated_frac": float(1 - sample["truncated"].float().mean()),
            "truncated_frac": float(sample["truncated"].float().mean()),
            "rollout_tokens_per_s": float(lengths.sum()) / max(rollout_seconds, 1e-9),
            "rollout_seconds": rollout_seconds,
        }
        for name, values in per_function.items():
            judged = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
            if len(judged):
                metrics[f"reward/{name}"] = float(judged.mean())
                metrics[f"reward/{name}_std"] = float(judged.std()) if len(judged) > 1 else 0.0
        mask = sample["completion_mask"].clone()
        if grpo.mask_truncated:
            mask[sample["truncated"]] = 0
        inputs = {
            "input_ids": sample["input_ids"],
            "attention_mask": sample["attention_mask"],
            "completion_mask": mask,
            "advantages": advantages,
        }
        if grpo.num_iterations > 1:  # the policy moves during the reuse: keep the sampling-time log-probs
            with torch.no_grad():
                inputs["old_logprobs"] = trainer.completion_logprobs(trainer.model, inputs)[0]
        return Rollout(inputs, metrics)

    @torch.no_grad()
    def evaluate(self, model: MoELM) -> dict[str, float]:
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


@dataclass
class GRPOTrainer(SFTTrainer):
    """Reinforces the model in `base_model` on recipe.grpo; checkpoints, resume and metrics as the other trainers."""

    def prepare_batches(self, tokenizer) -> RolloutBatches:  # noqa: ANN001
        grpo = self.recipe.grpo
        prompts = load_prompts(grpo.sources)
        order = np.random.default_rng(self.recipe.train.seed).permutation(len(prompts))
        held = min(grpo.eval_prompts, len(prompts) // 5)
        val = [prompts[i] for i in order[:held]]
        train = [prompts[i] for i in order[held:]]
        if not train:
            raise DataError("no GRPO prompts left for training after the held-out split")
        self.echo(f"grpo: {len(train)} training prompts, {len(val)} held out")
        return RolloutBatches(self, train, val)

    def setup(self, resume: bool = False, allow_recipe_change: bool = False) -> None:
        super().setup(resume, allow_recipe_change)
        self.reference = None
        if self.recipe.grpo.beta > 0:  # the frozen base model; none is held when beta is 0
            self.reference = (
                MoELM.from_pretrained(self.base_model, dtype=torch.float32, options=self.recipe.moe)
                .eval()
                .requires_grad_(False)
            )

    # ------------------------------------------------------------------ rollouts
    def prompt_text(self, prompt: Prompt) -> str:
        if self.recipe.grpo.chat_template:
            return render_chat([{"role": "user", "content": prompt.text}], self.chat_template(), True)
        return prompt.text

    @torch.no_grad()
    def sample(
        self,
        prompts: list[Prompt],
        per_prompt: int,
        temperature: float,
        top_p: float,
        generators: list[torch.Generator] | None,
    ) -> dict[str, Any]:
        """`per_prompt` completions of each prompt in one left-padded batch, with masks for the loss."""
        grpo, model = self.recipe.grpo, self.model
        once = [self.tokenizer.encode(self.prompt_text(p)).ids for p in prompts]  # rendered and encoded once
        encoded = [ids for ids in once for _ in range(per_prompt)]
        ids, mask = left_pad(encoded, model.config.pad_token_id or 0)
        was_training = model.training
        model.eval()
        eos = model.config.eos_token_id
        steps = stream(
            model,
            ids,
            grpo.max_completion_tokens,
            SamplingParams(temperature=temperature, top_p=top_p),
            attention_mask=mask,
            eos_token_id=eos,
            generators=generators,
        )
        new = torch.cat([step.tokens_BN for step in steps], dim=1)
        model.train(was_training)
        is_eos = new == eos
        ended = is_eos.any(dim=1)
        first_eos = torch.where(
            ended, is_eos.int().argmax(dim=1), torch.full_like(ended, new.shape[1], dtype=torch.long)
        )
        positions = torch.arange(new.shape[1]).unsqueeze(0)
        completion_mask = (positions <= first_eos.unsqueeze(1)).long() & (positions < new.shape[1])
        texts = [
            self.tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=False)
            for row, n in zip(new, first_eos, strict=True)
        ]
        return {
            "input_ids": torch.cat((ids, new), dim=1),
            "attention_mask": torch.cat((mask, completion_mask), dim=1),
            "completion_mask": completion_mask,
            "truncated": ~ended,
            "texts": texts,
        }

    def score(self, prompts: list[Prompt], sample: dict[str, Any], per_prompt: int) -> tuple[torch.Tensor, dict]:
        """Total reward per completion and each function's values (None where it could not judge)."""
        grpo = self.recipe.grpo
        repeat = [p for p in prompts for _ in range(per_prompt)]
        columns = {
            "answer": [p.answer for p in repeat],
            "domain": [p.domain for p in repeat],
            "tests": [p.tests for p in repeat],
            "completion_tokens": sample["completion_mask"].sum(1).tolist(),
        }
        texts = [text for p in prompts for text in [self.prompt_text(p)] * per_prompt]
        code_prompts = [p.text for p in repeat]
        per_function = {}
        for name in grpo.rewards:
            source = code_prompts if name == "code" else texts
            per_function[name] = REWARDS[name](source, sample["texts"], **columns)
        weights = dict(grpo.rewards)
        if grpo.overlong_cache_tokens > 0:
            penalty = overlong_penalty(grpo.max_completion_tokens, grpo.overlong_cache_tokens)
            per_function["overlong"] = penalty(texts, sample["texts"], **columns)
            weights["overlong"] = 1.0
        return torch.tensor(combine(per_function, weights), dtype=torch.float32), per_function

    # ------------------------------------------------------------------ objective
    def completion_logprobs(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Log-probabilities [B, C] of the completion tokens under `model` (logits / temperature), the entropy
        of each position's distribution, and the model output."""
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        completion = inputs["completion_mask"].shape[1]
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # per-sequence positions, as generation had them
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=completion + 1)
        logits = out.logits[:, :-1].float() / self.recipe.grpo.temperature
        logp_all = F.log_softmax(logits, dim=-1)
        logprobs = logp_all.gather(-1, ids[:, -completion:].unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logprobs, entropy, out

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, dict]:
        grpo = self.recipe.grpo
        mask = inputs["completion_mask"]
        logprobs, entropy, out = self.completion_logprobs(model, inputs)
        old = inputs.get("old_logprobs", logprobs.detach())
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = self.completion_logprobs(self.reference, inputs)[0]
        advantages = inputs["advantages"]
        loss = grpo_loss(
            logprobs,
            old,
            ref,
            advantages,
            mask,
            epsilon_low=grpo.epsilon_low,
            epsilon_high=grpo.epsilon_high,
            beta=grpo.beta,
            aggregation=grpo.aggregation,
            max_completion_length=grpo.max_completion_tokens,
            importance_sampling_level=grpo.importance_sampling_level,
            delta=grpo.delta,
            bias_correction_kl=grpo.use_bias_correction_kl,
            num_items_in_batch=self.step_completion_tokens,
            num_processes=self.context.world_size,
        )
        if grpo.aggregation == "dapo":  # normalised by the whole batch already: undo the trainer's 1 / micro-batches
            loss = loss * self.step_micro_batches
        metrics = {"policy_loss": loss.item()}
        if out.balance_loss is not None:  # the router's aux losses keep experts balanced under RL too
            loss = loss + out.balance_loss
            metrics["balance_loss"] = out.balance_loss.item()
        real = mask.bool()
        low, high = clip_fractions(
            logprobs.detach(),
            old,
            advantages,
            mask,
            grpo.epsilon_low,
            grpo.epsilon_high,
            grpo.importance_sampling_level,
        )
        metrics.update(loss=loss.item(), entropy=float(entropy.detach()[real].mean()), clip_low=low, clip_high=high)
        if ref is not None:
            metrics["kl"] = float(k3_kl(logprobs.detach(), ref)[real].mean())
        return loss, metrics, out.routing

    def begin_step(self, micro_batches: Sequence[MicroBatch]) -> None:
        """The generation batch's completion tokens (every micro-batch; every rank holds the whole batch before
        sharding it), the normaliser of the dapo aggregation."""
        self.step_micro_batches = len(micro_batches)
        self.step_completion_tokens = float(sum(inputs["completion_mask"].sum() for inputs, _ in micro_batches))

    # ------------------------------------------------------------------ exact resume with reused rollouts
    def extra_state(self) -> dict[str, Any]:
        """With num_iterations > 1 the live rollout (drawn by an earlier policy) must survive a restart."""
        if self.recipe.grpo.num_iterations == 1 or not self.batches.cache:
            return {}
        ((index, rollout),) = self.batches.cache.items()
        return {"rollout_index": index, "rollout_inputs": rollout.inputs, "rollout_metrics": rollout.metrics}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "rollout_index" in state:
            rollout = Rollout(dict(state["rollout_inputs"]), dict(state["rollout_metrics"]))
            self.batches.cache = {int(state["rollout_index"]): rollout}

    def print_samples(self, model: MoELM, tokenizer) -> None:  # noqa: ANN001
        """Greedy completions of the first held-out prompts."""
        for prompt in self.batches.val_prompts[:2]:
            sample = self.sample([prompt], 1, 0.0, 1.0, None)
            self.echo(f"--- sample ({prompt.domain}) ---\n{self.prompt_text(prompt)}{sample['texts'][0]}")
