"""Fill-in-the-middle (DeepSeek-Coder's PSM variant): teach a left-to-right decoder to infill.

At `rate`, a document is cut at two random character positions into prefix, middle and suffix and rewritten
as <|fim_begin|>prefix<|fim_hole|>suffix<|fim_end|>middle, so predicting the tail of the sequence means
filling the hole from both sides; the rest of the documents stay plain next-token text.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from moelm.data.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE


def to_fim(text: str, rng: random.Random) -> str:
    """One document in prefix-suffix-middle order, cut at two uniformly random positions."""
    first, second = sorted(rng.randint(0, len(text)) for _ in range(2))
    prefix, middle, suffix = text[:first], text[first:second], text[second:]
    return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}{middle}"


def apply_fim(documents: Iterable[str], rate: float, seed: int = 0) -> Iterator[str]:
    """Rewrite each document as FIM with probability `rate` (deterministic for a seed)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"invalid fim_rate={rate!r}: must be in [0, 1] (0.1 is DeepSeek's choice)")
    rng = random.Random(seed)
    for text in documents:
        yield to_fim(text, rng) if rate and rng.random() < rate else text
