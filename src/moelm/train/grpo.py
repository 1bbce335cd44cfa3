"""GRPO on verifiable rewards (DeepSeekMath, R1) on the same trainer as pre-training and SFT.

Each micro-batch is a rollout: `train.batch_size` prompts, `grpo.num_generations` completions each from moelm's
own batched engine (seeded per rollout and row, so a resumed run draws the same completions), scored by the
recipe's reward functions, turned into group-normalised advantages. The loss recomputes the completions'
log-probabilities under the policy (logits / temperature, the sampling distribution) and applies `grpo_loss`;
with `num_iterations` > 1 a rollout is reused with the log-probabilities stored when it was drawn. The MoE parts
stay on: aux losses the config asks for join the loss, aux-free bias updates and load telemetry continue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moelm.data.chat import render_chat
from moelm.data.sources import DataError
from moelm.infer.compiled import CompiledDecode, compile_decode
from moelm.infer.generate import left_pad, stream
from moelm.infer.prefix_cache import PrefixCache
from moelm.infer.sampling import SamplingParams
from moelm.model.lora import lora_merged
from moelm.model.peft_format import is_adapter_dir
from moelm.model.replay import drift, moe_layers, replay_routing, routed_experts
from moelm.model.transformer import MoELM
from moelm.train.grpo_loss import clip_fractions, grpo_loss, k3_kl
from moelm.train.prompts import Prompt, PromptSampler, load_prompts
from moelm.train.rewards import REWARDS, combine, overlong_penalty
from moelm.train.rollouts import Rollout, RolloutBatches
from moelm.train.sft import SFTTrainer
from moelm.train.trainer import MicroBatch

__all__ = ["GRPOTrainer", "Prompt", "load_prompts"]


@dataclass
class GRPOTrainer(SFTTrainer):
    """Reinforces the model in `base_model` on recipe.grpo; checkpoints, resume and metrics as the other trainers."""

    _compiled_policy: CompiledDecode | None = field(default=None, init=False, repr=False)  # compile_rollouts

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
        sampler = PromptSampler(train, grpo.difficulty_sampling, grpo.curriculum, grpo.curriculum_unlock_at)
        return RolloutBatches(self, sampler, val)

    def setup(self, resume: bool = False, allow_recipe_change: bool = False) -> None:
        super().setup(resume, allow_recipe_change)
        self.reference = None
        if self.recipe.grpo.beta > 0:  # the frozen base model; none is held when beta is 0
            options = self.recipe.moe
            if self.parallel.distributed and not is_adapter_dir(self.base_model):  # laid out as the policy is
                reference = MoELM.from_pretrained(self.base_model, device="meta", options=options)
                reference = self.parallel.load_pretrained(reference.requires_grad_(False), self.base_directory())
            else:
                reference = MoELM.from_pretrained(self.base_model, dtype=torch.float32, options=options)
            self.reference = reference.eval().requires_grad_(False)

    # ------------------------------------------------------------------ rollouts
    def prompt_text(self, prompt: Prompt) -> str:
        if self.recipe.grpo.chat_template:
            return render_chat([{"role": "user", "content": prompt.text}], self.chat_template(), True)
        return prompt.text

    def _rollout_compiled(self) -> CompiledDecode | None:
        """The policy's compiled decode step when grpo.compile_rollouts asks for it (built on first use)."""
        if not self.recipe.grpo.compile_rollouts or self.context.distributed:
            return None
        if self._compiled_policy is None or self._compiled_policy.model is not self.model:
            self._compiled_policy = compile_decode(self.model)
        return self._compiled_policy

    @torch.no_grad()
    def sample(
        self,
        prompts: list[Prompt],
        per_prompt: int,
        temperature: float,
        top_p: float,
        seeds: list[int] | None,
    ) -> dict[str, Any]:
        """`per_prompt` completions of each prompt in one left-padded batch, with masks for the loss."""
        model = self.model
        once = [self.tokenizer.encode(self.prompt_text(p)).ids for p in prompts]  # rendered and encoded once
        encoded = [ids for ids in once for _ in range(per_prompt)]
        ids, mask = left_pad(encoded, model.config.pad_token_id or 0)
        device = self.context.device  # prompts and the cache on the model's device; results come back to the CPU
        ids, mask = ids.to(device), mask.to(device)
        was_training = model.training
        model.eval()
        with lora_merged(model):  # adapters folded in once for the rollout (not per decode step), then restored
            new = self._decode(model, ids, mask, temperature, top_p, seeds)
        ids, mask = ids.cpu(), mask.cpu()
        model.train(was_training)
        return self._completions(ids, mask, new)

    def _decode(
        self,
        model: MoELM,
        ids: torch.Tensor,
        mask: torch.Tensor,
        temperature: float,
        top_p: float,
        seeds: list[int] | None,
    ) -> torch.Tensor:
        """The sampled completion tokens [rows, max_completion_tokens] on the CPU."""
        grpo, eos = self.recipe.grpo, model.config.eos_token_id
        steps = stream(
            model,
            ids,
            grpo.max_completion_tokens,
            SamplingParams(temperature=temperature, top_p=top_p),
            attention_mask=mask,
            eos_token_id=eos,
            seeds=seeds,
            compiled=self._rollout_compiled(),
            prefix_cache=PrefixCache(),  # the group's completions share its prompt: prefilled once
            run_to_end=self.context.distributed,  # ranks sample different rows: every rank takes every step
        )
        return torch.cat([step.tokens_BN for step in steps], dim=1).cpu()

    def _completions(self, ids: torch.Tensor, mask: torch.Tensor, new: torch.Tensor) -> dict[str, Any]:
        """Prompts plus completions, cut after each row's first EOS, with the masks the loss needs."""
        eos = self.model.config.eos_token_id
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
    @torch.no_grad()
    def rollout_experts(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The experts each token of the rollout goes to under the sampling policy, [B, L, T, k]: the policy's
        forward over the sampled sequences right after sampling (eval mode, the whole rollout batch), which is what
        the decode steps computed up to floating-point differences."""
        model = self.model
        was_training = model.training
        model.eval()
        out = self._forward(model, inputs, keep=1)
        model.train(was_training)
        return routed_experts(out.routing, inputs["input_ids"].shape[0], sorted(moe_layers(model)))

    def _forward(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], keep: int) -> Any:
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # per-sequence positions, as generation had them
        return model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep)

    def completion_logprobs(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Log-probabilities [B, C] of the completion tokens under `model` (logits / temperature), the entropy
        of each position's distribution, and the model output."""
        ids = inputs["input_ids"]
        completion = inputs["completion_mask"].shape[1]
        out = self._forward(model, inputs, keep=completion + 1)
        logits = out.logits[:, :-1].float() / self.recipe.grpo.temperature
        logp_all = F.log_softmax(logits, dim=-1)
        logprobs = logp_all.gather(-1, ids[:, -completion:].unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logprobs, entropy, out

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, dict]:
        grpo = self.recipe.grpo
        mask = inputs["completion_mask"]
        recorded = inputs.get("rollout_experts")
        replay = replay_routing(self.model, recorded) if grpo.routing_replay else contextlib.nullcontext()
        with replay:
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
        if recorded is not None:
            metrics.update(self._drift_metrics(recorded, out.routing, mask))
        return loss, metrics, out.routing

    def _drift_metrics(self, recorded: torch.Tensor, routing: dict, completion_mask: torch.Tensor) -> dict[str, float]:
        """Per MoE layer, the share of completion tokens whose experts in this training forward differ from the
        rollout's (under routing replay: the experts the router would have chosen, against the replayed ones)."""
        layers = sorted(moe_layers(self.model))
        rows = recorded.shape[0]
        chosen = routed_experts(routing, rows, layers, natural=True).to(recorded.device)
        prompt = recorded.shape[2] - completion_mask.shape[1]
        token_mask = torch.cat([torch.zeros(rows, prompt, device=completion_mask.device), completion_mask], dim=1)
        shares = drift(recorded, chosen, token_mask.to(recorded.device))
        metrics = {f"routing_drift/layer{layer}": float(share) for layer, share in zip(layers, shares, strict=True)}
        metrics["routing_drift"] = float(shares.mean())
        return metrics

    def begin_step(self, micro_batches: Sequence[MicroBatch]) -> None:
        """The generation batch's completion tokens (every micro-batch; every rank holds the whole batch before
        sharding it), the normaliser of the dapo aggregation."""
        self.step_micro_batches = len(micro_batches)
        self.step_completion_tokens = float(sum(inputs["completion_mask"].sum() for inputs, _ in micro_batches))

    # ------------------------------------------------------------------ exact resume with reused rollouts
    def extra_state(self) -> dict[str, Any]:
        """The prompt sampler's pass rates and level, and with num_iterations > 1 the live rollout (drawn by an
        earlier policy): what a restart needs to draw and train on what the uninterrupted run would."""
        state: dict[str, Any] = {"prompt_sampler": self.batches.sampler.state()}
        if self.recipe.grpo.num_iterations == 1 or not self.batches.cache:
            return state
        ((index, rollout),) = self.batches.cache.items()
        return {**state, "rollout_index": index, "rollout_inputs": rollout.inputs, "rollout_metrics": rollout.metrics}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "prompt_sampler" in state:
            self.batches.sampler.load_state(state["prompt_sampler"])
        if "rollout_index" in state:
            rollout = Rollout(dict(state["rollout_inputs"]), dict(state["rollout_metrics"]))
            self.batches.cache = {int(state["rollout_index"]): rollout}

    def print_samples(self, model: MoELM, tokenizer) -> None:  # noqa: ANN001
        """Greedy completions of the first held-out prompts."""
        for prompt in self.batches.val_prompts[:2]:
            sample = self.sample([prompt], 1, 0.0, 1.0, None)
            self.echo(f"--- sample ({prompt.domain}) ---\n{self.prompt_text(prompt)}{sample['texts'][0]}")
