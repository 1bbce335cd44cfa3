"""Atomic, verified, resumable training checkpoints under OUT/checkpoints/step-N/.

Each checkpoint is written into a temporary directory, sealed with a `manifest.json` (size and SHA-256 of every
file, written last) and renamed into place, so a crash mid-save never leaves a broken latest checkpoint, and a
file damaged afterwards (a full disk, a copy cut short) is found before it is trusted. `model/` is an
HF-compatible model directory (safetensors), or for a LoRA run `adapter/` a PEFT adapter directory;
`trainer.pt` holds the optimizer state, RNG states and data position as plain tensors and containers, loadable
with `torch.load(weights_only=True)` (no pickled code).

A run under torchrun writes a sharded checkpoint instead: `shards/` (torch.distributed.checkpoint, each rank its
own pieces of weights and optimizer moments, moelm.dist.checkpoint) beside `config.json`, and a `trainer.pt`
without the optimizer. Every rank writes into the same temporary directory; rank 0 seals and renames it once
all have finished, so a rank that dies mid-save leaves the previous checkpoint the latest.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moelm.dist.checkpoint import CONFIG_FILE, SHARDS_DIR
from moelm.dist.strategy import ParallelStrategy
from moelm.files import MANIFEST, DamagedFileError, verify_manifest, write_manifest
from moelm.model.hf import CheckpointError, write_hf_config
from moelm.model.lora import LoraSpec
from moelm.model.peft_format import save_adapter
from moelm.model.transformer import MoELM

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer.pt"
ADAPTER_DIR = "adapter"  # a LoRA run's weights: the adapters alone (moelm.model.peft_format)


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: MoELM,
    state: dict[str, Any],
    tokenizer_file: Path | None,
    keep_last: int,
    text_files: dict[str, str] | None = None,
    adapter: tuple[LoraSpec, Path] | None = None,
) -> Path:
    """Write step-N atomically with its manifest, then drop all but the newest `keep_last` checkpoints.

    `text_files` (name -> text, e.g. run.json) are written beside the trainer state, inside the manifest.
    `adapter` (the LoRA spec and the base model directory) writes the model's adapters alone, as a PEFT directory
    `adapter/`, in place of the full `model/`."""
    tmp = _fresh_tmp(out_dir, step, os.getpid())
    if adapter is None:
        weights = tmp / "model"
        model.save_pretrained(weights)
    else:
        weights = tmp / ADAPTER_DIR
        save_adapter(model, adapter[0], weights, adapter[1])
    return _seal(out_dir, step, tmp, weights, state, tokenizer_file, keep_last, text_files)


def save_sharded_checkpoint(
    out_dir: Path,
    step: int,
    strategy: ParallelStrategy,
    model: MoELM,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    tokenizer_file: Path | None,
    keep_last: int,
    text_files: dict[str, str] | None = None,
) -> Path:
    """step-N as a sharded checkpoint (every rank calls this; `state` is rank 0's trainer state)."""
    tmp = out_dir / "checkpoints" / f".tmp-step-{step}-sharded"
    if strategy.is_main:
        _fresh_tmp(out_dir, step, "sharded")
    strategy.barrier()
    strategy.save_shards(tmp / SHARDS_DIR, model, optimizer)
    strategy.barrier()
    final = out_dir / "checkpoints" / f"step-{step}"
    if strategy.is_main:
        write_hf_config(tmp, model.config, torch.float32)
        final = _seal(out_dir, step, tmp, tmp, state, tokenizer_file, keep_last, text_files)
    strategy.barrier()
    return final


def is_sharded(path: Path) -> bool:
    """A checkpoint written under torchrun (DCP shards) rather than a model directory."""
    return (path / SHARDS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def _fresh_tmp(out_dir: Path, step: int, tag: object) -> Path:
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _seal(
    out_dir: Path,
    step: int,
    tmp: Path,
    weights: Path,
    state: dict[str, Any],
    tokenizer_file: Path | None,
    keep_last: int,
    text_files: dict[str, str] | None,
) -> Path:
    """The trainer state, tokenizer and text files into `tmp`, the manifest last, then the rename into place."""
    final = out_dir / "checkpoints" / f"step-{step}"
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, weights / "tokenizer.json")
    torch.save(state, tmp / TRAINER_STATE)
    for name, text in (text_files or {}).items():
        (tmp / name).write_text(text)
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoint_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state after checking the directory against its manifest.

    Raises DamagedFileError naming the file that is missing, truncated or altered. Checkpoints written before
    manifests existed are read without the check; a damaged file there still fails with its name.
    """
    if (path / MANIFEST).is_file():
        verify_manifest(path)
    file = path / TRAINER_STATE
    try:
        return torch.load(file, weights_only=True)
    except FileNotFoundError:
        raise DamagedFileError(f"{file} is missing") from None
    except Exception as error:  # torch.load raises RuntimeError / UnpicklingError / EOFError on damaged zips
        raise DamagedFileError(f"{file} is unreadable ({' '.join(str(error).split())[:200]})") from None


def load_latest(out_dir: Path, warn: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint and its trainer state, or None when there is none at all.

    A damaged newer checkpoint is skipped with a warning naming it; when every checkpoint is damaged this is a
    CheckpointError listing what is wrong with each, so nothing is silently retrained from scratch.
    """
    problems = []
    for _, path in reversed(checkpoint_dirs(out_dir)):
        try:
            return path, read_trainer_state(path)
        except DamagedFileError as error:
            problems.append(str(error))
            warn(f"skipping damaged checkpoint {path.name}: {error}")
    if problems:
        raise CheckpointError(
            f"no intact checkpoint in {out_dir / 'checkpoints'} ({'; '.join(problems)}); "
            "start over with --overwrite or restore the files"
        )
    return None
