"""Packing tokenised documents into fixed-length training sequences with document boundaries kept.

Documents are concatenated (each followed by EOS) and cut into rows of seq_len tokens. Alongside the tokens
each row carries a document index per position, from which the model gets position ids that restart at every
document and a block-diagonal causal mask, so attention never crosses documents and labels at a boundary (the
first token of the next document) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from moelm.model.transformer import IGNORE_INDEX


def pack_documents(token_lists: Iterable[list[int]], seq_len: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows [N, seq_len] and document-index rows of the same shape (dropping the ragged tail)."""
    tokens: list[int] = []
    docs: list[int] = []
    for index, ids in enumerate(token_lists):
        tokens.extend(ids)
        tokens.append(eos_id)
        docs.extend([index] * (len(ids) + 1))
    width = seq_len
    rows = len(tokens) // width
    if rows == 0:
        raise ValueError(f"corpus has {len(tokens)} tokens: not enough for one sequence of {width}")
    token_array = np.asarray(tokens[: rows * width], dtype=np.int64).reshape(rows, width)
    doc_array = np.asarray(docs[: rows * width], dtype=np.int64).reshape(rows, width)
    return token_array, doc_array


def batch_inputs(tokens: np.ndarray, docs: np.ndarray) -> dict[str, torch.Tensor]:
    """Model inputs for packed rows: ids, labels (boundary-masked), per-document positions, block mask."""
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
    same_doc = doc_in.unsqueeze(2) == doc_in.unsqueeze(1)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": same_doc}
