"""Provenance: what produced a checkpoint or a model (`run.json`), and which recipe changes a resume may make.

Every checkpoint, the final model and every export carry `run.json`: the resolved recipe, the moelm version and
git commit (when the package runs from a checkout), torch and Python versions, the world layout and the seeds,
plus the history of recipe changes made on resume. `--resume` compares the recipe it is given with the one the
checkpoint records: keys that cannot change the weights' trajectory (the step budget, logging, evaluation and
saving cadence, the device and the parallel layout) may change and are printed; any other change is refused,
naming each key with both values, unless the caller allows it, in which case it is recorded.
"""

from __future__ import annotations

import datetime
import functools
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from moelm.config import RUN_OPTION_FIELDS, ConfigError

RUN_FILE = "run.json"
# Keys a resumed run may change: they decide how long, how often and where, never what is computed per step.
RESUMABLE_PREFIXES = ("parallel.", "log.")
RESUMABLE_KEYS = (
    "train.max_steps",
    "train.save_every",
    "train.keep_last",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.device",
    "train.reuse_freed_memory",
)


@functools.cache
def git_commit(start: Path | None = None) -> str | None:
    """The commit of the checkout moelm runs from (None for an installed wheel or without git)."""
    start = start or Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def run_record(recipe_dict: dict[str, Any], world: dict[str, Any], changes: list[dict[str, Any]]) -> dict[str, Any]:
    """The run.json document for a recipe (as `Recipe.to_dict()`), the process layout and the change history."""
    import torch

    from moelm import __version__

    return {
        "recipe": recipe_dict,
        "moelm_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "world": world,
        "seeds": {"train.seed": recipe_dict.get("train", {}).get("seed")},
        "recipe_changes": changes,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def read_run_record(directory: Path) -> dict[str, Any] | None:
    """A directory's run.json, or None when it has none (written before provenance existed)."""
    path = directory / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("recipe"), dict):
        raise ConfigError(f"{path}: not a moelm run record (no recipe)")
    return record


def upgrade_recorded_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe recorded by an older moelm, in today's layout: run settings move from model to moe, and
    source lists gain their defaults so that equal recipes compare equal."""
    from moelm.train.recipe import recipe_from_dict

    recipe = json.loads(json.dumps(recipe))  # a deep copy
    model = recipe.get("model")
    if isinstance(model, dict):
        moved = {k: model.pop(k) for k in list(model) if k in RUN_OPTION_FIELDS}
        if moved:
            recipe["moe"] = {**moved, **(recipe.get("moe") or {})}
    return recipe_from_dict(recipe).to_dict()


def flatten(recipe: dict[str, Any]) -> dict[str, Any]:
    """section.key -> value for a recipe mapping (values that are lists or mappings are kept whole)."""
    flat: dict[str, Any] = {}
    for section, values in recipe.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def recipe_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, current value) for every key whose value differs, sorted by key."""
    old, new = flatten(recorded), flatten(current)
    return sorted((k, old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k))


def resumable(key: str) -> bool:
    return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_PREFIXES)


def check_resume(
    recorded: dict[str, Any], current: dict[str, Any], allow_change: bool, source: str
) -> list[tuple[str, Any, Any]]:
    """The differences a resume may proceed with; a one-line ConfigError naming the others (with both values)
    unless `allow_change`. `source` names where the recorded recipe came from."""
    differences = recipe_differences(recorded, current)
    refused = [d for d in differences if not resumable(d[0])]
    if refused and not allow_change:
        shown = "; ".join(f"{key}: {old!r} recorded, {new!r} now" for key, old, new in refused)
        raise ConfigError(
            f"--resume would change the recipe this run was trained with ({shown}; recorded in {source}); "
            "restore those values, start a new run, or pass --allow-recipe-change to proceed and record it"
        )
    return differences
