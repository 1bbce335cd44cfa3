"""Curriculum learning and task mixtures: which example the fine-tuning trainer sees at each draw.

A pacing function g(p) gives the fraction of each task's pool, sorted easiest first, that is unlocked at
training progress p in [0, 1] (Platanios et al. 2019's competence; Bengio et al. 2009's easy-to-hard order).
Every draw first picks a task by the mixture weights, then an example uniformly from that task's unlocked
prefix. `anti=True` sorts hardest first (the ablation). Draws are a pure function of (seed, draw index,
progress), so a resumed run sees exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moelm.config import ConfigError

PACINGS = ("none", "linear", "root", "step")


def pacing_fraction(name: str, progress: float, start: float = 0.2, full_at: float = 0.8, steps: int = 4) -> float:
    """Unlocked fraction g(p): `start` at p=0, all of the data from p >= full_at.

    linear: straight line; root: sqrt interpolation of g² (fast early unlocking, Platanios et al.); step:
    `steps` equal buckets opened one after another; none: everything from the start (the baseline).
    """
    if name not in PACINGS:
        raise ConfigError(f"invalid pacing {name!r}: allowed {list(PACINGS)}")
    if name == "none":
        return 1.0
    t = min(max(progress, 0.0) / full_at, 1.0) if full_at > 0 else 1.0
    if name == "linear":
        return min(1.0, start + (1 - start) * t)
    if name == "root":
        return min(1.0, math.sqrt(start**2 + (1 - start**2) * t))
    opened = min(steps, math.floor(t * steps) + 1)
    return max(start, opened / steps)


def mixture_probabilities(
    sizes: dict[str, int], weights: dict[str, float] | None = None, temperature: float = 1.0
) -> dict[str, float]:
    """Task sampling probabilities: explicit weights, or temperature sampling by size (p ∝ n^(1/T)).

    T = 1 samples in proportion to size; larger T flattens toward uniform (the T5 / mT5 convention).
    """
    if weights:
        unknown = sorted(set(weights) - set(sizes))
        if unknown:
            raise ConfigError(f"mixture weights name unknown task(s) {unknown}; tasks: {sorted(sizes)}")
        raw = {task: float(weights.get(task, 0.0)) for task in sizes}
    else:
        if temperature <= 0:
            raise ConfigError(f"invalid mixture temperature {temperature}: must be > 0")
        raw = {task: size ** (1.0 / temperature) for task, size in sizes.items()}
    total = sum(raw.values())
    if total <= 0 or any(value < 0 for value in raw.values()):
        raise ConfigError(f"mixture weights must be non-negative with a positive sum, got {raw}")
    return {task: value / total for task, value in raw.items()}


@dataclass
class CurriculumSampler:
    """Draws example indices by task mixture and curriculum pacing."""

    difficulties: Sequence[float]
    tasks: Sequence[str]
    pacing: str = "none"
    start: float = 0.2
    full_at: float = 0.8
    steps: int = 4
    anti: bool = False
    weights: dict[str, float] | None = None
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.difficulties) != len(self.tasks) or not self.tasks:
            raise ValueError("a curriculum needs one difficulty and one task per example, and at least one example")
        pacing_fraction(self.pacing, 0.0)  # validates the name
        rng = np.random.default_rng(self.seed)
        tie_break = rng.permutation(len(self.tasks))  # equal difficulties in a seeded random order
        self.pools: dict[str, np.ndarray] = {}
        for task in sorted(set(self.tasks)):
            members = np.array([i for i, t in enumerate(self.tasks) if t == task])
            difficulty = np.asarray(self.difficulties, dtype=np.float64)[members]
            order = np.lexsort((tie_break[members], -difficulty if self.anti else difficulty))
            self.pools[task] = members[order]
        self.probabilities = mixture_probabilities(
            {task: len(pool) for task, pool in self.pools.items()}, self.weights, self.temperature
        )
        self._task_names = list(self.probabilities)
        self._task_p = np.array([self.probabilities[t] for t in self._task_names])

    def unlocked_fraction(self, progress: float) -> float:
        return pacing_fraction(self.pacing, progress, self.start, self.full_at, self.steps)

    def draw(self, index: int, progress: float) -> int:
        """The example for draw number `index` at training progress `progress`."""
        rng = np.random.default_rng([self.seed, index])
        task = self._task_names[rng.choice(len(self._task_names), p=self._task_p)]
        pool = self.pools[task]
        unlocked = max(1, math.ceil(self.unlocked_fraction(progress) * len(pool)))
        return int(pool[rng.integers(unlocked)])
