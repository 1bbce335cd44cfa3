"""Files that are never half-written and are checked when read back.

Everything moelm writes for later (model weights, configs, checkpoints, results) goes through `atomic_path`:
written beside the target under a temporary name, flushed, given the mode a plain `open()` would have given it
(the umask's, not the 0600 of a temporary file), then renamed over the target in one step. A crash leaves either
the old file or the new one, never a mixture.

A directory that must be trusted as a whole (a training checkpoint) carries a `manifest.json` with the size and
SHA-256 of every file, written last; `verify_manifest` names the first file that does not match.
This module imports nothing of moelm, so every floor may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"


class DamagedFileError(ValueError):
    """A file that is missing, truncated or altered since it was written; the message names it."""


def _umask_mode() -> int:
    """The mode `open(path, 'w')` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; when the block succeeds it replaces `target` in one rename.

    The temporary file is removed when the block fails, so no partial file is ever left behind.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write text to `target` atomically (see `atomic_path`)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record size and SHA-256 of every file under `directory` in `directory/manifest.json` (written last)."""
    entries = {
        str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": file_digest(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    atomic_write_text(directory / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify_manifest(directory: Path) -> None:
    """Raise DamagedFileError naming the first file that is missing or differs from `directory/manifest.json`."""
    manifest = directory / MANIFEST
    try:
        entries = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        raise DamagedFileError(f"{manifest} is missing (the checkpoint was not finished)") from None
    except (ValueError, KeyError, TypeError):
        raise DamagedFileError(f"{manifest} is unreadable") from None
    for name, expected in entries.items():
        path = directory / name
        if not path.is_file():
            raise DamagedFileError(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise DamagedFileError(f"{path} has {size} bytes, {expected['size']} were written (truncated?)")
        if file_digest(path) != expected["sha256"]:
            raise DamagedFileError(f"{path} does not match its checksum (altered or corrupted)")
