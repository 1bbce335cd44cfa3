"""Pre-training batches: documents tokenised and packed once into a content-keyed cache, then served in a
seeded per-epoch order that is a pure function of the batch index (so a resume at any index sees the same data).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from moelm.data.fim import apply_fim
from moelm.data.packing import batch_inputs, pack_documents_to_files
from moelm.data.sources import DataError, iter_documents
from moelm.data.tokenizer import EOS, special_id

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclass(frozen=True)
class CorpusSpec:
    """Where the text comes from and how it is cut: everything the packed arrays depend on besides the tokenizer."""

    source: str  # 'builtin', a .jsonl file, a .txt file or a folder of .txt files
    text_field: str
    builtin_records: int
    seq_len: int
    fim_rate: float
    seed: int

    def documents(self) -> Iterator[str]:
        docs = iter_documents(self.source, self.text_field, self.builtin_records, self.seed)
        return apply_fim(docs, self.fim_rate, self.seed)

    def cache_key(self, tokenizer: Tokenizer) -> str:
        """A digest of the source (and its size and mtime), the packing options and the tokenizer."""
        source = Path(self.source)
        stamp = [source.stat().st_size, source.stat().st_mtime_ns] if source.is_file() else None
        parts = [self.source, stamp, self.text_field, self.builtin_records, self.seq_len, self.fim_rate]
        parts += [self.seed, tokenizer.to_str()]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


@dataclass
class PackedBatches:
    """Tokenised, packed train and validation rows, served in a seeded per-epoch order."""

    train_tokens: np.ndarray
    train_docs: np.ndarray
    val_tokens: np.ndarray
    val_docs: np.ndarray
    batch_size: int
    seed: int
    eval_batches: int
    _order: tuple[tuple[int, int], np.ndarray] | None = field(default=None, repr=False)

    def train_batch(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        rows = self.batch_rows(index * self.batch_size, self.batch_size)
        tokens = self.train_tokens[rows]
        return batch_inputs(tokens, self.train_docs[rows]), {"tokens": float(tokens.size)}

    def batch_rows(self, cursor: int, count: int) -> np.ndarray:
        """Row indices for samples cursor..cursor+count: a fresh seeded permutation every epoch."""
        n_rows = len(self.train_tokens)
        rows = []
        for sample in range(cursor, cursor + count):
            epoch, offset = divmod(sample, n_rows)
            rows.append(self._epoch_order(epoch, n_rows)[offset])
        return np.asarray(rows)

    def _epoch_order(self, epoch: int, n_rows: int) -> np.ndarray:
        """The epoch's row permutation, drawn once (a function of seed and epoch only, so resume-safe)."""
        if self._order is None or self._order[0] != (epoch, n_rows):
            order = np.random.default_rng(self.seed * 1_000_003 + epoch).permutation(n_rows)
            self._order = ((epoch, n_rows), order)
        return self._order[1]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out LM loss and perplexity over the validation rows (or a few batches of them)."""
        if len(self.val_tokens) == 0:
            return {}
        losses = []
        size = self.batch_size
        for first in range(0, min(len(self.val_tokens), size * self.eval_batches), size):
            rows = slice(first, first + size)
            losses.append(model(**batch_inputs(self.val_tokens[rows], self.val_docs[rows])).lm_loss.item())
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def packed_batches(
    corpus: CorpusSpec,
    tokenizer: Tokenizer,
    cache_dir: Path,
    val_fraction: float,
    batch_size: int,
    eval_batches: int,
) -> PackedBatches:
    """Tokenise and pack once into `cache_dir` (memory-mapped .npy); later runs and resumes reuse it."""
    key = corpus.cache_key(tokenizer)
    tokens_file, docs_file = cache_dir / f"{key}-tokens.npy", cache_dir / f"{key}-docs.npy"
    if not (tokens_file.is_file() and docs_file.is_file()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp_tokens, tmp_docs = tokens_file.with_suffix(".tmp.npy"), docs_file.with_suffix(".tmp.npy")
        _tokenise_and_pack(corpus, tokenizer, tmp_tokens, tmp_docs)
        tmp_docs.replace(docs_file)
        tmp_tokens.replace(tokens_file)
    tokens, doc_ids = np.load(tokens_file, mmap_mode="r"), np.load(docs_file, mmap_mode="r")
    n_val = int(len(tokens) * val_fraction)
    split = len(tokens) - n_val
    if split < batch_size:
        raise DataError(
            f"data source {corpus.source!r} packs into {split} training sequences of "
            f"{corpus.seq_len} tokens, fewer than train.batch_size={batch_size}"
        )
    return PackedBatches(
        tokens[:split], doc_ids[:split], tokens[split:], doc_ids[split:], batch_size, corpus.seed, eval_batches
    )


def _tokenise_and_pack(corpus: CorpusSpec, tokenizer: Tokenizer, tokens_file: Path, docs_file: Path) -> None:
    """Stream documents through the tokenizer in chunks and pack them to disk: memory stays bounded."""
    docs = corpus.documents()

    def encoded() -> Iterator[list[int]]:
        while chunk := list(itertools.islice(docs, 1024)):
            yield from (enc.ids for enc in tokenizer.encode_batch(chunk))

    try:
        pack_documents_to_files(encoded(), corpus.seq_len, special_id(tokenizer, EOS), tokens_file, docs_file)
    except ValueError as error:
        raise DataError(f"data source {corpus.source!r}: {error}") from None
