"""The one decode loop: continuous batching, eager or compiled, with every row sampled on the device at once.

Requests join the running batch between steps and leave it when they finish. Each step runs one decode step
over every running row, then admits waiting requests (one batched prefill, its rows placed in free cache rows,
see `moelm.infer.rows`); it samples all rows with their own settings and seeds in one batched call
(`moelm.infer.row_sampling`), and reports each new token through the request's callback. Nothing here knows
about text or HTTP.

`step()` is the loop's body and can be driven by the caller (`generate`, `stream`, eval, GRPO rollouts: the
caller's thread, so a sharded model's collectives run where the caller expects them), or by the engine's own
thread (`start()` / `submit()`, the server).

With a `prefix_cache`, identical prompts in one admission are prefilled once and each prompt's leading blocks
found in the store are copied in rather than computed (moelm.infer.prefix_cache).

With `compiled`, decode steps run through a compiled graph of fixed shape: the cache is a contiguous tensor of
a bucketed size (rows a power of two up to max_batch, slots a power of two from 64), idle rows are computed
and ignored, and a batch that outgrows its bucket moves to the next one; a continuous batch thus reuses a few
graphs, and AOT packages are kept on disk between processes (moelm.infer.aot).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from moelm.infer import rows as cache_rows
from moelm.infer.compiled import CompiledDecode
from moelm.infer.logit_rules import RowLogitRules
from moelm.infer.prefix_cache import PrefixCache
from moelm.infer.row_sampling import RowSettings
from moelm.infer.sampling import SamplingParams
from moelm.infer.structured import Constraint, masked_logits
from moelm.model.cache import CacheCapacityError, KVCache
from moelm.model.router import Router
from moelm.model.transformer import MoELM

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"
MIN_COMPILED_SLOTS = 64


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: the caller should answer 429 and let the client retry."""


class EngineDeadError(RuntimeError):
    """The engine thread has stopped: nothing will be generated any more."""


@dataclass
class TokenEvent:
    """One step's result for one request: a new token (or none), and why it finished if it did."""

    token: int | None
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


@dataclass
class EngineRequest:
    """What the engine needs to run one completion; `on_event` is called on the thread that steps the engine."""

    prompt_ids: list[int]
    max_new_tokens: int
    on_event: Callable[[TokenEvent], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # None: a seed drawn from torch's global generator when the request is added
    stop: Callable[[list[int]], bool] | None = None  # new tokens so far -> stop here?
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's and the top k
    # None: none; k >= 0: each prompt token's log-probability given the tokens before it (from the second token
    # on) and the top k there, left in `prompt_logprobs_out` before the first event (vLLM's prompt_logprobs)
    prompt_logprobs: int | None = None
    # OpenAI's logit rules (moelm.infer.logit_rules) and vLLM's extra end tokens
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    constraint: Constraint | None = None  # structured output: only tokens its grammar allows (infer.structured)
    ignore_eos: bool = False  # run to max_new_tokens (load tests with fixed output lengths)
    # keep decoding to max_new_tokens after finishing (tokens unreported): processes that each generate rows
    # of one sharded model must all take the same number of steps, since every step runs collectives
    hold_row: bool = False
    request_id: int = field(default_factory=itertools.count().__next__)
    # engine-side state
    new_tokens: list[int] = field(default_factory=list)
    prompt_logprobs_out: list[tuple[float, list[tuple[int, float]]]] | None = None
    steps: int = 0  # tokens sampled for this request, reported or (after finishing, when held) not
    finish_reason: str | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)


@dataclass
class EngineStats:
    """Counters the metrics exporter reads (the engine thread writes them)."""

    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cache_slots_used: int = 0
    cache_slots_total: int = 0
    steps: int = 0
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of which found there


def row_bucket(rows: int, max_batch: int) -> int:
    """The compiled batch size serving `rows` running rows: the next power of two, at most max_batch."""
    return min(max_batch, 1 << max(rows - 1, 0).bit_length())


def slot_bucket(slots: int) -> int:
    """The compiled cache capacity serving `slots` slots: the next power of two, at least 64."""
    return max(MIN_COMPILED_SLOTS, 1 << (slots - 1).bit_length())


class Engine:
    """The decode loop around one model (see the module docstring)."""

    def __init__(
        self,
        model: MoELM,
        eos_token_ids: list[int],
        max_batch: int = 16,
        max_model_len: int | None = None,
        max_waiting: int = 256,
        pad_token_id: int = 0,
        on_finish: Callable[[EngineRequest, str], None] | None = None,
        on_step: Callable[[EngineStats], None] | None = None,
        compiled: CompiledDecode | None = None,
        count_experts: bool = False,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if compiled is not None and compiled.model is not model:
            raise ValueError("the compiled decode step belongs to another model")
        self.model = model
        self.config = model.config
        self.eos = frozenset(eos_token_ids)
        self.max_batch = max_batch
        self.max_model_len = min(
            max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings
        )
        self.pad = pad_token_id
        self.on_finish = on_finish
        self.on_step = on_step
        self.compiled = compiled
        self.prefix_cache = prefix_cache
        self.device = device = next(model.parameters()).device
        self.dtype = model.compute_dtype  # the cache holds the residual stream's entries
        # FSDP2 shards every parameter or none; a sharded model's blocks gather their weights only in forward
        self.sharded = isinstance(next(model.parameters()), DTensor)
        if compiled is None:
            # Two model lengths of slots: compaction is needed at most once per max_model_len steps.
            self.cache = KVCache(self.config, max_batch, 2 * self.max_model_len, dtype=self.dtype, device=device)
        else:
            self.cache = KVCache(self.config, 1, MIN_COMPILED_SLOTS, dtype=self.dtype, device=device)
        self.settings = RowSettings(max_batch, device)
        self.seen: torch.Tensor | None = None  # [max_batch, V] tokens each row has seen (repetition penalty)
        self.rules = RowLogitRules(max_batch, self.config.vocab_size, device)
        self.pending = torch.full((max_batch,), pad_token_id, dtype=torch.long, device=device)
        self.waiting: queue.Queue[EngineRequest] = queue.Queue(maxsize=max_waiting)
        self.running: list[EngineRequest] = []  # running[i] owns cache row i
        self.stats = EngineStats(cache_slots_total=max_batch * self.max_model_len)
        self._counting = count_experts
        self._hooks: list = []
        self.expert_counts = self._count_expert_tokens() if count_experts else {}
        self._wake = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="moelm-engine", daemon=True)

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.close()

    def close(self) -> None:
        """Remove the routing hooks this engine put on the model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stopping

    def submit(self, request: EngineRequest) -> None:
        """Queue a request for the engine thread; EngineOverloadedError when the waiting queue is full,
        EngineDeadError after a crash."""
        if not self.alive:
            reason = f" ({self.error!r})" if self.error else ""
            raise EngineDeadError(f"the engine has stopped{reason}")
        self.add(request)
        self._wake.set()

    def add(self, request: EngineRequest) -> None:
        """Queue a request for the next `step()` (a ValueError names what does not fit)."""
        if not request.prompt_ids:
            raise ValueError("every prompt needs at least one token")
        if len(request.prompt_ids) + request.max_new_tokens > self.max_model_len:
            raise CacheCapacityError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds "
                f"the model length {self.max_model_len}{self._length_source()}"
            )
        if request.seed is None:  # greedy draws nothing: the caller's RNG stream stays untouched
            request.seed = 0 if request.params.greedy else int(torch.randint(0, 2**62, ()).item())
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise EngineOverloadedError(f"{self.waiting.maxsize} requests are already waiting") from None

    def _length_source(self) -> str:
        limit = self.config.max_position_embeddings
        return f" (max_position_embeddings={limit})" if self.max_model_len == limit else ""

    def cancel(self, request: EngineRequest) -> None:
        """Stop a request at the next step boundary (client gone); its row is freed by the engine thread."""
        request.cancelled = True
        self._wake.set()

    @property
    def busy(self) -> bool:
        return bool(self.running) or not self.waiting.empty()

    def step(self) -> None:
        """Decode one token for every running row, then admit what fits and prefill it (its first token): each
        request gets exactly one token per step. Every event is reported before this returns."""
        self._drop_cancelled()
        if self.running:
            self._decode()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self.on_step is not None:  # the gauges cost a device read: only for a listener (the server's metrics)
            self.stats.running, self.stats.waiting = len(self.running), self.waiting.qsize()
            self.stats.cache_slots_used = int(self.cache.valid[: len(self.running)].sum()) if self.running else 0
            if self.prefix_cache is not None:
                self.stats.prefix_queried_tokens = self.prefix_cache.stats.queried_tokens
                self.stats.prefix_hit_tokens = self.prefix_cache.stats.hit_tokens
            self.on_step(self.stats)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.busy:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                with torch.inference_mode():
                    self.step()
        except BaseException as error:  # noqa: BLE001 - reported to every request, then the engine is dead
            self.error = error
            for request in self.running + self._drain_waiting():
                self._emit(request, TokenEvent(None, FINISH_ERROR, error=f"engine failure: {error}"))
            self.running = []
            raise

    def _drain_waiting(self) -> list[EngineRequest]:
        drained = []
        while True:
            try:
                drained.append(self.waiting.get_nowait())
            except queue.Empty:
                return drained

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self.running))):
            if self.running[row].cancelled:
                self._finish(row, FINISH_ABORT)

    def _admit(self) -> list[EngineRequest]:
        """Take waiting requests while there are free rows (cancelled ones are answered and dropped)."""
        admitted = []
        while len(self.running) + len(admitted) < self.max_batch:
            try:
                request = self.waiting.get_nowait()
            except queue.Empty:
                break
            if request.cancelled:
                self._report_finish(request, FINISH_ABORT)
                continue
            admitted.append(request)
        return admitted

    def _prefill(self, requests: list[EngineRequest]) -> None:
        """One batched forward over the new prompts, their cache rows placed after the running ones."""
        scoring = any(r.prompt_logprobs is not None for r in requests)
        try:
            logits, scratch, source_rows = self._prefill_forward([r.prompt_ids for r in requests], scoring)
            if scoring:  # every position's logits: score the prompts that asked, keep the last position
                for request, source in zip(requests, source_rows, strict=True):
                    if request.prompt_logprobs is not None:
                        request.prompt_logprobs_out = self._score_prompt(logits[source], request)
                logits = logits[:, -1]
        except Exception as error:  # noqa: BLE001 - this batch fails, the engine carries on
            for request in requests:
                self._emit(request, TokenEvent(None, FINISH_ERROR, error=f"prefill failed: {error}"))
                self._report_finish(request, FINISH_ERROR)
            return
        width = scratch.length
        self._make_room(len(self.running) + len(requests), width)
        end = max(self.cache.length, width)
        rows = list(range(len(self.running), len(self.running) + len(requests)))
        cache_rows.place_rows(self.cache, scratch, rows, end, source_rows)
        for row, request in zip(rows, requests, strict=True):
            self.stats.prompt_tokens += len(request.prompt_ids)
            self.running.append(request)
            self.settings.assign(row, request.params, request.seed)
            self.rules.assign(
                row, request.logit_bias, request.presence_penalty, request.frequency_penalty, request.min_tokens
            )
            if request.params.repetition_penalty != 1.0:  # HF's rule: prompt and completion tokens so far
                self._seen()[row] = False
                self._seen()[row, torch.tensor(request.prompt_ids, device=self.device)] = True
        self._sample_and_emit(logits[source_rows], len(rows), first=rows[0])

    def _prefill_forward(
        self, prompts: list[list[int]], every_position: bool = False
    ) -> tuple[torch.Tensor, KVCache, list[int]]:
        """Last-position logits and a scratch cache for the prompts, and which scratch row serves each prompt.

        With a prefix cache, identical prompts are computed once, and each prompt's stored leading blocks are
        copied in instead of computed: the forward covers only the rest, and the prompts' blocks are stored.
        every_position: logits [rows, width, V] for every (left-padded) position, the whole prompt computed."""
        source_rows = list(range(len(prompts)))
        found: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in prompts]
        if self.prefix_cache is not None:
            unique: dict[tuple[int, ...], int] = {}
            source_rows = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
            prompts = [list(p) for p in unique]
            if len(prompts) > 1 and not every_position:
                self._store_shared_prefixes(prompts)
            if not every_position:  # scoring needs the logits of the cached positions too
                found = [self.prefix_cache.lookup(p) for p in prompts]
        block = self.prefix_cache.block_size if self.prefix_cache is not None else 0
        cached = [len(blocks) * block for blocks in found]  # prompt tokens taken from the store, per row
        ids, mask = cache_rows.left_pad([p[n:] for p, n in zip(prompts, cached, strict=True)], self.pad)
        longest_prefix = max(cached)
        width = longest_prefix + ids.shape[1]
        scratch = KVCache(self.config, len(prompts), width, dtype=self.dtype, device=self.device)
        for row, blocks in enumerate(found):
            cache_rows.fill_prefix(scratch, row, blocks, longest_prefix)
        scratch.length = scratch.max_next_position = longest_prefix
        keep = 0 if every_position else 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = self.model(ids, attention_mask=mask, cache=scratch, logits_to_keep=keep)
        if self.prefix_cache is not None:
            for row, prompt in enumerate(prompts):
                self.prefix_cache.store(prompt, scratch, row)
        return (logits.logits if every_position else logits.logits[:, -1]), scratch, source_rows

    def _score_prompt(
        self, logits_TV: torch.Tensor, request: EngineRequest
    ) -> list[tuple[float, list[tuple[int, float]]]]:
        """For prompt tokens 2..n: (its log-probability, the top k) from the logits of the position before it.
        The prompt is right-aligned in its left-padded row."""
        prompt = request.prompt_ids
        before_TV = logits_TV[logits_TV.shape[0] - len(prompt) : -1].float().log_softmax(-1)
        targets = torch.tensor(prompt[1:], device=before_TV.device)
        chosen = before_TV.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        k = request.prompt_logprobs
        if not k:
            return [(value, []) for value in chosen]
        top = before_TV.topk(k, dim=-1)
        pairs = [
            list(zip(ids, values, strict=True))
            for ids, values in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
        return list(zip(chosen, pairs, strict=True))

    def _store_shared_prefixes(self, prompts: list[list[int]]) -> None:
        """Prefill the leading blocks several new prompts share, once, into the prefix cache."""
        shared = self.prefix_cache.shared_prefixes(prompts)
        if not shared:
            return
        ids, mask = cache_rows.left_pad(shared, self.pad)
        scratch = KVCache(self.config, len(shared), ids.shape[1], dtype=self.dtype, device=self.device)
        self.model(ids.to(self.device), attention_mask=mask.to(self.device), cache=scratch, logits_to_keep=1)
        for row, prefix in enumerate(shared):
            self.prefix_cache.store(prefix, scratch, row)

    def _seen(self) -> torch.Tensor:
        if self.seen is None:
            self.seen = torch.zeros(self.max_batch, self.config.vocab_size, dtype=torch.bool, device=self.device)
        return self.seen

    def _make_room(self, rows: int, width: int = 0) -> None:
        """Room for `rows` running rows and one more slot after the longest (or a `width`-slot prompt): compact
        when the slots run out; compiled, move to the bucket that holds them (a growing batch never compacts
        more than once per bucket: it grows when compaction leaves the bucket more than three quarters full)."""
        needed = max(self.cache.length, width) + 1
        compacted = needed > self.cache.capacity
        if compacted:
            cache_rows.compact(self.cache, len(self.running))
            needed = max(self.cache.length, width) + 1
        if self.compiled is None:
            return
        capacity = self.cache.capacity
        if needed > capacity or (compacted and needed > 0.75 * capacity):
            capacity = slot_bucket(needed)
            if needed > 0.75 * capacity:
                capacity *= 2
        batch = row_bucket(rows, self.max_batch)
        if batch < self.cache.batch_size and 4 * rows > self.cache.batch_size:
            batch = self.cache.batch_size  # shrink only when a quarter or less of the rows are in use
        if (batch, capacity) != (self.cache.batch_size, self.cache.capacity):
            self.cache = cache_rows.resized(self.cache, batch, capacity)

    def _decode(self) -> None:
        """One token for every running row: feed each row's pending token, sample the next."""
        rows = len(self.running)
        self._make_room(rows)
        if self.compiled is not None:
            self.cache.next_position[rows:] = 0  # idle rows of the bucket stay at a valid position
            self.cache.max_next_position = int(self.cache.next_position[:rows].max())
            tokens = self.pending[: self.cache.batch_size].unsqueeze(1)
            counting, self._counting = self._counting, False  # the graph runs no Python hooks
            try:
                logits = self.model.decode_step(tokens, self.cache, self.compiled.step())[:rows]
            finally:
                self._counting = counting
        else:
            view = cache_rows.view(self.cache, rows, self.cache.length + 1)
            tokens = self.pending[:rows].unsqueeze(1)
            if self.sharded:  # forward, where FSDP gathers each block's weights
                logits = self.model(tokens, cache=view).logits[:, -1]
            else:
                logits = self.model.decode_step(tokens, view)
            self.cache.length = view.length
        self.stats.steps += 1
        self._sample_and_emit(logits, rows)

    def _sample_and_emit(self, logits_BV: torch.Tensor, count: int, first: int = 0) -> None:
        """Sample rows first..first+count-1 at once, report each token, retire the finished rows."""
        rows = range(first, first + count)
        requests = [self.running[row] for row in rows]
        seen = None if self.seen is None else self.seen[first : first + count]
        ends = [self._ends(r) if r.steps < r.min_tokens else () for r in requests]
        adjusted = masked_logits(self.rules.apply(logits_BV, first, ends), [r.constraint for r in requests])
        tokens = self.settings.sample(adjusted, seen, first)
        self.rules.record(first, tokens)
        self.pending[first : first + count] = tokens
        if self.seen is not None:
            self.seen[torch.arange(first, first + count, device=self.device), tokens] = True
        wanted = [r.logprobs for r in requests if r.logprobs is not None]
        logprobs, top = self._logprobs(logits_BV, tokens, max(wanted)) if wanted else (None, None)
        finished = []
        for i, (row, request, token) in enumerate(zip(rows, requests, tokens.tolist(), strict=True)):
            request.steps += 1
            if request.finish_reason is not None:  # held after finishing: decoded, not reported
                if request.steps >= request.max_new_tokens:
                    finished.append(row)
                continue
            request.new_tokens.append(token)
            if request.constraint is not None:
                request.constraint.accept(token)
            self.stats.generation_tokens += 1
            event = TokenEvent(token)
            if request.logprobs is not None and logprobs is not None:
                event.logprob = logprobs[i]
                event.top_logprobs = top[i][: request.logprobs]
            if (
                (token in self.eos and not request.ignore_eos)
                or token in request.stop_token_ids
                or (request.constraint is not None and request.constraint.finished)
                or (request.stop is not None and request.stop(request.new_tokens))
            ):
                event.finish_reason = FINISH_STOP
            elif request.steps >= request.max_new_tokens:
                event.finish_reason = FINISH_LENGTH
            if event.finish_reason is not None:
                request.finish_reason = event.finish_reason
                if self.on_step is not None:
                    self.on_step(self.stats)  # counters are current by the time a client sees its request end
            self._emit(request, event)
            if event.finish_reason is not None and not (request.hold_row and request.steps < request.max_new_tokens):
                finished.append(row)
        for row in sorted(finished, reverse=True):  # descending: a moved row is never a finished one
            request = self.running[row]
            self._release(row)
            self._report_finish(request, request.finish_reason)

    def _ends(self, request: EngineRequest) -> tuple[int, ...]:
        """The tokens that would end `request` (banned until its min_tokens)."""
        return (*(() if request.ignore_eos else self.eos), *request.stop_token_ids)

    @staticmethod
    def _logprobs(logits_BV: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[list[float], list[list]]:
        """The sampled tokens' log-probabilities and each row's top k (of the model's own distribution), read
        back once for the whole batch."""
        logprobs_BV = logits_BV.float().log_softmax(-1)
        chosen = logprobs_BV.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        if k == 0:
            return chosen, [[] for _ in chosen]
        top = logprobs_BV.topk(k, dim=-1)
        pairs = [
            list(zip(ids, values, strict=True))
            for ids, values in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]
        return chosen, pairs

    def _emit(self, request: EngineRequest, event: TokenEvent) -> None:
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine; drop the request
            request.cancelled = True

    def _finish(self, row: int, reason: str) -> None:
        request = self.running[row]
        self._emit(request, TokenEvent(None, reason))
        self._release(row)
        self._report_finish(request, reason)

    def _release(self, row: int) -> None:
        """Free a row: the last running row moves into it so running rows stay a prefix of the cache."""
        last = len(self.running) - 1
        if row != last:
            cache_rows.move_row(self.cache, last, row)
            self.running[row] = self.running[last]
            self.pending[row] = self.pending[last]
            self.settings.move(last, row)
            self.rules.move(last, row)
            if self.seen is not None:
                self.seen[row] = self.seen[last]
        self.running.pop()
        cache_rows.clear_row(self.cache, last)
        if not self.running:
            self.cache.length = 0

    def _report_finish(self, request: EngineRequest, reason: str) -> None:
        if self.on_finish is not None:
            self.on_finish(request, reason)

    def _count_expert_tokens(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert, per MoE layer, summed over every prefill and eager decode step (hooks
        on the routers; padding is excluded by the router's token mask; a compiled step runs no hooks)."""
        counts: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.model.layers):
            router = getattr(block.mlp, "gate", None)
            if not isinstance(router, Router):
                continue
            counts[index] = torch.zeros(router.num_experts, dtype=torch.long, device=self.device)

            def hook(_module, _inputs, routing, index=index) -> None:  # noqa: ANN001 - nn.Module hook signature
                if self._counting:
                    counts[index] += routing.tokens_per_expert_E.to(torch.long)

            self._hooks.append(router.register_forward_hook(hook))
        return counts
