"""Text sources: plain text files and folders, JSONL with a configurable field, and the built-in corpus.

Each source yields documents (strings). Malformed input is reported with file and line, never a traceback:
`DataError` carries the message the CLI prints.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def jsonl_records(path: str | Path, on_bad_line: Callable[[str], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSON Lines file (gzip-compressed when it ends in .gz).

    A line that is not UTF-8 or not JSON is reported as "path:N: ...": raised as DataError, or passed to
    `on_bad_line` (which may collect it and let reading go on). The one JSONL reader of the package.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                message = (
                    f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                    "re-encode the file as UTF-8"
                )
                if on_bad_line is None:
                    raise DataError(message) from None
                on_bad_line(message)
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                message = f"{path}:{number}: invalid JSON ({error.msg})"
                if on_bad_line is None:
                    raise DataError(message) from None
                on_bad_line(message)


def iter_jsonl(path: Path, field: str = "text") -> Iterator[str]:
    """One document per JSON line, taken from `field`."""
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{number}: expected an object with a string field {field!r}")
        yield record[field]


def iter_parquet(path: Path, field: str = "text") -> Iterator[str]:
    """Documents from a Parquet file's `field` column, read batch by batch (pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r}; columns: {parquet.schema_arrow.names}")
    for batch in parquet.iter_batches(columns=[field]):
        yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str))


def iter_hf_dataset(path: Path, field: str = "text") -> Iterator[str]:
    """Documents from a dataset saved locally with `datasets` (save_to_disk); never downloads."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a saved HF dataset needs the datasets package") from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    if field not in dataset.column_names:
        raise DataError(f"{path}: no column {field!r}; columns: {dataset.column_names}")
    yield from (row[field] for row in dataset)


def iter_documents(spec: str, text_field: str = "text", builtin_records: int = 4000, seed: int = 0) -> Iterator[str]:
    """Documents from 'builtin', a .jsonl / .parquet / .txt file, a saved HF dataset or a folder of .txt files.

    Every reader streams, so a corpus larger than memory can be tokenised into the on-disk cache."""
    if spec == "builtin":
        yield from (record.text for record in builtin_corpus(builtin_records, seed=seed))
        return
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data source {spec!r} not found (use 'builtin', a .txt/.jsonl/.parquet file or a folder)")
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path, text_field)
    elif path.suffix == ".parquet":
        yield from iter_parquet(path, text_field)
    elif path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        yield from iter_hf_dataset(path, text_field)
    else:
        yield from iter_text_files(path)
