"""Reading safetensors files tensor by tensor with plain file reads, so loading holds one copy of the weights.

safetensors' own reader memory-maps the file: every page it touches stays in the process's resident set while
the file is open, so a load that copies tensors out of it peaks at about twice the weight bytes. Here the header
(8-byte length + JSON) is parsed once and each tensor is read with `readinto` straight into a fresh tensor: the
file's pages stay in the page cache, outside the process, and the peak is one copy plus the tensor in flight.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFormatError(ValueError):
    """A file that is not a readable safetensors file; the message names the file (and tensor)."""


class SafetensorsFile:
    """The tensors of one safetensors file, read on request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > 100_000_000:
                    raise ValueError(f"header length {length}")
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error) as error:
            raise SafetensorsFormatError(f"{self.path}: not a readable safetensors file ({error})") from None
        self.data_start = 8 + length
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise SafetensorsFormatError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        start, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=dtype)
        if tensor.numel() * tensor.element_size() != end - start:
            raise SafetensorsFormatError(f"{self.path}: tensor {name!r} has {end - start} bytes for {entry['shape']}")
        if end == start:
            return tensor
        buffer = memoryview(tensor.view(torch.uint8).reshape(-1).numpy())
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + start)
            read = handle.readinto(buffer)
        if read != end - start:
            raise SafetensorsFormatError(
                f"{self.path}: tensor {name!r} is cut short ({read} of {end - start} bytes; the file is truncated)"
            )
        return tensor
