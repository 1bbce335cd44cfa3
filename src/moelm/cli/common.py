"""What the subcommands share: argparse value types that check ranges, common flags, model loading, errors.

Every numeric flag is checked by the parser, so a bad value is a one-line usage error, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from moelm.schema import DEVICE_ALLOWED, DEVICE_PATTERN

COMPILE_HELP = "capture the decode step as one compiled graph (tens of seconds once; several times faster)"


class EvalTaskError(RuntimeError):
    """Some tasks of an evaluation failed after others finished (their results are kept)."""


def device(spec: str):  # noqa: ANN202 - torch.device
    """--device checked against this machine before the model loads."""
    from moelm.devices import resolve_device

    return resolve_device(spec)


def sampling(args: argparse.Namespace):  # noqa: ANN202 - SamplingParams
    from moelm.infer.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)


def load_generator(args: argparse.Namespace):  # noqa: ANN202 - TextGenerator
    """The model directory as a TextGenerator, its decode step compiled when --compile asks for it."""
    from moelm.infer.text import TextGenerator

    generator = TextGenerator.from_pretrained(
        args.model,
        dtype=dtype(args.dtype),
        device=device(args.device),
        activation_dtype=args.activation_dtype,
        quantize=args.quantize,
    )
    generator.model.eval()
    if args.compile:
        generator.compile()
    return generator


DTYPES = ("float32", "bfloat16", "float16")


def dtype(name: str | None):  # noqa: ANN202 - torch.dtype or None
    """The torch dtype a --dtype flag names (None: the checkpoint's default)."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def _number(kind: type, allowed: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: parse as `kind`, then check the range; the message says what is allowed."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = allowed  # argparse names the type in some messages
    return parse


POSITIVE_INT = _number(int, "a positive integer", lambda v: v > 0)


def DEVICE(text: str) -> str:  # noqa: N802 - an argparse type, named like the others
    """--device: auto, cpu, cuda or cuda:N (whether it exists here is checked when the model loads)."""
    if re.fullmatch(DEVICE_PATTERN, text) is None:
        raise argparse.ArgumentTypeError(f"must be {DEVICE_ALLOWED}, got {text!r}")
    return text


PORT = _number(int, "a port number in 1..65535", lambda v: 0 < v < 65536)
NON_NEGATIVE_INT = _number(int, "a non-negative integer", lambda v: v >= 0)
NON_NEGATIVE_FLOAT = _number(float, "a non-negative number", lambda v: v >= 0)
POSITIVE_FLOAT = _number(float, "a positive number", lambda v: v > 0)
TOP_P = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
MIN_P = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
SEED = _number(int, "an integer in 0..2**63-1", lambda v: 0 <= v < 2**63)


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--dtype and --device of a command that loads a model directory."""
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="load the weights in this dtype")
    parser.add_argument(
        "--activation-dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="dtype of the residual stream and cache (auto: float32 under bf16/f16 weights on a CPU, as llama.cpp)",
    )
    parser.add_argument(
        "--quantize", choices=("int8",), default=None, help="weight-only int8 projections (fast with --compile)"
    )
    parser.add_argument("--device", type=DEVICE, default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory with tokenizer.json")
    add_device_args(parser)
    parser.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    parser.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="0 = off")
    parser.add_argument("--top-p", type=TOP_P, default=1.0)
    parser.add_argument("--min-p", type=MIN_P, default=0.0)
    parser.add_argument("--repetition-penalty", type=POSITIVE_FLOAT, default=1.0)
    parser.add_argument("--seed", type=SEED, default=None)


def grow_total(bar, count: int) -> None:  # noqa: ANN001 - tqdm
    """Tasks build their requests one after another: the bar's total grows as each announces its count."""
    bar.total = (bar.total or 0) + count
    bar.refresh()


def progress_bar(unit: str):  # noqa: ANN202 - tqdm or None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit=unit, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="recipe YAML (default: built-in defaults)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in --out")
    mode.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start over")
    parser.add_argument(
        "--allow-recipe-change",
        action="store_true",
        help="with --resume: accept recipe changes beyond cadence, length, device and layout (recorded in run.json)",
    )
