"""Measurements shared by the benchmark scripts."""

from __future__ import annotations

import time

import torch


def copy_bandwidth(megabytes: int = 512) -> float:
    """Bytes per second read + written by a large tensor copy: the memory roofline's denominator."""
    src = torch.empty(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    return 3 * 2 * src.numel() * 4 / (time.perf_counter() - start)
