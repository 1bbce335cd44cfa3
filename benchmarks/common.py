"""Measurements shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from moelm.train.allocator import reuse_freed_memory


def copy_bandwidth(megabytes: int = 512) -> float:
    """Bytes per second read + written by a large tensor copy: the memory roofline's denominator."""
    src = torch.empty(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    return 3 * 2 * src.numel() * 4 / (time.perf_counter() - start)


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each step, timed round-robin (one warm-up call each first).

    A shared machine's speed drifts by tens of percent over a minute; timing the contestants in turn, round
    after round, exposes them to the same drift instead of giving one the fast minute and the other the slow one.
    """
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def add_allocator_flag(parser: argparse.ArgumentParser) -> None:
    """--reuse-freed-memory: the glibc malloc setting `moelm pretrain` applies by default."""
    parser.add_argument(
        "--reuse-freed-memory", action="store_true", help="glibc malloc tuning as `moelm pretrain` applies it"
    )


def apply_allocator_flag(args: argparse.Namespace) -> None:
    """Process-wide: transformers, timed in the same process, benefits alike."""
    if args.reuse_freed_memory:
        reuse_freed_memory()
