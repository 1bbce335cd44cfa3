"""Atomic, resumable training checkpoints under OUT/checkpoints/step-N/.

Each checkpoint is written into a temporary directory and renamed into place, so a crash mid-save never leaves
a broken latest checkpoint. `model/` is an HF-compatible model directory (safetensors); `trainer.pt` holds the
optimizer state, RNG states and data position as plain tensors and containers, loadable with
`torch.load(weights_only=True)` (no pickled code).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from moelm.model.transformer import MoELM

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(
    out_dir: Path, step: int, model: MoELM, state: dict[str, Any], tokenizer_file: Path | None, keep_last: int
) -> Path:
    """Write step-N atomically, then drop all but the newest `keep_last` checkpoints."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "model" / "tokenizer.json")
    torch.save(state, tmp / "trainer.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoint_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint directory and its trainer state, or None when there is none."""
    dirs = checkpoint_dirs(out_dir)
    if not dirs:
        return None
    path = dirs[-1][1]
    return path, torch.load(path / "trainer.pt", weights_only=True)
