"""The OpenAI-compatible HTTP app: validated requests -> the engine's queue -> (streamed) OpenAI responses.

The engine runs in its own thread; handlers only tokenize (in a worker thread), submit, and await the events the
engine posts back onto the event loop, so no request can block the decode loop or the HTTP side. Every error a
client can cause is a 4xx with the OpenAI envelope; a stream that fails after it began ends with a
`data: {"error": ...}` chunk and `data: [DONE]`. A request whose client goes away is cancelled and its cache row
freed at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import moelm
from moelm.data.chat import ChatFormatError, render_chat
from moelm.data.tokenizer import THINK_OPEN, token_label
from moelm.infer.engine import (
    FINISH_ABORT,
    FINISH_ERROR,
    Engine,
    EngineDeadError,
    EngineOverloadedError,
    EngineRequest,
    TokenEvent,
)
from moelm.infer.prefix_cache import PrefixCache
from moelm.infer.structured import Constraint, GrammarError, GrammarFactory
from moelm.infer.text import IncrementalDetokenizer, TextGenerator
from moelm.model.peft_format import adapted_copy
from moelm.model.transformer import MoELM
from moelm.serve import openapi, tools
from moelm.serve.metrics import ServerMetrics
from moelm.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    invalid,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_json,
    parse_tokenize,
)
from moelm.serve.text_stream import Parts, TextStream

LOG = logging.getLogger("moelm.serve")
EMPTY_REPLY_NOTE = "empty reply: the model ended its turn without text"
NO_TEMPLATE = " (the model has no chat template: it was never chat-tuned)"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_BODY_BYTES = 8 * 2**20
DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class ServerConfig:
    """How `moelm serve` was asked to run."""

    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_model_len: int | None = None
    max_waiting: int = 256
    prefix_caching: bool = True  # reuse the cache entries of prompt blocks seen before (vLLM's default too)
    # LoRA adapters served beside the base, by the name a request's `model` gives: name -> adapter directory
    adapters: dict[str, Path] = field(default_factory=dict)


@dataclass
class Choice:
    """One completion of a request: its engine request, text state and timing."""

    index: int
    prompt_tokens: int
    text: TextStream
    engine_request: EngineRequest | None = None
    engine: Engine | None = None  # the engine of the model (base or adapter) the request named
    prompt_ids: list[int] = field(default_factory=list)
    echo: str | None = None  # echo: the prompt's text, returned before the completion
    keep_tokens: bool = True  # False for max_tokens 0 (echo only): the one token the engine samples is dropped
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None


class Server:
    """State shared by the handlers: the generator (model + tokenizer), the engine and the metrics."""

    def __init__(self, generator: TextGenerator, config: ServerConfig) -> None:
        self.generator = generator
        self.config = config
        self.engine = self._engine(config.model_name, generator.model, generator.compiled, count_experts=True)
        # One engine per adapter over its own merged copy of the base (vLLM batches adapters over one shared
        # base; here each adapter costs a copy of the weights and decodes in its own thread).
        self.engines = {config.model_name: self.engine}
        for name, directory in config.adapters.items():
            self.engines[name] = self._engine(name, adapted_copy(generator.model, directory), None, count_experts=False)
        self.metrics = ServerMetrics(self.engine.expert_counts, config.model_name)
        self.grammars: GrammarFactory | None = None  # structured output's tokenizer view, made on first use
        self.created = int(time.time())
        if not generator.chat_tuned:
            LOG.warning("the model has no chat template (never chat-tuned): chat replies may be empty")

    def _engine(self, name: str, model: MoELM, compiled: Any, count_experts: bool) -> Engine:
        config = self.config
        return Engine(
            model,
            self.generator.eos_ids(),
            max_batch=config.max_batch,
            max_model_len=config.max_model_len,
            max_waiting=config.max_waiting,
            on_finish=lambda request, reason: self.metrics.finished_request(reason),
            on_step=lambda stats: self.metrics.engine_step(stats, name),
            compiled=compiled,
            count_experts=count_experts,
            prefix_cache=PrefixCache() if config.prefix_caching else None,
        )

    # ------------------------------------------------------------------ checks
    def authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.config.api_key.encode()):
            raise APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    def check_model(self, name: str | None) -> Engine:
        """The engine of the model a request names (the base when it names none); 404 for an unknown name."""
        if name is None:
            return self.engine
        engine = self.engines.get(name)
        if engine is None:
            served = ", ".join(f"'{n}'" for n in self.engines)
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves {served}",
                param="model",
                code="model_not_found",
            )
        return engine

    def constraint(self, request: GenerationRequest) -> Constraint | None:
        """A fresh grammar matcher for one choice of a structured-output request (400 for a bad grammar)."""
        if request.grammar is None:
            return None
        try:
            if self.grammars is None:  # built on first use: about a second, and only llguidance needs it
                config = self.generator.model.config
                ends = sorted(self.engine.eos)
                self.grammars = GrammarFactory(self.generator.tokenizer.to_str(), config.vocab_size, ends)
            return self.grammars.constraint(request.grammar)
        except GrammarError as error:
            raise invalid(request.grammar.source, str(error)) from None

    def check_vocabulary(self, request: GenerationRequest) -> None:
        """Token ids a request names (logit_bias keys, stop_token_ids) must be in the model's vocabulary."""
        vocab = self.generator.model.config.vocab_size
        for name, ids in (("logit_bias", list(request.logit_bias)), ("stop_token_ids", request.stop_token_ids)):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise invalid(name, f"token id {outside[0]} is outside the vocabulary [0, {vocab - 1}]")

    def token_budget(self, request: GenerationRequest, prompt_len: int, default: int | None) -> int:
        """max_tokens for a prompt of this length: the request's, else the default, within the model length."""
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise invalid(
                "messages" if isinstance(request, ChatRequest) else "prompt",
                f"the prompt is {prompt_len} tokens; this model's length is {limit}",
            )
        room = limit - prompt_len
        if request.max_tokens is not None:
            if request.max_tokens > room:
                raise invalid(
                    "max_tokens",
                    f"{request.max_tokens} new tokens + {prompt_len} prompt tokens exceed the model length {limit}",
                )
            return request.max_tokens
        return min(default, room) if default is not None else room

    # ------------------------------------------------------------------ running a request
    def start_choices(
        self,
        request: GenerationRequest,
        prompts: list[list[int]],
        budgets: list[int],
        streams: list[Callable[[], TextStream]],
        queue: asyncio.Queue,
    ) -> list[Choice]:
        """Submit n choices per prompt; events arrive on `queue` as (choice index, event)."""
        loop = asyncio.get_running_loop()
        choices: list[Choice] = []
        echo = isinstance(request, CompletionRequest) and request.echo
        engine = self.check_model(request.model)
        for p, prompt in enumerate(prompts):
            echoed = self.echo_text(request.prompts[p], prompt) if echo else None
            for k in range(request.n):
                index = p * request.n + k
                choice = Choice(index, len(prompt), streams[p](), prompt_ids=prompt, echo=echoed, engine=engine)
                choice.keep_tokens = budgets[p] > 0
                seed = None if request.seed is None else (request.seed + k) % 2**63
                choice.engine_request = EngineRequest(
                    prompt,
                    max(budgets[p], 1),
                    self._event_sink(choice, loop, queue),
                    params=request.params,
                    seed=seed,
                    stop=choice.text.stopped if choice.text.stop else None,
                    logprobs=request.logprobs,
                    prompt_logprobs=request.logprobs if echo else None,
                    logit_bias=request.logit_bias or None,
                    presence_penalty=request.presence_penalty,
                    frequency_penalty=request.frequency_penalty,
                    min_tokens=min(request.min_tokens, budgets[p]),
                    stop_token_ids=tuple(request.stop_token_ids),
                    constraint=self.constraint(request),
                    ignore_eos=request.ignore_eos,
                )
                choices.append(choice)
        try:
            for choice in choices:
                engine.submit(choice.engine_request)
        except EngineOverloadedError as error:
            self.cancel(choices)
            raise APIError(429, f"server overloaded: {error}; retry later", code="overloaded") from None
        except EngineDeadError as error:
            self.cancel(choices)
            raise APIError(503, str(error), code="engine_dead") from None
        return choices

    def _event_sink(self, choice: Choice, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):  # noqa: ANN202
        """The engine-thread callback: timing metrics here (exact), the event handed to the event loop."""

        def on_event(event: TokenEvent) -> None:
            now = time.perf_counter()
            if event.token is not None:
                if choice.first_token_at is None:
                    choice.first_token_at = now
                    self.metrics.ttft.observe(now - choice.engine_request.submitted_at)
                else:
                    self.metrics.itl.observe(now - choice.last_token_at)
                choice.last_token_at = now
            if event.finish_reason is not None:
                self.metrics.e2e.observe(now - choice.engine_request.submitted_at)
            loop.call_soon_threadsafe(queue.put_nowait, (choice.index, event))

        return on_event

    def cancel(self, choices: list[Choice]) -> None:
        for choice in choices:
            if choice.finish_reason is None and choice.engine_request is not None:
                (choice.engine or self.engine).cancel(choice.engine_request)

    def echo_text(self, prompt: str | list[int], ids: list[int]) -> str:
        """The prompt as echoed: a text prompt as given, token ids as their text."""
        return prompt if isinstance(prompt, str) else self.generator.tokenizer.decode(ids, skip_special_tokens=False)

    @staticmethod
    def apply(choice: Choice, event: TokenEvent) -> None:
        if event.token is not None and choice.keep_tokens:
            choice.tokens.append(event.token)
            if event.logprob is not None:
                choice.logprobs.append(event)
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
            choice.error = event.error

    # ------------------------------------------------------------------ response pieces
    def token_text(self, token: int) -> str:
        return self.generator.tokenizer.decode([token], skip_special_tokens=False)

    def token_key(self, token: int) -> str:
        """A top_logprobs key: the token's text, or its bytes where the text alone is a partial character."""
        return token_label(self.generator.tokenizer, token)

    def completion_logprobs(self, events: list[TokenEvent], offsets: list[int]) -> dict[str, Any]:
        """OpenAI's completion logprobs; `offsets`: where each token's text starts in the returned text."""
        return {
            "tokens": [self.token_text(e.token) for e in events],
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{self.token_key(t): lp for t, lp in e.top_logprobs} for e in events],
            "text_offset": offsets,
        }

    def prompt_logprobs(self, choice: Choice) -> dict[str, Any]:
        """The echoed prompt's part of completion logprobs: its tokens, each token's log-probability given the
        ones before (null for the first, which has none), the top k there, and offsets into the echoed text."""
        scored = choice.engine_request.prompt_logprobs_out or []
        reader = IncrementalDetokenizer(self.generator.tokenizer, skip_special_tokens=False)
        for token in choice.prompt_ids:
            reader.push(token)
        reader.finish()
        return {
            "tokens": [self.token_text(t) for t in choice.prompt_ids],
            "token_logprobs": [None] + [value for value, _ in scored],
            "top_logprobs": [None] + [{self.token_key(t): lp for t, lp in top} for _, top in scored],
            "text_offset": reader.offsets,
        }

    def chat_logprobs(self, events: list[TokenEvent]) -> dict[str, Any]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
                for e in events
            ]
        }


def _finish_reason(choice: Choice) -> str:
    return "length" if choice.finish_reason == "length" else "stop"


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(generator: TextGenerator, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `generator`'s model; the engine starts and stops with the app's lifespan."""
    server = Server(generator, config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for engine in server.engines.values():
            engine.start()
        yield
        for engine in server.engines.values():
            engine.stop()

    app = FastAPI(
        title="moelm",
        version=moelm.__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        wrapped = APIError(error.status_code, str(error.detail), code=code)
        return JSONResponse(wrapped.body(), status_code=error.status_code, headers=error.headers)  # 405: Allow

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        wrapped = APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error")
        return JSONResponse(wrapped.body(), status_code=500)

    @app.get(
        "/health",
        response_class=Response,
        responses={200: {"description": "the engine runs (no body)"}},
        openapi_extra=openapi.errors(503),
    )
    async def health() -> Response:
        if not all(engine.alive for engine in server.engines.values()):
            raise APIError(503, "the engine has stopped", code="engine_dead")
        return Response(status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return PlainTextResponse(server.metrics.exposition(), media_type="text/plain; version=0.0.4")

    def model_card(name: str) -> dict[str, Any]:
        card = {
            "id": name,
            "object": "model",
            "created": server.created,
            "owned_by": "moelm",
            "max_model_len": server.engine.max_model_len,
        }
        if name in config.adapters:  # vLLM's card for a LoRA adapter: its directory and the base it adapts
            card.update(root=str(config.adapters[name]), parent=config.model_name)
        return card

    @app.get("/v1/models", openapi_extra=openapi.errors(401))
    async def models(request: Request) -> dict[str, Any]:
        server.authorize(request)
        return {"object": "list", "data": [model_card(name) for name in server.engines]}

    @app.get("/v1/models/{model_id:path}", openapi_extra=openapi.errors(401, 404))
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        server.authorize(request)
        server.check_model(model_id)
        return model_card(model_id)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": moelm.__version__}

    async def read_body(request: Request) -> dict[str, Any]:
        server.authorize(request)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
        return parse_json(raw)

    @app.post("/v1/completions", openapi_extra=openapi.generation(openapi.COMPLETION_REQUEST))
    async def completions(request: Request) -> Response:
        parsed = parse_completion(await read_body(request))
        server.check_model(parsed.model)
        server.check_vocabulary(parsed)
        prompts = [await run_in_threadpool(_encode, generator, p) for p in parsed.prompts]
        budgets = [server.token_budget(parsed, len(p), COMPLETION_DEFAULT_MAX_TOKENS) for p in prompts]
        text_options = _text_options(parsed)
        streams = [lambda: TextStream(generator, parsed.stop, **text_options) for _ in prompts]
        return await _respond(server, request, parsed, prompts, budgets, streams, chat=False)

    @app.post("/tokenize", openapi_extra=openapi.tokenizer_route(openapi.TOKENIZE_REQUEST, openapi.TOKENIZE_RESPONSE))
    async def tokenize(request: Request) -> dict[str, Any]:
        """vLLM's /tokenize: a prompt (or chat messages, rendered with the template) as token ids."""
        parsed = parse_tokenize(await read_body(request))
        server.check_model(parsed.model)
        if parsed.messages is not None:
            try:
                text = render_chat(parsed.messages, generator.chat_template, parsed.add_generation_prompt)
            except ChatFormatError as error:
                raise invalid("messages", str(error)) from None
        else:
            text = parsed.prompt
        tokens = generator.tokenizer.encode(text, add_special_tokens=parsed.add_special_tokens).ids if text else []
        return {"count": len(tokens), "max_model_len": server.engine.max_model_len, "tokens": tokens}

    @app.post(
        "/detokenize", openapi_extra=openapi.tokenizer_route(openapi.DETOKENIZE_REQUEST, openapi.DETOKENIZE_RESPONSE)
    )
    async def detokenize(request: Request) -> dict[str, Any]:
        """vLLM's /detokenize: token ids as text (special tokens kept)."""
        parsed = parse_detokenize(await read_body(request), generator.model.config.vocab_size)
        server.check_model(parsed.model)
        return {"prompt": generator.tokenizer.decode(parsed.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info", openapi_extra=openapi.errors(401))
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        """vLLM's /tokenizer_info: what a remote-tokenizer client (lm-eval's local-completions) reads."""
        server.authorize(request)
        config = generator.model.config

        def token(index: int | None) -> str | None:
            return None if index is None else generator.tokenizer.id_to_token(index)

        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": token(config.eos_token_id),
            "bos_token": token(config.bos_token_id),
            "pad_token": token(config.pad_token_id),
            "chat_template": generator.chat_template,
            "model_max_length": server.engine.max_model_len,
            "vocab_size": generator.tokenizer.get_vocab_size(),
        }

    @app.post("/v1/chat/completions", openapi_extra=openapi.generation(openapi.CHAT_REQUEST))
    async def chat_completions(request: Request) -> Response:
        parsed = parse_chat(await read_body(request))
        server.check_model(parsed.model)
        server.check_vocabulary(parsed)
        if parsed.tools is not None and parsed.tools.forced:
            parsed.grammar = tools.call_grammar(parsed.tools)
        try:
            text = generator.chat_prompt(tools.prompt_messages(parsed.messages, parsed.tools))
        except ChatFormatError as error:
            raise invalid("messages", str(error)) from None
        prompt = await run_in_threadpool(_encode, generator, text)
        budget = server.token_budget(parsed, len(prompt), None)
        starts_inside = text.rstrip().endswith(THINK_OPEN)
        streams = [
            lambda: TextStream(
                generator, parsed.stop, split_reasoning=True, starts_in_reasoning=starts_inside, **_text_options(parsed)
            )
        ]
        return await _respond(server, request, parsed, [prompt], [budget], streams, chat=True)

    return app


def _text_options(request: GenerationRequest) -> dict[str, bool]:
    """How a choice's tokens become its text: vLLM's include_stop_str_in_output and skip_special_tokens."""
    return {"include_stop": request.include_stop_str_in_output, "skip_special_tokens": request.skip_special_tokens}


def _encode(generator: TextGenerator, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        vocab = generator.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise invalid("prompt", f"token ids must be in [0, {vocab - 1}]")
        return prompt
    ids = generator.tokenizer.encode(prompt).ids
    if not ids:
        raise invalid("prompt", "encodes to no tokens")
    return ids


async def _respond(
    server: Server,
    http: Request,
    request: CompletionRequest | ChatRequest,
    prompts: list[list[int]],
    budgets: list[int],
    streams: list[Callable[[], TextStream]],
    chat: bool,
) -> Response:
    queue: asyncio.Queue = asyncio.Queue()
    choices = server.start_choices(request, prompts, budgets, streams, queue)
    prompt_tokens = sum(len(p) for p in prompts)
    response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if request.stream:
        events = _stream_events(server, request, choices, queue, response_id, prompt_tokens, chat)
        return StreamingResponse(events, media_type="text/event-stream")
    try:
        await _wait_all(server, http, choices, queue)
    finally:
        server.cancel(choices)
    failed = [c for c in choices if c.finish_reason == FINISH_ERROR]
    if failed:
        raise APIError(500, failed[0].error or "generation failed", code="internal_error")
    body: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": request.model or server.config.model_name,
        "choices": [_full_choice(server, c, request, chat) for c in choices],
        "usage": _usage(prompt_tokens, choices),
    }
    return JSONResponse(body)


async def _wait_all(server: Server, http: Request, choices: list[Choice], queue: asyncio.Queue) -> None:
    """Collect events until every choice finished; a client that went away cancels the rest."""
    open_choices = len(choices)
    while open_choices:
        try:
            index, event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                return
            continue
        server.apply(choices[index], event)
        if event.finish_reason is not None:
            open_choices -= 1


def _tool_calls(request: GenerationRequest, content: str) -> tuple[str | None, list] | None:
    """(content, tool_calls) when a chat reply with tools on made calls; None otherwise."""
    active = getattr(request, "tools", None)
    if active is None or not active.active:
        return None
    rest, calls = tools.parse_reply(content, active)
    return (rest, calls) if calls else None


def _full_choice(server: Server, choice: Choice, request: GenerationRequest, chat: bool) -> dict[str, Any]:
    parts = choice.text.full(choice.tokens)
    logprobs = None
    if request.logprobs is not None:
        if chat:
            logprobs = server.chat_logprobs(choice.logprobs)
        else:
            offsets = choice.text.content_offsets(choice.tokens)[: len(choice.logprobs)]
            if choice.echo is not None:
                offsets = [offset + len(choice.echo) for offset in offsets]
            logprobs = server.completion_logprobs(choice.logprobs, offsets)
            if choice.echo is not None:  # the prompt's entries first
                logprobs = {key: value + logprobs[key] for key, value in server.prompt_logprobs(choice).items()}
    out: dict[str, Any] = {"index": choice.index, "logprobs": logprobs, "finish_reason": _finish_reason(choice)}
    if chat and not parts.content and not parts.reasoning:
        # finish_reason stays OpenAI's "stop" (clients type it as an enum); the emptiness is stated beside it.
        out["moelm_note"] = EMPTY_REPLY_NOTE + ("" if server.generator.chat_tuned else NO_TEMPLATE)
        LOG.warning("%s (%d token(s))", out["moelm_note"], len(choice.tokens))
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": parts.content}
        calls = _tool_calls(request, parts.content)
        if calls is not None:
            message["content"], message["tool_calls"] = calls
            out["finish_reason"] = "tool_calls"
        if parts.reasoning:
            message["reasoning_content"] = parts.reasoning
        out["message"] = message
    else:
        out["text"] = (choice.echo or "") + parts.content
    return out


async def _stream_events(
    server: Server,
    request: GenerationRequest,
    choices: list[Choice],
    queue: asyncio.Queue,
    response_id: str,
    prompt_tokens: int,
    chat: bool,
) -> AsyncIterator[str]:
    created = int(time.time())
    base = {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": request.model or server.config.model_name,
    }
    usage_field = {"usage": None} if request.include_usage else {}

    def chunk(
        choice: Choice,
        parts: Parts | None,
        events: list[TokenEvent],
        finish: str | None,
        role: bool = False,
        at: int = 0,
    ):
        entry: dict[str, Any] = {"index": choice.index}
        logprobs = None
        if request.logprobs is not None and events:
            logprobs = server.chat_logprobs(events) if chat else server.completion_logprobs(events, [at] * len(events))
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if parts is not None and parts.content:
                delta["content"] = parts.content
            if parts is not None and parts.reasoning:
                delta["reasoning_content"] = parts.reasoning
            entry["delta"] = delta
        else:
            entry["text"] = parts.content if parts is not None else ""
        entry.update(logprobs=logprobs, finish_reason=finish)
        return {**base, "choices": [entry], **usage_field}

    holding = chat and getattr(request, "tools", None) is not None and request.tools.active
    calls = {c.index: tools.ForcedCallStream() for c in choices} if holding and request.tools.forced else {}
    try:
        if chat:
            for choice in choices:
                yield _sse(chunk(choice, None, [], None, role=True))
        open_choices = len(choices)
        while open_choices:
            index, event = await queue.get()
            choice = choices[index]
            server.apply(choice, event)
            if event.finish_reason == FINISH_ERROR:
                yield _sse(APIError(500, event.error or "generation failed", code="internal_error").body())
                yield _sse("[DONE]")
                return
            if event.finish_reason == FINISH_ABORT:
                open_choices -= 1
                continue
            final = event.finish_reason is not None
            if calls:  # a forced call: its name, then its arguments' text as it is generated
                streamer = calls[choice.index]
                for entry in streamer.feed(choice.text.delta(choice.tokens, final=final).content):
                    body = chunk(choice, None, [], None)
                    body["choices"][0]["delta"] = {"tool_calls": [entry]}
                    yield _sse(body)
                if final:
                    open_choices -= 1
                    if not streamer.named:  # nothing parsed as a call (cut short): the text, as a held reply
                        for piece in _held_reply(choice, request, chunk):
                            yield _sse(piece)
                    else:
                        finish = "tool_calls" if streamer.complete else _finish_reason(choice)
                        yield _sse(chunk(choice, None, [], finish))
                continue
            if holding:  # a reply that may be a tool call is sent whole, as calls or as text, when it ends
                if final:
                    open_choices -= 1
                    for piece in _held_reply(choice, request, chunk):
                        yield _sse(piece)
                continue
            sent = len(choice.text.sent.content)  # where this chunk's text starts in the whole text
            parts = choice.text.delta(choice.tokens, final=final)
            events = [event] if event.logprob is not None else []
            if parts.content or parts.reasoning or events:
                yield _sse(chunk(choice, parts, events, None, at=sent))
            if final:
                open_choices -= 1
                yield _sse(chunk(choice, None, [], _finish_reason(choice)))
        if request.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, choices)})
        yield _sse("[DONE]")
    finally:
        server.cancel(choices)


def _held_reply(choice: Choice, request: GenerationRequest, chunk: Callable) -> list[dict[str, Any]]:
    """The chunks of a reply held back while it might be a tool call: its reasoning and text, or its calls as
    OpenAI's tool_calls deltas (each call whole, with its index), then the finish chunk."""
    parts = choice.text.full(choice.tokens)
    calls = _tool_calls(request, parts.content)
    pieces = []
    if calls is None:
        if parts.content or parts.reasoning:
            pieces.append(chunk(choice, parts, [], None))
        pieces.append(chunk(choice, None, [], _finish_reason(choice)))
        return pieces
    content, made = calls
    if parts.reasoning or content:
        pieces.append(chunk(choice, Parts(content=content or "", reasoning=parts.reasoning), [], None))
    body = chunk(choice, None, [], None)
    body["choices"][0]["delta"] = {"tool_calls": [{"index": i, **call} for i, call in enumerate(made)]}
    pieces.append(body)
    pieces.append(chunk(choice, None, [], "tool_calls"))
    return pieces


def serve(
    generator: TextGenerator, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> None:
    """Run the app with uvicorn until interrupted (Ctrl-C stops the engine and the server cleanly)."""
    import uvicorn

    uvicorn.run(create_app(generator, config), host=host, port=port, log_level=log_level)
