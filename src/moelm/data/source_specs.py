"""Typed data-source specifications: one dataclass per format, built from a recipe's `sources` list.

A recipe names its fine-tuning and RL data as a list of mappings (`{format: builtin, domains: [math]}`); each is
turned into the spec of its format here, so a typo in a key, a wrong type or an unknown domain fails while the
recipe loads, naming `sft.sources[N].key`, instead of when the data is first read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from moelm.data.builtin import DOMAINS
from moelm.schema import (
    POSITIVE,
    POSITIVE_INT,
    ConfigError,
    Constraint,
    build,
    setting,
    to_plain,
)

DOMAIN_LIST = Constraint(f"a non-empty list of {list(DOMAINS)}", lambda v: bool(v) and set(v) <= set(DOMAINS))


@dataclass
class SourceSpec:
    """What every source shares: a mixture weight (SFT) and a task name that overrides the format's own."""

    FORMAT: ClassVar[str] = ""
    weight: float | None = setting(None, check=POSITIVE)
    task: str | None = None

    @property
    def format(self) -> str:
        return self.FORMAT

    def to_mapping(self) -> dict[str, Any]:
        """The recipe spelling, resolved: format first, then every field."""
        return {"format": self.FORMAT, **{k: to_plain(v) for k, v in vars(self).items()}}


@dataclass
class BuiltinSource(SourceSpec):
    """The generated multi-domain corpus (math, code, logic, language), each record with a difficulty level."""

    FORMAT: ClassVar[str] = "builtin"
    num_records: int = setting(2000, check=POSITIVE_INT)
    seed: int = 0
    domains: list[str] = setting(factory=lambda: ["math"], check=DOMAIN_LIST)
    max_difficulty: int | None = setting(None, check=POSITIVE_INT)


@dataclass
class FileSource(SourceSpec):
    """A local file in one of the public formats (or moelm's JSONL); the path is required."""

    path: str = ""  # required: parse_source refuses a file source without one


@dataclass
class JsonlSource(FileSource):
    FORMAT: ClassVar[str] = "jsonl"


@dataclass
class Gsm8kSource(FileSource):
    FORMAT: ClassVar[str] = "gsm8k"


@dataclass
class MbppSource(FileSource):
    FORMAT: ClassVar[str] = "mbpp"


@dataclass
class BbhSource(FileSource):
    FORMAT: ClassVar[str] = "bbh"


@dataclass
class MmluSource(FileSource):
    FORMAT: ClassVar[str] = "mmlu"


SOURCE_FORMATS: dict[str, type[SourceSpec]] = {
    cls.FORMAT: cls for cls in (BuiltinSource, JsonlSource, Gsm8kSource, MbppSource, BbhSource, MmluSource)
}
SFT_FORMATS = tuple(SOURCE_FORMATS)
GRPO_FORMATS = ("builtin", "jsonl")


def parse_source(
    value: Any, key: str, formats: tuple[str, ...] = SFT_FORMATS, builtin_defaults: dict[str, Any] | None = None
) -> SourceSpec:
    """The spec of one `sources` entry (a mapping with `format`, or a spec already built); `builtin_defaults`
    fill keys a builtin entry leaves out (GRPO draws seed 2 unless told, so its prompts differ from SFT's)."""
    if isinstance(value, SourceSpec):
        if value.FORMAT not in formats:
            raise ConfigError(f"invalid {key}.format={value.FORMAT!r}: must be one of {list(formats)}")
        return value
    if not isinstance(value, dict) or "format" not in value:
        raise ConfigError(f"invalid {key}={value!r}: must be a mapping with a format (one of {list(formats)})")
    values = dict(value)
    kind = values.pop("format")
    if kind not in formats:
        raise ConfigError(f"invalid {key}.format={kind!r}: must be one of {list(formats)}")
    cls = SOURCE_FORMATS[kind]
    if cls is BuiltinSource:
        values = {**(builtin_defaults or {}), **values}
    if issubclass(cls, FileSource) and not values.get("path"):
        raise ConfigError(f"{key} ({kind}) needs a path")
    return build(cls, values, f"{key}.")


def parse_sources(
    values: Any, key: str, formats: tuple[str, ...] = SFT_FORMATS, builtin_defaults: dict[str, Any] | None = None
) -> list[SourceSpec]:
    """Every entry of a `sources` list as its spec; the list must not be empty."""
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"invalid {key}={values!r}: must be a non-empty list of sources")
    return [parse_source(v, f"{key}[{i}]", formats, builtin_defaults) for i, v in enumerate(values)]
