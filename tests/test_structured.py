"""Structured output: every answer constrained by a JSON schema parses and validates (random schemas), choices
and regexes are matched whole, and the server takes OpenAI's response_format and vLLM's guided_* fields."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from conftest import save_tiny_model_with_tokenizer

pytest.importorskip("llguidance", reason="structured output needs the structured extra (llguidance)")
jsonschema = pytest.importorskip("jsonschema")

from moelm.infer.engine import Engine, EngineRequest  # noqa: E402
from moelm.infer.structured import GrammarError, GrammarFactory, GrammarSpec  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tokenizer = save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("m"), max_position_embeddings=512)
    factory = GrammarFactory(tokenizer.to_str(), model.config.vocab_size, [1])
    return model.eval(), tokenizer, factory


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A schema whose every value is bounded (enums, ranges, short strings, short arrays), so a random model's
    greedy text can always close it within the token budget."""
    kinds = ["boolean", "integer", "enum", "string", "null"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "x y", 'q"uote'], rng.randint(1, 3))}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    if kind == "object":
        names = rng.sample(["a", "bb", "key", "x_1", "name"], rng.randint(1, 3))
        return {
            "type": "object",
            "properties": {name: random_schema(rng, depth + 1) for name in names},
            "required": names,
            "additionalProperties": False,
        }
    return {"type": kind}


def constrained(model, tokenizer, spec, factory, prompt: str = "the quick", seed: int | None = None) -> tuple:
    events = []
    temperature = {} if seed is None else {"seed": seed}
    request = EngineRequest(
        tokenizer.encode(prompt).ids, 200, events.append, constraint=factory.constraint(spec), **temperature
    )
    if seed is not None:
        from moelm.infer.sampling import SamplingParams

        request.params = SamplingParams(temperature=1.0)
    engine = Engine(model, [1], max_batch=1)
    engine.add(request)
    with torch.inference_mode():
        while engine.busy:
            engine.step()
    tokens = [e.token for e in events if e.token is not None and e.token != 1]
    return tokenizer.decode(tokens), events[-1].finish_reason


@pytest.mark.parametrize("seed", range(12))
def test_every_answer_parses_and_validates_against_its_random_schema(setup, seed):
    model, tokenizer, factory = setup
    rng = random.Random(seed)
    schema = {"type": "object", "properties": {"answer": random_schema(rng)}, "required": ["answer"]}
    schema["additionalProperties"] = False
    text, reason = constrained(model, tokenizer, GrammarSpec("json_schema", schema), factory, seed=seed % 3 or None)
    assert reason == "stop", (schema, text)
    jsonschema.validate(json.loads(text), schema)


def test_choices_and_regexes_are_matched_whole(setup):
    model, tokenizer, factory = setup
    choices = ["yes", "no", "two plus two"]
    for seed in (None, 1, 2, 3):
        text, _ = constrained(model, tokenizer, GrammarSpec("choice", choices), factory, seed=seed)
        assert text in choices
        pattern = r"[0-9]{2,3}-(ab|cd)"
        text, reason = constrained(model, tokenizer, GrammarSpec("regex", pattern), factory, seed=seed)
        assert re.fullmatch(pattern, text) and reason == "stop"


def test_a_bad_grammar_is_a_grammar_error(setup):
    _, _, factory = setup
    with pytest.raises(GrammarError):
        factory.constraint(GrammarSpec("regex", "(unclosed"))


def test_server_takes_response_format_and_guided_fields(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from moelm.infer.text import TextGenerator
    from moelm.serve.app import ServerConfig, create_app

    save_tiny_model_with_tokenizer(tmp_path, max_position_embeddings=512)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    with TestClient(create_app(TextGenerator.from_pretrained(tmp_path), ServerConfig("tiny"))) as http:
        format_ = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        chat = {"messages": [{"role": "user", "content": "ok?"}], "max_tokens": 40, "response_format": format_}
        reply = http.post("/v1/chat/completions", json={**chat, "temperature": 0}).json()
        jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), schema)
        body = {"prompt": "the", "max_tokens": 10, "guided_choice": ["red", "blue"], "n": 3, "seed": 4}
        texts = [c["text"] for c in http.post("/v1/completions", json=body).json()["choices"]]
        assert set(texts) <= {"red", "blue"} and len(texts) == 3
        bad = http.post("/v1/completions", json={"prompt": "the", "guided_regex": "(unclosed"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"
        both = http.post("/v1/completions", json={"prompt": "the", "guided_regex": "a", "guided_choice": ["b"]})
        assert both.status_code == 400


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the forecast",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


def test_openai_clients_tool_round_trip_forced_named_and_streamed(tmp_path):
    """The official client's tool flow: a required call parses and matches the function's schema, its result goes
    back as a tool message, and a named call streams as tool_calls deltas."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from conftest import RunningServer

    from moelm.infer.text import TextGenerator
    from moelm.serve.app import ServerConfig, create_app

    save_tiny_model_with_tokenizer(tmp_path, max_position_embeddings=1024)
    server = RunningServer(create_app(TextGenerator.from_pretrained(tmp_path), ServerConfig("tiny")))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "weather in Paris?"}]
        reply = client.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        result = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
        follow = [*messages, choice.message.model_dump(exclude_none=True), result]
        answer = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], max_tokens=5)
        assert answer.choices[0].message.role == "assistant"
        named = {"type": "function", "function": {"name": "get_weather"}}
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=messages, tools=[WEATHER], tool_choice=named, max_tokens=60, stream=True
            )
        )
        deltas = [
            d for c in chunks if c.choices and c.choices[0].delta.tool_calls for d in c.choices[0].delta.tool_calls
        ]
        assert deltas[0].function.name == "get_weather" and deltas[0].id and {d.index for d in deltas} == {0}
        assert len(deltas) > 2  # the arguments arrive in pieces as they are generated
        arguments = "".join(d.function.arguments or "" for d in deltas)
        jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        whole = client.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER], tool_choice=named, max_tokens=60, temperature=0
        )
        streamed = client.chat.completions.create(
            model="tiny",
            messages=messages,
            tools=[WEATHER],
            tool_choice=named,
            max_tokens=60,
            temperature=0,
            stream=True,
        )
        pieces = [
            d for c in streamed if c.choices and c.choices[0].delta.tool_calls for d in c.choices[0].delta.tool_calls
        ]
        streamed_arguments = json.loads("".join(d.function.arguments or "" for d in pieces))
        assert streamed_arguments == json.loads(whole.choices[0].message.tool_calls[0].function.arguments)
        none = client.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=4, temperature=0
        )
        assert none.choices[0].message.tool_calls is None
    finally:
        server.stop()


def test_call_scanner_finds_the_top_level_name_and_arguments_as_they_grow():
    from moelm.serve.tools import ForcedCallStream, scan_call

    text = '{"arguments":{"name":"x","q":"}{\\""},"name":"get_weather"}'
    name, (start, end) = scan_call(text)
    assert name == "get_weather" and json.loads(text[start:end]) == {"name": "x", "q": '}{"'}
    assert scan_call('{"name":"get_wea') == (None, None)
    assert scan_call('{"name":"f","arguments":{"a":[1,') == ("f", (24, None))
    stream, deltas = ForcedCallStream(), []
    for piece in ['{"na', 'me":"f",', '"arguments":{"a"', ":[1,2]}", "}"]:
        deltas += stream.feed(piece)
    assert deltas[0]["function"] == {"name": "f", "arguments": ""} and stream.complete
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"a":[1,2]}'


def test_tool_prompts_render_calls_and_results_and_auto_replies_parse_blocks():
    from moelm.serve.tools import Tools, parse_reply, parse_tools, prompt_messages

    tools = parse_tools({"tools": [WEATHER]})
    assert tools.choice == "auto" and tools.active and not tools.forced
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": "rain"},
    ]
    turns = prompt_messages(history, tools)
    assert turns[0]["role"] == "system" and '"get_weather"' in turns[0]["content"]
    assert turns[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert turns[3] == {"role": "tool", "content": "rain"}
    reply = 'Let me look. <tool_call> {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}} </tool_call>'
    content, calls = parse_reply(reply, tools)
    assert content == "Let me look." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert parse_reply("<tool_call>{not json}</tool_call>", tools) == ("<tool_call>{not json}</tool_call>", [])
    assert parse_reply('<tool_call>{"name": "other", "arguments": {}}</tool_call>', tools)[1] == []
    assert prompt_messages(history[:1], Tools([], "none")) == [{"role": "user", "content": "hi"}]
    two = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>' * 2
    assert len(parse_reply(two, tools)[1]) == 2
    single = parse_tools({"tools": [WEATHER], "parallel_tool_calls": False})
    assert len(parse_reply(two, single)[1]) == 1  # parallel_tool_calls: false keeps the first call
