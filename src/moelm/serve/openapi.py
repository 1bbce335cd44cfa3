"""The OpenAPI description of the server: request bodies as JSON Schema, and what each endpoint answers.

The handlers validate bodies themselves (moelm.serve.protocol: one 400 naming the field, where FastAPI's models
would give a 422 list), so FastAPI cannot derive these schemas; they are written here, field for field beside
protocol.py, and a test keeps the two in step (every accepted field is described and every described field is
accepted). Limits that depend on the loaded model (vocabulary, model length) are not in the schema: a request
valid here can still get a 400 naming them.
"""

from __future__ import annotations

from typing import Any

from moelm.serve.protocol import MAX_N, MAX_STOP, MAX_TOP_LOGPROBS

_NULLABLE_STRING = {"type": ["string", "null"]}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


def _number(low: float, high: float, low_open: bool = False) -> dict[str, Any]:
    bound = {"exclusiveMinimum": low} if low_open else {"minimum": low}
    return {"type": ["number", "null"], **bound, "maximum": high}


def _integer(low: int, high: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": ["integer", "null"], "minimum": low}
    if high is not None:
        schema["maximum"] = high
    return schema


_COMMON: dict[str, Any] = {
    "model": _NULLABLE_STRING,
    "max_tokens": _integer(1),
    "temperature": _number(0.0, 2.0),
    "top_p": _number(0.0, 1.0, low_open=True),
    "n": _integer(1, MAX_N),
    "stop": {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
            {"type": "null"},
        ]
    },
    "seed": _integer(-(2**63)),
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": ["boolean", "null"]}},
        "additionalProperties": False,
    },
    "user": _NULLABLE_STRING,
    "presence_penalty": _number(-2.0, 2.0),
    "frequency_penalty": _number(-2.0, 2.0),
    "top_k": _integer(0),
    "min_p": {"type": ["number", "null"], "minimum": 0.0, "exclusiveMaximum": 1.0},
    "repetition_penalty": _number(0.0, 10.0, low_open=True),
    "ignore_eos": {"type": ["boolean", "null"]},
    "logit_bias": {
        "type": ["object", "null"],
        "patternProperties": {"^[0-9]+$": {"type": "number", "minimum": -100, "maximum": 100}},
        "additionalProperties": False,
    },
    "min_tokens": _integer(0),
    "stop_token_ids": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}},
    "response_format": {
        "anyOf": [
            {"type": "null"},
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
            {
                "type": "object",
                "required": ["type", "json_schema"],
                "properties": {
                    "type": {"const": "json_schema"},
                    "json_schema": {
                        "type": "object",
                        "required": ["schema"],
                        "properties": {"name": {"type": "string"}, "schema": {"type": "object"}},
                    },
                },
            },
        ]
    },
    "guided_json": {"type": ["object", "string", "null"]},
    "guided_regex": {"type": ["string", "null"]},
    "guided_choice": {"type": ["array", "null"], "items": {"type": "string", "minLength": 1}, "minItems": 1},
    "include_stop_str_in_output": {"type": ["boolean", "null"]},
    "skip_special_tokens": {"type": ["boolean", "null"]},
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "additionalProperties": False,
    "properties": {
        **_COMMON,
        "prompt": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                _TOKEN_IDS,
                {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
            ]
        },
        "logprobs": _integer(0, 5),
        "echo": {"type": ["boolean", "null"]},
        "suffix": {"type": "null"},
        "best_of": _integer(1, 1),
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "additionalProperties": False,
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "anyOf": [
                {"type": "null"},
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                    },
                },
            ]
        },
        "name": {"type": "string"},
        "reasoning_content": {"type": ["string", "null"]},
        "tool_call_id": {"type": "string"},
        "tool_calls": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["function"],
                "properties": {
                    "id": {"type": "string"},
                    "type": {"const": "function"},
                    "function": {
                        "type": "object",
                        "required": ["name", "arguments"],
                        "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
                    },
                },
            },
        },
    },
}

_TOOL = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
            },
        },
    },
}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": False,
    "properties": {
        **_COMMON,
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_completion_tokens": _integer(1),
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": _integer(0, MAX_TOP_LOGPROBS),
        "tools": {"type": ["array", "null"], "items": _TOOL},
        "tool_choice": {
            "anyOf": [
                {"type": "null"},
                {"enum": ["auto", "none", "required"]},
                {
                    "type": "object",
                    "required": ["type", "function"],
                    "properties": {
                        "type": {"const": "function"},
                        "function": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}},
                        },
                    },
                },
            ]
        },
        "parallel_tool_calls": {"type": ["boolean", "null"]},
    },
}

TOKENIZE_REQUEST: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "model": _NULLABLE_STRING,
        "prompt": {"type": "string"},
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "add_special_tokens": {"type": ["boolean", "null"]},
        "add_generation_prompt": {"type": ["boolean", "null"]},
    },
    "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
}

DETOKENIZE_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["tokens"],
    "additionalProperties": False,
    "properties": {"model": _NULLABLE_STRING, "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
}

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_CHOICES_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {"choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"]}}},
}


def _errors(*statuses: int) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": ERROR}}}
    return {str(status): {"description": "an error in OpenAI's envelope", **error} for status in statuses}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def generation(schema: dict[str, Any]) -> dict[str, Any]:
    """openapi_extra of /v1/completions and /v1/chat/completions: the body, JSON or an SSE stream, errors."""
    ok = {
        "description": "the completion (application/json), or its stream of chunks (text/event-stream)",
        "content": {"application/json": {"schema": _CHOICES_RESPONSE}, "text/event-stream": {"schema": {}}},
    }
    return {"requestBody": _body(schema), "responses": {"200": ok, **_errors(400, 401, 404, 413, 429, 500, 503)}}


def tokenizer_route(schema: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """openapi_extra of /tokenize and /detokenize."""
    ok = {"description": "OK", "content": {"application/json": {"schema": response}}}
    return {"requestBody": _body(schema), "responses": {"200": ok, **_errors(400, 401, 404, 413)}}


TOKENIZE_RESPONSE = {
    "type": "object",
    "required": ["count", "max_model_len", "tokens"],
    "properties": {"tokens": {"type": "array", "items": {"type": "integer"}}},
}
DETOKENIZE_RESPONSE = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}


def described_fields(schema: dict[str, Any]) -> set[str]:
    """The body fields a request schema describes."""
    return set(schema["properties"])


def errors(*statuses: int) -> dict[str, Any]:
    """openapi_extra of an endpoint whose only documented failures are these statuses."""
    return {"responses": _errors(*statuses)}
