"""OpenAI request schemas: JSON bodies checked field by field into typed requests, or an APIError naming the field.

Validation is written out rather than left to FastAPI/pydantic so that every invalid request is a 400 with the
OpenAI error envelope and a one-line message that names the parameter (FastAPI's default would be a 422 with a
list of pydantic errors). Unknown parameters are refused by name, as OpenAI's API does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from moelm.infer.sampling import SamplingParams
from moelm.infer.structured import GrammarSpec
from moelm.serve.errors import APIError, invalid
from moelm.serve.tools import parse_tools

MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "logit_bias",
    "min_tokens",
    "stop_token_ids",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "include_stop_str_in_output",
    "skip_special_tokens",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}


@dataclass
class GenerationRequest:
    """What both endpoints share once validated."""

    model: str | None
    max_tokens: int | None
    params: SamplingParams
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; k: the sampled token's logprob and the top k
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0  # vLLM's: end tokens banned until this many were generated
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM's: more tokens that end a choice
    grammar: GrammarSpec | None = None  # structured output: response_format or vLLM's guided_* (one at most)
    include_stop_str_in_output: bool = False  # vLLM's: the text ends with the stop string that ended it
    skip_special_tokens: bool = True  # vLLM's: False keeps special tokens' text


@dataclass
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False  # the prompt before the completion, in text and (with logprobs) in log-probabilities


@dataclass
class ChatRequest(GenerationRequest):
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: Any = None  # moelm.serve.tools.Tools, or None without tools


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 naming what is wrong with it."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"must be a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(name, f"must be in {bracket}{low}, {high}], got {value}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if _is_integer(value):  # JSON Schema's integers include 1.0
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise invalid(name, f"must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"must be true or false, got {value!r}")
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"at most {MAX_STOP} stop sequences, got {len(stops)}")
    return stops


def _known_fields_and_model(body: dict, allowed: set[str]) -> str | None:
    """The body's `model` (a string or absent), after refusing any field not in `allowed` by name."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"must be a string, got {model!r}")
    return model


def _common(body: dict, allowed: set[str], max_tokens_name: str = "max_tokens", fewest: int = 1) -> dict[str, Any]:
    model = _known_fields_and_model(body, allowed)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid("stream_options", "must be an object with the single key include_usage")
    include_usage = _boolean(options or {}, "include_usage")
    stream = _boolean(body, "stream")
    if options is not None and not stream:
        raise invalid("stream_options", "is only allowed with stream: true")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise invalid("user", "must be a string")
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            top_k=_integer(body, "top_k", 0, 0) or 0,
            min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        )
    except ValueError as error:  # ranges SamplingParams itself refuses (min_p = 1)
        raise APIError(400, str(error), code="invalid_value") from None
    max_tokens = _integer(body, max_tokens_name, None, fewest)
    min_tokens = _integer(body, "min_tokens", 0, 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise invalid("min_tokens", f"{min_tokens} is more than {max_tokens_name}={max_tokens}")
    return dict(
        include_stop_str_in_output=_boolean(body, "include_stop_str_in_output"),
        skip_special_tokens=_boolean(body, "skip_special_tokens", True),
        grammar=_grammar(body),
        logit_bias=_logit_bias(body),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        min_tokens=min_tokens,
        stop_token_ids=_token_ids(body, "stop_token_ids"),
        model=model,
        max_tokens=max_tokens,
        params=params,
        n=_integer(body, "n", 1, 1, MAX_N),
        stop=_stop(body),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
        stream=stream,
        include_usage=include_usage,
        ignore_eos=_boolean(body, "ignore_eos"),
    )


def _grammar(body: dict) -> GrammarSpec | None:
    """OpenAI's response_format (json_object, json_schema) or vLLM's guided_json / guided_regex / guided_choice."""
    given = [name for name in ("response_format", "guided_json", "guided_regex", "guided_choice") if body.get(name)]
    if len(given) > 1:
        raise invalid(given[1], f"give one of {given[0]} and {given[1]}, not both")
    if not given:
        return None
    name, value = given[0], body[given[0]]
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise invalid(name, "must be a JSON schema (an object, or a string holding one)") from None
        if not isinstance(value, dict):
            raise invalid(name, "must be a JSON schema (an object, or a string holding one)")
        return GrammarSpec("json_schema", value, name)
    if name == "guided_regex":
        if not isinstance(value, str):
            raise invalid(name, "must be a regular expression string")
        return GrammarSpec("regex", value, name)
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise invalid(name, "must be a non-empty list of non-empty strings")
        return GrammarSpec("choice", value, name)
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid(name, "must be {type: text | json_object | json_schema}")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return GrammarSpec("json_object", None, name)
    described = value.get("json_schema")
    if not isinstance(described, dict) or not isinstance(described.get("schema"), dict):
        raise invalid(name, "json_schema needs {json_schema: {name, schema: {...}}}")
    return GrammarSpec("json_schema", described["schema"], name)


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (JSON keys are strings)."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("logit_bias", "must be an object mapping token ids to biases")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid("logit_bias", f"key {key!r} is not a token id") from None
        if token < 0 or isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise invalid("logit_bias", f"{key!r}: must map a token id >= 0 to a number in [-100, 100]")
        out[token] = float(bias)
    return out


def _token_ids(body: dict, name: str) -> list[int]:
    value = body.get(name)
    if value is None or value == []:
        return []
    if not _token_list(value) or any(t < 0 for t in value):
        raise invalid(name, "must be a list of token ids")
    return _as_ids(value)


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    """POST /v1/completions: prompt is a string, a list of strings, a list of token ids or a list of those.

    echo: true returns the prompt before the completion, and with logprobs the prompt tokens' log-probabilities
    (the first token's is null), so max_tokens may then be 0: the scoring request lm-eval's local-completions
    sends for log-likelihood tasks."""
    echo = _boolean(body, "echo")
    common = _common(body, COMPLETION_FIELDS, fewest=0 if echo else 1)
    if "prompt" not in body:
        raise APIError(400, "missing required parameter 'prompt'", param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif _token_list(prompt):
        prompts = [_as_ids(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(_token_list(p) for p in prompt):
        prompts = [_as_ids(p) for p in prompt]
    else:
        raise invalid("prompt", "must be a string, a list of strings, a list of token ids, or a list of those")
    if any(p == "" for p in prompts):
        raise invalid("prompt", "must not be empty")
    if echo and common["stream"]:
        raise invalid("echo", "echo with stream: true is not supported by moelm's server")
    if body.get("suffix") is not None:
        raise invalid("suffix", "suffix (fill-in-the-middle) is not supported by moelm's server")
    if _integer(body, "best_of", 1, 1, 1) != 1:
        raise invalid("best_of", "only 1 is supported")
    logprobs = _integer(body, "logprobs", None, 0, 5)
    return CompletionRequest(**common, logprobs=logprobs, prompts=prompts, echo=echo)


def _is_integer(value: Any) -> bool:
    """An integer as JSON Schema counts them: 3 or 3.0, never true / false."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_integer(t) for t in value)


def _as_ids(value: list) -> list[int]:
    return [int(t) for t in value]


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    """POST /v1/chat/completions: messages with roles and text content (a string or a list of text parts)."""
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise invalid("max_tokens", "give max_tokens or max_completion_tokens, not both")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    common = _common(body, CHAT_FIELDS, name)
    if "messages" not in body:
        raise APIError(
            400, "missing required parameter 'messages'", param="messages", code="missing_required_parameter"
        )
    parsed = _messages(body)
    tools = parse_tools(body)
    if tools is not None and tools.forced and common["grammar"] is not None:
        raise invalid("tool_choice", f"a forced tool call cannot be combined with {common['grammar'].source}")
    logprobs = None
    if _boolean(body, "logprobs"):
        logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise invalid("top_logprobs", "needs logprobs: true")
    return ChatRequest(**common, logprobs=logprobs, messages=parsed, tools=tools)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of {role, content} objects")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(where, "must be an object with role and content")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise invalid(f"{where}.role", f"must be one of {list(CHAT_ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(f"{where}.content", "parts must be {type: text, text: ...} (moelm models read text)")
            parts.append(part["text"])
        content = "".join(parts)
    calls = _tool_calls(where, message.get("tool_calls")) if role == "assistant" else []
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise invalid(f"{where}.content", "must be a string or a list of text parts")
    allowed = {"role", "content", "name", "reasoning_content"}
    allowed |= {"tool_calls"} if role == "assistant" else {"tool_call_id"} if role == "tool" else set()
    extra = sorted(set(message) - allowed)
    if extra:
        raise invalid(where, f"unrecognized key(s) {extra}")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise invalid(f"{where}.tool_call_id", "a tool message needs the id of the call it answers")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    if calls:
        out["tool_calls"] = calls
    if isinstance(message.get("reasoning_content"), str):
        out["reasoning"] = message["reasoning_content"]
    return out


def _tool_calls(where: str, calls: Any) -> list[dict[str, Any]]:
    """An assistant turn's earlier tool calls as [{name, arguments (an object)}]."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise invalid(f"{where}.tool_calls", "must be a list of {id, type: function, function: {name, arguments}}")
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        try:
            arguments = json.loads(function["arguments"]) if isinstance(function.get("arguments"), str) else None
        except (ValueError, AttributeError):
            arguments = None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise invalid(f"{where}.tool_calls[{index}]", "needs function.name and function.arguments (a JSON object)")
        out.append({"name": name, "arguments": arguments})
    return out


@dataclass
class TokenizeRequest:
    model: str | None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # the tokenizer's post-processor (BOS and the like), where it has one


@dataclass
class DetokenizeRequest:
    model: str | None
    tokens: list[int]


def parse_tokenize(body: dict[str, Any]) -> TokenizeRequest:
    """POST /tokenize (vLLM's): {"prompt": str} or {"messages": [...]}."""
    fields = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}
    model = _known_fields_and_model(body, fields)
    special = _boolean(body, "add_special_tokens", True)
    if ("prompt" in body) == ("messages" in body):
        raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt", code="invalid_value")
    if "prompt" in body:
        if not isinstance(body["prompt"], str):
            raise invalid("prompt", "must be a string")
        return TokenizeRequest(model, prompt=body["prompt"], add_special_tokens=special)
    generation = _boolean(body, "add_generation_prompt", True)
    messages = _messages(body)
    return TokenizeRequest(model, messages=messages, add_generation_prompt=generation, add_special_tokens=special)


def parse_detokenize(body: dict[str, Any], vocab_size: int) -> DetokenizeRequest:
    """POST /detokenize (vLLM's): {"tokens": [ids]}."""
    model = _known_fields_and_model(body, {"model", "tokens"})
    tokens = body.get("tokens")
    if not _token_list(tokens) and tokens != []:
        raise invalid("tokens", "must be a list of token ids")
    tokens = _as_ids(tokens)
    if any(not 0 <= t < vocab_size for t in tokens):
        raise invalid("tokens", f"token ids must be in [0, {vocab_size - 1}]")
    return DetokenizeRequest(model, tokens)
