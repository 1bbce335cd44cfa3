"""Prefix caching: a prompt's leading blocks of tokens are prefilled once and their cache entries reused.

Few-shot evaluation prompts share their examples, chat requests share a system prompt, GRPO's G completions
of a prompt share all of it. A cache entry at position p depends only on tokens 0..p, so the entries of a
block of `block_size` tokens are named by a hash chained over every block up to it (as vLLM names its blocks)
and stored once; a request whose prompt starts with stored blocks copies their entries into its row and
prefills only the rest. Stored blocks are evicted least recently used first when their bytes would pass
`max_bytes`; a block is looked up by its whole chain, so an evicted block (or one whose predecessor was
evicted) is simply a miss, never a wrong read. The engine (moelm.infer.engine) does the lookups and stores.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moelm.infer.rows import slot_index
from moelm.model.cache import KVCache


@dataclass
class PrefixCacheStats:
    """Prompt tokens the engine asked about and how many were found cached (vLLM's prefix-cache hit rate)."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    """Cache entries of full prompt blocks, keyed by the chained hash of the tokens up to each block's end."""

    def __init__(self, block_size: int = 16, max_bytes: int = 256 * 2**20) -> None:
        if block_size < 1:
            raise ValueError(f"invalid prefix block_size={block_size}: must be at least 1")
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.stats = PrefixCacheStats()
        self._chains: dict[tuple[int, ...], list[bytes]] = {}

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        """The chained key of every full block of `tokens` (remembered for the last few token lists: one
        admission looks a prompt up, and stores it, with the same chain)."""
        memo = tuple(tokens)
        chain = self._chains.get(memo)
        if chain is None:
            chain, previous = [], b""
            for end in range(self.block_size, len(tokens) + 1, self.block_size):
                block = ",".join(map(str, tokens[end - self.block_size : end])).encode()
                previous = hashlib.blake2b(previous + b"|" + block, digest_size=16).digest()
                chain.append(previous)
            self._chains[memo] = chain
            if len(self._chains) > 1024:
                self._chains.pop(next(iter(self._chains)))
        return chain

    def _usable(self, prompt: Sequence[int]) -> list[bytes]:
        """The keys of the blocks a prompt may take from the store: all but its last token stay computable."""
        return self.keys(prompt)[: (len(prompt) - 1) // self.block_size]

    def shared_prefixes(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Block-aligned leading parts that two or more of `prompts` share and that are not stored yet, longest
        first, none inside another: prefilled once, they turn the prompts' own lookups into hits (a batch of
        few-shot prompts arrives together, before anything is stored)."""
        chains = [self._usable(p) for p in prompts]
        seen: dict[bytes, int] = {}
        for chain in chains:
            for key in chain:
                seen[key] = seen.get(key, 0) + 1
        candidates = []
        for prompt, chain in zip(prompts, chains, strict=True):
            shared = 0
            while shared < len(chain) and (seen[chain[shared]] > 1 or chain[shared] in self.blocks):
                shared += 1
            if shared and chain[shared - 1] not in self.blocks:
                candidates.append((chain[:shared], list(prompt[: shared * self.block_size])))
        chosen, covered = [], set()
        for chain, tokens in sorted(candidates, key=lambda c: -len(c[0])):
            if chain[-1] not in covered:
                chosen.append(tokens)
                covered.update(chain)
        return chosen

    def lookup(self, prompt: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stored entries of the prompt's leading blocks, leaving at least its last token to prefill (its
        logits pick the first new token)."""
        found = []
        for key in self._usable(prompt):
            entries = self.blocks.get(key)
            if entries is None:
                break
            self.blocks.move_to_end(key)
            found.append(entries)
        self.stats.queried_tokens += len(prompt)
        self.stats.hit_tokens += len(found) * self.block_size
        return found

    def store(self, prompt: Sequence[int], cache: KVCache, row: int) -> None:
        """Keep the entries of the prompt's full blocks from `cache` row `row`, whose valid slots hold exactly the
        prompt's tokens in order (a prefill's scratch cache)."""
        slots = cache.valid[row].nonzero().squeeze(1)
        for index, key in enumerate(self.keys(prompt)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            block = slots[index * self.block_size : (index + 1) * self.block_size]
            where = slot_index(cache, row, block)
            entries = (cache.latent_or_keys[where].clone(), cache.rope_key_or_values[where].clone())
            size = sum(t.numel() * t.element_size() for t in entries)
            if size > self.max_bytes:
                return
            while self.bytes + size > self.max_bytes:
                _, evicted = self.blocks.popitem(last=False)
                self.bytes -= sum(t.numel() * t.element_size() for t in evicted)
                self.stats.evicted_blocks += 1
            self.blocks[key] = entries
            self.bytes += size
            self.stats.stored_blocks += 1
