"""moelm: DeepSeek-style Mixture-of-Experts language models in plain PyTorch.

The model classes are imported on first use, so `moelm --help`, `--version` and argument errors answer without
loading torch (seconds on a busy machine).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# MKL's conditional numerical reproducibility, AUTO: results independent of operand alignment at no measured
# cost. It does not make two processes agree bit for bit on this project's CPUs: measured under load, two fresh
# identical training runs differed in the last bits after one step in 3 of 10 pairs with AUTO (also AUTO,STRICT
# and AVX512) and 0 of 10 with COMPATIBLE, which costs about 4x on GEMMs. Export MKL_CBWR=COMPATIBLE for runs that
# must resume bit for bit across processes (README, "Pre-training"). Set before torch loads MKL; an exported
# value wins.
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
