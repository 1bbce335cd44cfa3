"""Packing tokenised documents into fixed-length training sequences with document boundaries kept.

Documents are concatenated (each followed by EOS) and cut into rows of seq_len tokens. Alongside the tokens
each row carries a document index per position, from which the model gets position ids that restart at every
document and a block-diagonal causal mask, so attention never crosses documents and labels at a boundary (the
first token of the next document) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from moelm.constants import IGNORE_INDEX


def _packed_stream(
    token_lists: Iterable[list[int]], eos_id: int, chunk_tokens: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, document ids) in chunks of about chunk_tokens: every document followed by EOS."""
    tokens: list[int] = []
    docs: list[int] = []
    for index, ids in enumerate(token_lists):
        tokens.extend(ids)
        tokens.append(eos_id)
        docs.extend([index] * (len(ids) + 1))
        if len(tokens) >= chunk_tokens:
            yield np.asarray(tokens, dtype=np.int32), np.asarray(docs, dtype=np.int32)
            tokens, docs = [], []
    if tokens:
        yield np.asarray(tokens, dtype=np.int32), np.asarray(docs, dtype=np.int32)


def pack_documents_to_files(
    token_lists: Iterable[list[int]],
    seq_len: int,
    eos_id: int,
    tokens_path: Path,
    docs_path: Path,
    chunk_tokens: int = 1 << 20,
) -> int:
    """Token rows [N, seq_len] and document-index rows of the same shape (the ragged tail dropped), streamed to
    two .npy files in bounded memory; returns the row count.

    Tokens go to raw int32 files as they come, then are copied chunk by chunk into [rows, seq_len] .npy arrays
    (memory-mapped on both sides), so corpora larger than memory pack without holding them.
    """
    raw = [tokens_path.with_suffix(".raw"), docs_path.with_suffix(".raw")]
    with open(raw[0], "wb") as token_file, open(raw[1], "wb") as doc_file:
        for tokens, docs in _packed_stream(token_lists, eos_id, chunk_tokens):
            tokens.tofile(token_file)
            docs.tofile(doc_file)
    total = raw[0].stat().st_size // 4
    rows = total // seq_len
    if rows == 0:
        for path in raw:
            path.unlink()
        raise ValueError(f"corpus has {total} tokens: not enough for one sequence of {seq_len}")
    step = max(1, chunk_tokens // seq_len)
    for source, target in zip(raw, (tokens_path, docs_path), strict=True):
        flat = np.memmap(source, dtype=np.int32, mode="r", shape=(total,))
        out = np.lib.format.open_memmap(target, mode="w+", dtype=np.int32, shape=(rows, seq_len))
        for first in range(0, rows, step):
            last = min(rows, first + step)
            out[first:last] = flat[first * seq_len : last * seq_len].reshape(-1, seq_len)
        out.flush()
        del flat, out
        source.unlink()
    return rows


def batch_inputs(tokens: np.ndarray, docs: np.ndarray) -> dict[str, torch.Tensor]:
    """Model inputs for packed rows: ids, labels (boundary-masked), per-document positions and the document of
    each position (the model builds the block-diagonal mask on its device: a [B, T] row of ids travels and is
    cut per rank, where a [B, T, T] mask would be T times larger)."""
    input_ids = torch.from_numpy(np.array(tokens, dtype=np.int64))  # copies rows out of a memory map
    doc_in = torch.from_numpy(np.array(docs, dtype=np.int64))
    labels = input_ids.clone()  # HF convention: the model shifts, logits[t] predicts labels[t + 1]
    # labels[t] is predicted from position t-1; a label that starts a new document has nothing to predict from.
    starts = torch.zeros_like(doc_in, dtype=torch.bool)
    starts[:, 1:] = doc_in[:, 1:] != doc_in[:, :-1]
    labels[starts] = IGNORE_INDEX
    # Position = distance to the latest document start in the row (the row's first token counts as one).
    index = torch.arange(input_ids.shape[1]).expand_as(doc_in)
    first_of_doc = torch.where(starts, index, 0).cummax(dim=1).values
    position_ids = index - first_of_doc
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": doc_in}
