"""Text sources: plain text files and folders, JSONL with a configurable field, and the built-in corpus.

Each source yields documents (strings). Malformed input is reported with file and line, never a traceback:
`DataError` carries the message the CLI prints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from moelm.data.builtin import builtin_corpus


class DataError(ValueError):
    """Bad or missing training data; the message names the file (and line)."""


def iter_text_files(path: Path) -> Iterator[str]:
    """Each .txt file is one document; a folder contributes its .txt files in sorted order."""
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text


def iter_jsonl(path: Path, field: str = "text") -> Iterator[str]:
    """One document per JSON line, taken from `field`."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{number}: expected an object with a string field {field!r}")
            yield record[field]


def iter_documents(spec: str, text_field: str = "text", builtin_records: int = 4000, seed: int = 0) -> Iterator[str]:
    """Documents from 'builtin', a .jsonl file, a .txt file or a folder of .txt files."""
    if spec == "builtin":
        yield from (record.text for record in builtin_corpus(builtin_records, seed=seed))
        return
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data source {spec!r} not found (use 'builtin', a .txt/.jsonl file or a folder)")
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path, text_field)
    else:
        yield from iter_text_files(path)
