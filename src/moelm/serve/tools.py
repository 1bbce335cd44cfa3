"""Tool calling for chat completions: OpenAI's `tools` / `tool_choice`, rendered into the prompt and parsed back.

moelm's chat format carries tools the way Hermes-style templates do (vLLM's `hermes` parser reads the same): the
functions are listed in the system turn as JSON, a call is written `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` in the assistant turn, and a result comes back as a `tool` turn. With tool_choice "auto" the
model decides and the reply is parsed for such blocks; with "required" or a named function the reply is
constrained (moelm.infer.structured) to one call object whose arguments match that function's parameter schema,
so it always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from moelm.infer.structured import GrammarSpec
from moelm.serve.errors import invalid

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass
class Tools:
    """A chat request's functions and how the reply may use them."""

    functions: list[dict[str, Any]]  # {name, description, parameters}
    choice: str = "auto"  # "auto" | "none" | "required" | a function's name
    parallel: bool = True  # OpenAI's parallel_tool_calls: False keeps a reply's first call only

    @property
    def active(self) -> bool:
        return self.choice != "none" and bool(self.functions)

    @property
    def forced(self) -> bool:
        return self.active and self.choice != "auto"


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` checked into Tools (None when the request has no tools)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", f"must be true or false, got {parallel!r}")
    parallel = parallel is not False
    if tools is None:
        if choice not in (None, "none"):
            raise invalid("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list):
        raise invalid("tools", "must be a list of {type: function, function: {name, parameters}}")
    functions = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise invalid(where, "must be {type: function, function: {name, description, parameters}}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid(f"{where}.function.name", "must be 1-64 letters, digits, _ or -")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise invalid(f"{where}.function.parameters", "must be a JSON schema object")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise invalid(f"{where}.function.description", "must be a string")
        functions.append({"name": name, "description": description, "parameters": parameters})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise invalid("tools", "function names must be unique")
    if choice is None:
        return Tools(functions, "auto", parallel)
    if choice in ("auto", "none", "required"):
        return Tools(functions, choice, parallel)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or named not in names:
        allowed = f"auto, none, required or {{type: function, function: {{name}}}} with a name of {names}"
        raise invalid("tool_choice", f"must be {allowed}")
    return Tools(functions, named, parallel)


def prompt_messages(messages: list[dict[str, Any]], tools: Tools | None) -> list[dict[str, str]]:
    """The conversation as the chat template's plain {role, content} turns: tool calls written into their
    assistant turns, results as `tool` turns, and (when tools are on) the functions listed in the system turn."""
    plain = []
    for message in messages:
        content = message.get("content") or ""
        calls = message.get("tool_calls") or []
        if calls:
            written = [
                CALL_OPEN + json.dumps({"name": c["name"], "arguments": c["arguments"]}) + CALL_CLOSE for c in calls
            ]
            content = content + "".join(written)
        turn = {"role": message["role"], "content": content}
        if "reasoning" in message:
            turn["reasoning"] = message["reasoning"]
        plain.append(turn)
    if tools is not None and tools.active:
        listing = "\n".join(json.dumps(f) for f in tools.functions)
        call = f'{CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CALL_CLOSE}'
        preamble = f"You can call these functions:\n{listing}\nTo call one, write {call}."
        if plain and plain[0]["role"] == "system":
            plain[0] = {**plain[0], "content": plain[0]["content"] + "\n\n" + preamble}
        else:
            plain.insert(0, {"role": "system", "content": preamble})
    return plain


def call_grammar(tools: Tools) -> GrammarSpec:
    """The one call a forced reply must be: {"name": ..., "arguments": <that function's parameters>}."""
    allowed = [f for f in tools.functions if tools.choice in ("required", f["name"])]
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in allowed
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return GrammarSpec("json_schema", schema, "tool_choice")


def parse_reply(text: str, tools: Tools) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls in OpenAI's shape) of a reply: a forced reply is one call object; an auto reply is
    text with any number of well-formed <tool_call> blocks (malformed ones stay text)."""
    if tools.forced:
        found = [text.strip()]
        rest = ""
    else:
        found = _CALL.findall(text)
        rest = _CALL.sub("", text).strip() if found else text
        found = found if tools.parallel else found[:1]
    calls = []
    names = {f["name"] for f in tools.functions}
    for raw in found:
        try:
            call = json.loads(raw)
        except ValueError:
            return text, []
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
            return text, []
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
            }
        )
    return (rest or None), calls


class ForcedCallStream:
    """A forced reply, one grammar-constrained call object, as OpenAI's streamed tool_calls deltas: the call's id
    and name once the name is complete, then the arguments object's text as it is generated (vLLM streams its
    calls so). An auto reply may hold malformed blocks that must stay text, so it is still sent when it ends."""

    def __init__(self) -> None:
        self.text = ""
        self.id = f"call_{uuid.uuid4().hex[:24]}"
        self.named = False
        self.complete = False  # the arguments object has closed
        self._sent = 0  # characters of the arguments' text sent so far

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """The tool_calls delta entries that `delta` (the reply's next text) completes."""
        self.text += delta
        name, arguments = scan_call(self.text)
        out: list[dict[str, Any]] = []
        if not self.named:
            if name is None:  # the arguments may come first: held until the name is known
                return out
            self.named = True
            out.append({"index": 0, "id": self.id, "type": "function", "function": {"name": name, "arguments": ""}})
        if arguments is not None:
            start, end = arguments
            confirmed = self.text[start:end]
            self.complete = end is not None
            if len(confirmed) > self._sent:
                out.append({"index": 0, "function": {"arguments": confirmed[self._sent :]}})
                self._sent = len(confirmed)
        return out


def scan_call(text: str) -> tuple[str | None, tuple[int, int | None] | None]:
    """The top-level `name` (once its string has closed) and the span of the `arguments` value (its end None while
    it is open) of a call object's text so far; a string-aware scan, so keys inside the arguments never count."""
    name: str | None = None
    arguments: list[int | None] | None = None
    depth, key, expecting = 0, None, "key"
    in_string = escaped = False
    string_start = 0
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                if depth == 1 and expecting == "key":
                    key = json.loads(text[string_start : index + 1])
                elif depth == 1 and key == "name":
                    name = json.loads(text[string_start : index + 1])
            continue
        if char == '"':
            in_string, string_start = True, index
        elif char in "{[":
            depth += 1
            if depth == 2 and key == "arguments" and expecting == "value" and arguments is None:
                arguments = [index, None]
        elif char in "}]":
            depth -= 1
            if depth == 1 and arguments is not None and arguments[1] is None:
                arguments[1] = index + 1
        elif depth == 1 and char == ":":
            expecting = "value"
        elif depth == 1 and char == ",":
            expecting, key = "key", None
    return name, (arguments[0], arguments[1]) if arguments is not None else None
