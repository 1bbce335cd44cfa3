"""Measurements shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

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


def read_bandwidth(megabytes: int = 1024) -> float:
    """Bytes per second read by a sum over a large tensor (no writes): a read-bound step's roofline denominator
    (a copy's bandwidth, above, also writes)."""
    data = torch.ones(megabytes * 2**20 // 4)
    data.sum()
    start = time.perf_counter()
    for _ in range(3):
        data.sum()
    return 3 * data.numel() * 4 / (time.perf_counter() - start)


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each step, timed round-robin (after `warmup` calls of each).

    A shared machine's speed drifts by tens of percent over a minute; timing the contestants in turn, round
    after round, exposes them to the same drift instead of giving one the fast minute and the other the slow one.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds of one call, and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds per call of one step alone (for contests, use interleaved_medians)."""
    return interleaved_medians({"step": fn}, repeats, warmup)["step"]


def transformers_twin(model: torch.nn.Module, **load_kwargs: object) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM with the same weights: saved by moelm, loaded by transformers."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return AutoModelForCausalLM.from_pretrained(directory, **load_kwargs)


def training_step(
    model: torch.nn.Module, batches: Sequence[torch.Tensor], autocast: bool = False
) -> Callable[[], None]:
    """One forward + backward + fused AdamW step on the next batch (cycling), the same for every contestant."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch_stream = itertools.cycle(batches)

    def step() -> None:
        ids = next(batch_stream)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def add_allocator_flag(parser: argparse.ArgumentParser) -> None:
    """--reuse-freed-memory: the glibc malloc setting `moelm pretrain` applies by default."""
    parser.add_argument(
        "--reuse-freed-memory", action="store_true", help="glibc malloc tuning as `moelm pretrain` applies it"
    )


def apply_allocator_flag(args: argparse.Namespace) -> None:
    """Process-wide: transformers, timed in the same process, benefits alike."""
    if args.reuse_freed_memory:
        reuse_freed_memory()
