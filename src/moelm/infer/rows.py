"""Row bookkeeping of a continuous batch over one KV cache: which cache row holds which request, and moving rows.

A running batch keeps its requests in rows 0..n-1 of the cache. Rows share slot indices, so a joining prompt's
entries are placed to end at the batch's shared length; a finished row is freed by moving the last running row
into it; when the slots run out the rows are compacted (each row's real tokens shifted together). Decode
attends through the validity mask and keys carry their RoPE positions, so slot order within a row does not
matter. These are the engine's operations on a `KVCache`; the cache itself only stores and appends.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moelm.model.cache import CacheCapacityError, KVCache


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths -> left-padded ids [B, T] and attention mask [B, T]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _slot_dim(cache: KVCache) -> int:
    """Where the slot axis sits in the two cache tensors: [L, B, S, ...] for MLA, [L, B, H, S, D] for GQA."""
    return 2 if cache.config.attention == "mla" else 3


def slot_index(cache: KVCache, rows: int | slice | torch.Tensor, slots: slice | torch.Tensor) -> tuple:
    """Index selecting (rows, slots) of either cache tensor, whatever the layout."""
    return (slice(None), rows, *[slice(None)] * (_slot_dim(cache) - 2), slots)


def view(cache: KVCache, rows: int, slots: int) -> KVCache:
    """A cache over the first `rows` rows and `slots` slots, sharing storage (no copy): eager decode steps run
    on it so attention reads only the slots in use, and its writes land in `cache`."""
    index = slot_index(cache, slice(0, rows), slice(0, slots))
    part = KVCache.from_tensors(
        cache.config,
        cache.latent_or_keys[index],
        cache.rope_key_or_values[index],
        cache.valid[:rows, :slots],
        cache.next_position[:rows],
    )
    part.length = cache.length
    part.max_next_position = int(cache.next_position[:rows].max()) if rows else 0
    return part


def place_rows(
    cache: KVCache, source: KVCache, rows: list[int], end: int, source_rows: list[int] | None = None
) -> None:
    """Copy rows of `source` (a prefill's cache; `source_rows`, default all of them in order) into `rows` of
    `cache`, their slots ending at slot `end`; earlier slots of those rows become invalid and `length` grows to
    at least `end`. A source row may be placed more than once (requests with the same prompt)."""
    width = source.length
    if end > cache.capacity or width > end:
        raise CacheCapacityError(f"cannot place {width} slots ending at {end} in a cache of {cache.capacity}")
    device = cache.valid.device
    row_index = torch.tensor(rows, device=device)
    chosen = torch.arange(len(rows), device=device) if source_rows is None else torch.tensor(source_rows, device=device)
    target = slot_index(cache, row_index, slice(end - width, end))
    used = slot_index(source, chosen, slice(0, width))
    cache.latent_or_keys[target] = source.latent_or_keys[used]
    cache.rope_key_or_values[target] = source.rope_key_or_values[used]
    cache.valid[row_index] = False
    cache.valid[row_index, end - width : end] = source.valid[chosen, :width]
    cache.next_position[row_index] = source.next_position[chosen]
    cache.length = max(cache.length, end)


def fill_prefix(cache: KVCache, row: int, blocks: list[tuple[torch.Tensor, torch.Tensor]], end: int) -> None:
    """Write stored prefix entries (moelm.infer.prefix_cache) into `row`, ending at slot `end`, as that row's
    first tokens (positions from 0)."""
    if not blocks:
        return
    axis = _slot_dim(cache) - 1  # the slot axis once the row axis is indexed away
    first = torch.cat([block[0] for block in blocks], dim=axis)
    second = torch.cat([block[1] for block in blocks], dim=axis)
    count = first.shape[axis]
    cache.latent_or_keys[slot_index(cache, row, slice(end - count, end))] = first
    cache.rope_key_or_values[slot_index(cache, row, slice(end - count, end))] = second
    cache.valid[row, end - count : end] = True
    cache.next_position[row] = count


def move_row(cache: KVCache, source: int, target: int) -> None:
    """Copy row `source` (slots in use, validity, position) over row `target`."""
    used = slice(0, cache.length)
    for tensor in (cache.latent_or_keys, cache.rope_key_or_values):
        tensor[slot_index(cache, target, used)] = tensor[slot_index(cache, source, used)]
    cache.valid[target] = cache.valid[source]
    cache.next_position[target] = cache.next_position[source]


def clear_row(cache: KVCache, row: int) -> None:
    """An idle row: no valid slot, position 0 (a compiled step that still computes it stays in range)."""
    cache.valid[row] = False
    cache.next_position[row] = 0


def compact(cache: KVCache, rows: int) -> None:
    """Shift each of the first `rows` rows' valid slots to the right end of the shortest prefix that holds them
    all, so `length` becomes the longest row's count of real tokens."""
    counts = cache.valid[:rows].sum(1)
    new_length = int(counts.max()) if rows else 0
    for row in range(rows):
        kept = cache.valid[row].nonzero().squeeze(1)
        target = torch.arange(new_length - len(kept), new_length, device=cache.valid.device)
        for tensor in (cache.latent_or_keys, cache.rope_key_or_values):
            moved = tensor[slot_index(cache, row, kept)].clone()
            tensor[slot_index(cache, row, target)] = moved
        cache.valid[row] = False
        cache.valid[row, target] = True
    cache.valid[rows:] = False
    cache.next_position[rows:] = 0
    cache.length = new_length


def resized(cache: KVCache, rows: int, capacity: int) -> KVCache:
    """A new contiguous cache of `rows` x `capacity` holding the first min(rows) rows' used slots of `cache`
    (a compiled step takes fixed, contiguous shapes, so a batch that outgrows its bucket moves to a new one)."""
    if cache.length > capacity:
        raise CacheCapacityError(f"{cache.length} slots in use do not fit a cache of {capacity}")
    grown = KVCache(cache.config, rows, capacity, dtype=cache.latent_or_keys.dtype, device=cache.latent_or_keys.device)
    kept = min(rows, cache.batch_size)
    used = slice(0, cache.length)
    for new, old in (
        (grown.latent_or_keys, cache.latent_or_keys),
        (grown.rope_key_or_values, cache.rope_key_or_values),
    ):
        new[slot_index(cache, slice(0, kept), used)] = old[slot_index(cache, slice(0, kept), used)]
    grown.valid[:kept, used] = cache.valid[:kept, used]
    grown.next_position[:kept] = cache.next_position[:kept]
    grown.length = cache.length
    grown.max_next_position = int(grown.next_position.max()) if rows else 0
    return grown
