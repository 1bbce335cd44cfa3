"""Chat template: Jinja, stored in the model directory's tokenizer_config.json as transformers stores it.

The default template has system/user/assistant turns and DeepSeek-R1's reasoning format: an assistant message
with a `reasoning` field is written `<think>\\n{reasoning}\\n</think>\\n{content}`, and every assistant turn
ends with EOS so generation stops there. `encode_chat` returns the token ids with a loss mask that is true only
on assistant tokens (the reply and its EOS), so fine-tuning never learns to write the user's side.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moelm.files import atomic_write_text

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% if message.get('reasoning') %}{{ '<think>\\n' + message['reasoning'] + '\\n</think>\\n' }}{% endif %}"
    "{{ message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")  # tool: a function's result (moelm.serve.tools)
CONFIG_FILE = "tokenizer_config.json"


class ChatFormatError(ValueError):
    """A conversation the template cannot render (unknown role, missing content, ...)."""


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as a list of {role, content[, reasoning]} with known roles; the error says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatFormatError(f"messages[{index}] is {type(message).__name__}, expected an object")
        if message.get("role") not in ROLES:
            raise ChatFormatError(f"messages[{index}].role={message.get('role')!r}: allowed {list(ROLES)}")
        for key in ("content", "reasoning"):
            if key in message and not isinstance(message[key], str):
                raise ChatFormatError(f"messages[{index}].{key} must be a string")
        if "content" not in message:
            raise ChatFormatError(f"messages[{index}] has no 'content'")
    return messages


@functools.lru_cache(maxsize=8)
def _compile(template: str):  # noqa: ANN202 - jinja2 Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render_chat(
    messages: Sequence[dict[str, str]],
    template: str = DEFAULT_CHAT_TEMPLATE,
    add_generation_prompt: bool = False,
    eos_token: str = "</s>",
) -> str:
    """The conversation as text; with add_generation_prompt it ends where the assistant starts writing."""
    validate_messages(list(messages))
    return _render(list(messages), template, add_generation_prompt, eos_token)


def _render(messages: list[dict[str, str]], template: str, add_generation_prompt: bool, eos_token: str) -> str:
    compiled = _compile(template)
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, eos_token=eos_token)


def encode_chat(
    tokenizer,  # noqa: ANN001 - tokenizers.Tokenizer
    messages: Sequence[dict[str, str]],
    template: str = DEFAULT_CHAT_TEMPLATE,
    eos_token: str = "</s>",
) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and a mask that is True on assistant tokens only.

    Each assistant turn's span is found by rendering the conversation up to the turn with the generation prompt
    (the prefix the model sees at inference) and up to the end of the turn; the pieces are encoded separately so
    the prompt tokens are exactly those inference will feed.
    """
    messages = validate_messages(list(messages))
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(messages[:index], template, True, eos_token)
        turn = _render(messages[: index + 1], template, False, eos_token)
        if not prefix.startswith(rendered) or not turn.startswith(prefix):
            raise ChatFormatError("chat template is not prefix-stable; cannot mask assistant turns")
        for text, is_assistant in ((prefix[len(rendered) :], False), (turn[len(prefix) :], True)):
            piece = tokenizer.encode(text).ids if text else []
            ids.extend(piece)
            mask.extend([is_assistant] * len(piece))
        rendered = turn
    tail = _render(messages, template, False, eos_token)[len(rendered) :]
    if tail:
        piece = tokenizer.encode(tail).ids
        ids.extend(piece)
        mask.extend([False] * len(piece))
    return ids, mask


def save_chat_template(
    directory: str | Path, template: str = DEFAULT_CHAT_TEMPLATE, bos_token: str | None = None
) -> None:
    """Write (or update) tokenizer_config.json's chat_template and special tokens, keeping its other keys.

    `bos_token` is the model config's BOS (None for models moelm trains: they never see one), so a harness that
    takes BOS from the tokenizer, as lm-eval does, prefixes what the model saw before each document: EOS."""
    path = Path(directory) / CONFIG_FILE
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.update({"chat_template": template, "eos_token": "</s>", "bos_token": bos_token, "pad_token": "<pad>"})
    atomic_write_text(path, json.dumps(config, indent=2))


def has_chat_template(directory: str | Path) -> bool:
    """Whether the directory states a chat template (a chat-tuned model) or would fall back to moelm's default."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    template = json.loads(path.read_text()).get("chat_template")
    return isinstance(template, str) and bool(template)


def load_chat_template(directory: str | Path) -> str:
    """The directory's chat template, or the default when the directory has none (a pre-trained base model)."""
    path = Path(directory) / CONFIG_FILE
    if path.is_file():
        template = json.loads(path.read_text()).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return DEFAULT_CHAT_TEMPLATE
