"""Which device a command runs on: `auto`, `cpu`, `cuda` or `cuda:N`, checked before anything is built.

Under torchrun each process takes `cuda:LOCAL_RANK` for `auto` and `cuda`, as the field does. A request for a
GPU that is not there is a one-line error naming what is available, never a CUDA traceback later.
"""

from __future__ import annotations

import os
import re

import torch

from moelm.schema import DEVICE_ALLOWED as DEVICE_CHOICES
from moelm.schema import DEVICE_PATTERN


class DeviceError(ValueError):
    """A device that does not exist here (or a spelling moelm does not know)."""


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """The torch.device for a --device / train.device value (local_rank: this process's rank on its node)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    match = re.fullmatch(DEVICE_PATTERN, spec)
    if match is None:
        raise DeviceError(f"invalid device {spec!r}: must be {DEVICE_CHOICES}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for CUDA, but torch sees no CUDA device here (use cpu or auto)")
    count = torch.cuda.device_count()
    index = int(match.group(1)) if match.group(1) is not None else local_rank
    if index >= count:
        raise DeviceError(f"device cuda:{index} does not exist: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)
