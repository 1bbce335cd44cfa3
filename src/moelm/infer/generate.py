"""Batched generation in the shape transformers' generate has: a left-padded batch in, tokens out.

Both run the rows through the one decode loop, `moelm.infer.engine.Engine`, stepped in the caller's thread.
Each sequence stops on its own (EOS ids, a stop callback, max_new_tokens); finished sequences emit
`pad_token_id` while the others continue. `stream` yields tokens as they are produced; `generate` collects
them into prompt + new tokens. MTP speculation (one unpadded sequence) keeps its own loop here: a draft and
its verification change the step's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from moelm.infer.compiled import CompiledDecode
from moelm.infer.engine import Engine, EngineRequest, TokenEvent
from moelm.infer.prefix_cache import PrefixCache
from moelm.infer.rows import left_pad
from moelm.infer.sampling import SamplingParams, draw, token_distribution
from moelm.model.cache import KVCache
from moelm.model.transformer import MoELM

__all__ = ["GenerationStats", "StepOutput", "generate", "left_pad", "stream"]

StopCheck = Callable[[int, list[int]], bool]  # (sequence index, its new tokens so far) -> stop?


@dataclass
class StepOutput:
    """Tokens produced for every sequence in one engine step (1, or more when speculation was accepted)."""

    tokens_BN: torch.Tensor  # [B, N] new tokens (pad for finished sequences)
    finished_B: torch.Tensor  # [B] bool, finished after this step


@dataclass
class GenerationStats:
    """What a generation cost and, with speculation, how often drafts were accepted."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _eos_set(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    """EOS ids as a set: tokens are read back to the host each step, so stopping is decided there."""
    if eos_token_id is None:
        return frozenset()
    return frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)


def stream(model: MoELM, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Iterator[StepOutput]:
    """Yield each step's new tokens until every sequence has stopped or max_new_tokens were produced (see
    `_stream` for the arguments).

    Decoding runs in inference mode, except for a model whose parameters are sharded over processes (FSDP2):
    inference mode there would leave the gathered-parameter buffers as inference tensors that the next training
    forward cannot refill, so such a model decodes under no_grad.
    """
    sharded = isinstance(next(model.parameters()), DTensor)  # FSDP2 shards every parameter or none
    grad_free = torch.no_grad() if sharded else torch.inference_mode()
    return grad_free(_stream)(model, input_ids, *args, **kwargs)


def _stream(
    model: MoELM,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    params: SamplingParams | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop: StopCheck | None = None,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    speculative: bool = False,
    stats: GenerationStats | None = None,
    compiled: CompiledDecode | None = None,
    run_to_end: bool = False,
    prefix_cache: PrefixCache | None = None,
) -> Iterator[StepOutput]:
    """Yield each engine step's new tokens until every sequence has stopped or max_new_tokens were produced.

    The rows run through `Engine` (one prefill, then decode steps), driven here in the caller's thread.
    `seeds` (one per row) or `seed` (row i gets seed + i) make sampling reproducible; a row's tokens depend on
    its own seed only, not on the batch around it. `compiled` (from `compile_decode(model)`) runs every decode
    step through its compiled graph. `run_to_end` decodes all max_new_tokens steps even when every row has
    stopped: processes that generate different rows of a sharded model must take part in every step's
    collectives. `prefix_cache` prefills identical prompts once and reuses stored prompt blocks (entries are
    valid for the weights they were computed with: a training loop passes a fresh one per rollout).
    """
    params = params or SamplingParams()
    stats = stats if stats is not None else GenerationStats()
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if speculative:
        yield from _speculative(
            model, input_ids, attention_mask, max_new_tokens, params, eos_token_id, stop, seed, seeds, stats
        )
        return
    if seeds is None and seed is not None:
        seeds = [seed + row for row in range(batch)]
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
    engine = Engine(
        model,
        list(_eos_set(eos_token_id)),
        max_batch=batch,
        max_waiting=batch,
        pad_token_id=pad,
        compiled=compiled,
        prefix_cache=prefix_cache,
    )
    errors: list[str] = []
    arrived: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch

    def listener(row: int):  # noqa: ANN202 - the request's callback
        def on_event(event: TokenEvent) -> None:
            if event.error is not None:
                errors.append(event.error)
            if event.token is not None:
                arrived[row].append(event.token)
                stats.new_tokens += 1
            finished[row] = finished[row] or event.finish_reason is not None

        return on_event

    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        stats.prompt_tokens += len(prompt)
        row_stop = None if stop is None else (lambda tokens, row=row: stop(row, tokens))
        engine.add(
            EngineRequest(
                prompt,
                max_new_tokens,
                listener(row),
                params,
                seed=None if seeds is None else seeds[row],
                stop=row_stop,
                hold_row=run_to_end,
            )
        )
    while engine.busy:
        engine.step()
        if errors:
            raise RuntimeError(errors[0])
        stats.steps += 1
        width = max(1, *(len(tokens) for tokens in arrived))  # held rows after every stop: a step of pads
        step = torch.tensor([tokens + [pad] * (width - len(tokens)) for tokens in arrived], device=input_ids.device)
        for tokens in arrived:
            tokens.clear()
        yield StepOutput(step, torch.tensor(finished, device=input_ids.device))


def _speculative(
    model: MoELM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_id: int | Sequence[int] | None,
    stop: StopCheck | None,
    seed: int | None,
    seeds: Sequence[int] | None,
    stats: GenerationStats,
) -> Iterator[StepOutput]:
    """MTP speculation for one unpadded sequence (a draft and its verification change the step's shape)."""
    if input_ids.shape[0] != 1 or not len(model.mtp) or not bool(attention_mask.all()):
        raise ValueError("speculative decoding needs a model with MTP modules and one unpadded sequence")
    first_seed = seeds[0] if seeds is not None else seed
    generators = None if first_seed is None else [torch.Generator(device=input_ids.device).manual_seed(first_seed)]
    capacity = input_ids.shape[1] + max_new_tokens + 1
    cache = KVCache(model.config, 1, capacity, dtype=model.compute_dtype, device=input_ids.device)
    stats.prompt_tokens += input_ids.shape[1]
    out = model(input_ids, cache=cache, logits_to_keep=1)
    yield from _speculative_loop(
        model, cache, out, input_ids, max_new_tokens, params, _eos_set(eos_token_id), stop, generators, stats
    )


def _speculative_loop(
    model: MoELM,
    cache: KVCache,
    prefill,  # noqa: ANN001 - the prompt's MoELMOutput
    input_ids: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: frozenset[int],
    stop: StopCheck | None,
    generators: list[torch.Generator] | None,
    stats: GenerationStats,
) -> Iterator[StepOutput]:
    """Draft one token with the MTP head, verify it with one 2-token forward, accept by the standard rule.

    Greedy: accept iff the model's argmax equals the draft, so the output is exactly plain greedy. Sampling:
    accept with probability min(1, p(d) / q(d)), else resample from norm(max(0, p - q)), which leaves the
    output distribution the model's own (Leviathan et al. 2023).

    Invariant at the top of the loop: the cache holds slots 0..e-1, the MTP layer holds entries for slots
    0..e-2 (an entry needs the token after its slot), `pending` is the sampled token for slot e.
    """
    generator = generators[0] if generators else None
    produced: list[int] = []
    history = input_ids.clone()

    def emit(tokens: list[int]) -> tuple[StepOutput, bool]:
        kept, done = [], False
        for token in tokens:
            kept.append(token)
            produced.append(token)
            stats.new_tokens += 1
            done = token in eos_ids or (stop is not None and stop(0, produced)) or len(produced) >= max_new_tokens
            if done:
                break
        return StepOutput(torch.tensor([kept], device=input_ids.device), torch.tensor([done])), done

    hidden = prefill.hidden_states
    slots = cache.length
    positions = torch.arange(slots, device=input_ids.device).unsqueeze(0)
    if slots > 1:  # MTP entries for the prompt: (h_i, token i+1)
        model.mtp_logits(hidden[:, :-1], input_ids[:, 1:], positions[:, :-1], cache, 0)
    pending = draw(token_distribution(prefill.logits[:, -1], params, history), generator)
    history = torch.cat((history, pending.unsqueeze(1)), dim=1)
    last_hidden, last_position = hidden[:, -1:], positions[:, -1:]
    step, done = emit([int(pending)])
    yield step
    while not done and cache.length + 2 <= cache.capacity:
        e = cache.length
        draft_logits = model.mtp_logits(last_hidden, pending.unsqueeze(1), last_position, cache, e - 1)
        draft_probs = token_distribution(draft_logits[:, -1], params, history)
        draft = draw(draft_probs, generator)
        out = model(torch.stack((pending, draft), dim=1), cache=cache)
        stats.drafted += 1
        stats.steps += 1
        target = token_distribution(out.logits[:, 0], params, history)
        d = int(draft)
        if params.greedy:
            accept = int(target[0].argmax()) == d
        else:
            ratio = (target[0, d] / draft_probs[0, d].clamp(min=1e-20)).clamp(max=1.0)
            accept = bool(torch.rand((), generator=generator) < ratio)
        if accept:
            stats.accepted += 1
            history = torch.cat((history, draft.unsqueeze(1)), dim=1)
            pending = draw(token_distribution(out.logits[:, 1], params, history), generator)
            slot_e_position = cache.next_position.unsqueeze(1) - 2
            model.mtp_logits(out.hidden_states[:, :1], draft.unsqueeze(1), slot_e_position, cache, e)
            last_hidden, last_position = out.hidden_states[:, 1:], slot_e_position + 1
            emitted = [d, int(pending)]
        else:
            cache.truncate(e + 1)
            residual = target if params.greedy else (target - draft_probs).clamp(min=0)
            pending = draw(residual / residual.sum(dim=-1, keepdim=True).clamp(min=1e-20), generator)
            if params.greedy:
                pending = target.argmax(dim=-1)
            last_hidden, last_position = out.hidden_states[:, :1], cache.next_position.unsqueeze(1) - 1
            emitted = [int(pending)]
        history = torch.cat((history, pending.unsqueeze(1)), dim=1)
        step, done = emit(emitted)
        yield step


def generate(
    model: MoELM,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    stop: StopCheck | None = None,
    speculative: bool = False,
    stats: GenerationStats | None = None,
    compiled: CompiledDecode | None = None,
) -> torch.Tensor:
    """Prompt + new tokens [B, T + n] like transformers' generate (finished rows padded with pad_token_id)."""
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    steps = stream(
        model,
        input_ids,
        max_new_tokens,
        params,
        attention_mask=attention_mask,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        stop=stop,
        seed=seed,
        speculative=speculative,
        stats=stats,
        compiled=compiled,
    )
    pieces = [step.tokens_BN for step in steps]
    new = torch.cat(pieces, dim=1) if pieces else input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.cat((input_ids, new[:, :max_new_tokens]), dim=1)
