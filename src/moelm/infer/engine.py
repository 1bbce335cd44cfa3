"""Continuous batching: requests join the running decode batch between steps and leave it when they finish.

One engine thread owns the model and one preallocated cache of `max_batch` rows. Each loop iteration admits
waiting requests (one batched prefill, its rows copied into free cache rows), then runs one decode step over
every running row, samples each row with its own parameters and generator, and reports each new token through
the request's callback. Rows share slot indices (as in `generate`), so a joining prompt is placed to end at the
shared length; finished rows are freed by moving the last running row into their place, and when the slots run
out the cache is compacted (each row's real tokens shifted together). Nothing here knows about text or HTTP.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moelm.infer.generate import left_pad
from moelm.infer.sampling import SamplingParams, sample
from moelm.model.cache import KVCache
from moelm.model.router import Router
from moelm.model.transformer import MoELM

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"


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
    """What the engine needs to run one completion; `on_event` is called on the engine thread."""

    prompt_ids: list[int]
    max_new_tokens: int
    on_event: Callable[[TokenEvent], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: Callable[[list[int]], bool] | None = None  # new tokens so far -> stop here?
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's and the top k
    ignore_eos: bool = False  # run to max_new_tokens (load tests with fixed output lengths)
    request_id: int = field(default_factory=itertools.count().__next__)
    # engine-side state
    new_tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
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


class Engine:
    """The continuous-batching loop around one model (see the module docstring)."""

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
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.eos = frozenset(eos_token_ids)
        self.max_batch = max_batch
        self.max_model_len = min(
            max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings
        )
        self.pad = pad_token_id
        self.on_finish = on_finish
        self.on_step = on_step
        device = next(model.parameters()).device
        dtype = model.embed_tokens.weight.dtype
        # Two model lengths of slots: compaction is needed at most once per max_model_len steps.
        self.cache = KVCache(self.config, max_batch, 2 * self.max_model_len, dtype=dtype, device=device)
        self.device = device
        self.waiting: queue.Queue[EngineRequest] = queue.Queue(maxsize=max_waiting)
        self.running: list[EngineRequest] = []  # running[i] owns cache row i
        self.pending_tokens: list[int] = []  # the sampled token of each running row, not yet in the cache
        self.stats = EngineStats(cache_slots_total=max_batch * self.max_model_len)
        self.expert_counts = self._count_expert_tokens()
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
        self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stopping

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; EngineOverloadedError when the waiting queue is full, EngineDeadError after a crash."""
        if not self.alive:
            reason = f" ({self.error!r})" if self.error else ""
            raise EngineDeadError(f"the engine has stopped{reason}")
        if len(request.prompt_ids) + request.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds "
                f"the model length {self.max_model_len}"
            )
        if request.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise EngineOverloadedError(f"{self.waiting.maxsize} requests are already waiting") from None
        self._wake.set()

    def cancel(self, request: EngineRequest) -> None:
        """Stop a request at the next step boundary (client gone); its row is freed by the engine thread."""
        request.cancelled = True
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.running and self.waiting.empty():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                with torch.inference_mode():
                    self._iteration()
        except BaseException as error:  # noqa: BLE001 - reported to every request, then the engine is dead
            self.error = error
            for request in self.running + self._drain_waiting():
                self._emit(request, TokenEvent(None, FINISH_ERROR, error=f"engine failure: {error}"))
            self.running = []
            raise

    def _iteration(self) -> None:
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self.running:
            self._decode()
        self.stats.running, self.stats.waiting = len(self.running), self.waiting.qsize()
        self.stats.cache_slots_used = int(self.cache.valid[: len(self.running)].sum()) if self.running else 0
        if self.on_step is not None:
            self.on_step(self.stats)

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
        ids, mask = left_pad([r.prompt_ids for r in requests], self.pad)
        ids, mask = ids.to(self.device), mask.to(self.device)
        width = ids.shape[1]
        scratch = KVCache(self.config, len(requests), width, dtype=self.cache.latent_or_keys.dtype, device=self.device)
        try:
            logits = self.model(ids, attention_mask=mask, cache=scratch, logits_to_keep=1).logits[:, -1]
        except Exception as error:  # noqa: BLE001 - this batch fails, the engine carries on
            for request in requests:
                self._emit(request, TokenEvent(None, FINISH_ERROR, error=f"prefill failed: {error}"))
                self._report_finish(request, FINISH_ERROR)
            return
        end = max(self.cache.length, width)
        if end + 1 > self.cache.capacity:
            self.cache.compact(len(self.running))
            end = max(self.cache.length, width)
        rows = list(range(len(self.running), len(self.running) + len(requests)))
        self.cache.place_rows(scratch, rows, end)
        for request in requests:
            self.stats.prompt_tokens += len(request.prompt_ids)
            self.running.append(request)
            self.pending_tokens.append(self.pad)
        self._sample_and_emit(logits, rows)

    def _decode(self) -> None:
        """One token for every running row: feed each row's pending token, sample the next."""
        if self.cache.length + 1 > self.cache.capacity:
            self.cache.compact(len(self.running))
        rows = len(self.running)
        view = self.cache.view(rows, self.cache.length + 1)
        tokens = torch.tensor(self.pending_tokens, device=self.device).unsqueeze(1)
        logits = self.model.decode_step(tokens, view)
        self.cache.length = view.length
        self.stats.steps += 1
        self._sample_and_emit(logits, list(range(rows)))

    def _sample_and_emit(self, logits_BV: torch.Tensor, rows: list[int]) -> None:
        """Sample each listed row with its own parameters, report the token, retire the finished rows."""
        finished = []
        wanted = [self.running[row].logprobs for row in rows]
        logprobs_BV = logits_BV.float().log_softmax(-1) if any(w is not None for w in wanted) else None
        for i, row in enumerate(rows):
            request = self.running[row]
            generator = [request.generator] if request.generator is not None else None
            history = None
            if request.params.repetition_penalty != 1.0:  # HF's rule: prompt and completion tokens so far
                history = torch.tensor([request.prompt_ids + request.new_tokens], device=logits_BV.device)
            token = int(sample(logits_BV[i : i + 1], request.params, generator, history)[0])
            request.new_tokens.append(token)
            self.pending_tokens[row] = token
            self.stats.generation_tokens += 1
            event = TokenEvent(token)
            if request.logprobs is not None and logprobs_BV is not None:
                event.logprob = float(logprobs_BV[i, token])
                if request.logprobs:
                    top = logprobs_BV[i].topk(request.logprobs)
                    event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            if (token in self.eos and not request.ignore_eos) or (
                request.stop is not None and request.stop(request.new_tokens)
            ):
                event.finish_reason = FINISH_STOP
            elif len(request.new_tokens) >= request.max_new_tokens:
                event.finish_reason = FINISH_LENGTH
            if event.finish_reason is not None and self.on_step is not None:
                self.on_step(self.stats)  # counters are current by the time a client sees its request end
            self._emit(request, event)
            if event.finish_reason is not None:
                finished.append((row, event.finish_reason))
        for row, reason in sorted(finished, reverse=True):  # descending: a moved row is never a finished one
            request = self.running[row]
            self._release(row)
            self._report_finish(request, reason)

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
            self.cache.move_row(last, row)
            self.running[row] = self.running[last]
            self.pending_tokens[row] = self.pending_tokens[last]
        self.running.pop()
        self.pending_tokens.pop()
        self.cache.valid[last] = False
        if not self.running:
            self.cache.length = 0

    def _report_finish(self, request: EngineRequest, reason: str) -> None:
        if self.on_finish is not None:
            self.on_finish(request, reason)

    def _count_expert_tokens(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert, per MoE layer, summed over every prefill and decode step (hooks on the
        routers; padding is excluded by the router's token mask)."""
        counts: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.model.layers):
            router = getattr(block.mlp, "gate", None)
            if not isinstance(router, Router):
                continue
            counts[index] = torch.zeros(router.num_experts, dtype=torch.long, device=self.device)

            def hook(_module, _inputs, routing, index=index) -> None:  # noqa: ANN001 - nn.Module hook signature
                counts[index] += routing.tokens_per_expert_E.to(torch.long)

            router.register_forward_hook(hook)
        return counts
