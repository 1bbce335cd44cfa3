"""moelm: DeepSeek-style Mixture-of-Experts language models in plain PyTorch.

The model classes are imported on first use, so `moelm --help`, `--version` and argument errors answer without
loading torch (seconds on a busy machine).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# MKL's conditional numerical reproducibility: without it, MKL may pick kernels by the memory alignment of the
# operands, so two processes (a straight run and one resumed from a bit-identical checkpoint) can differ in the
# last bits. Set before torch loads MKL; a value the user exported wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "ModelConfig",
    "MoEOptions",
    "MoELM",
    "MoELMOutput",
    "Recipe",
    "Routing",
    "load_config",
    "load_recipe",
    "__version__",
]

_LAZY = {
    "ConfigError": "moelm.config",
    "ModelConfig": "moelm.config",
    "MoEOptions": "moelm.config",
    "load_config": "moelm.config",
    "Recipe": "moelm.train.recipe",
    "load_recipe": "moelm.train.recipe",
    "MoELM": "moelm.model",
    "MoELMOutput": "moelm.model",
    "Routing": "moelm.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moelm' has no attribute {name!r}")
