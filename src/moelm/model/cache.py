"""Preallocated KV caches: the compressed MLA latent cache and a standard GQA K/V cache.

A cache holds `capacity` slots per sequence for every layer (and MTP layer). Sequences in a batch share slot
indices (prompts are left-padded), so one integer `length` says how many slots are filled; `valid` marks which
of them hold real tokens and `next_position` is each sequence's next RoPE position. Nothing is concatenated per
step: each forward writes into its slots in place.
"""

from __future__ import annotations

import torch

from moelm.config import ModelConfig


class CacheCapacityError(ValueError):
    """A request needs more cache slots or positions than were allocated."""


class KVCache:
    """Per-layer cache tensors plus the slot bookkeeping shared by all layers.

    `latent_or_keys` holds MLA's normed latent c_KV [L, B, S, kv_lora_rank] or GQA's keys [L, B, Hkv, S, D];
    `rope_key_or_values` holds MLA's rotated shared key [L, B, S, qk_rope_head_dim] or GQA's values.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = config
        self.capacity = capacity
        self.batch_size = batch_size
        layers = config.num_hidden_layers + config.num_nextn_predict_layers
        if config.attention == "mla":
            # Only the normed latent c and the rotated shared key: kv_lora_rank + qk_rope_head_dim per token.
            self.latent_or_keys = torch.zeros(
                layers, batch_size, capacity, config.kv_lora_rank, dtype=dtype, device=device
            )
            self.rope_key_or_values = torch.zeros(
                layers, batch_size, capacity, config.qk_rope_head_dim, dtype=dtype, device=device
            )
        else:
            shape = (layers, batch_size, config.num_key_value_heads, capacity, config.gqa_head_dim)
            self.latent_or_keys = torch.zeros(shape, dtype=dtype, device=device)
            self.rope_key_or_values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_next_position = 0  # host copy of next_position.max(), kept by reserve / claim_decode_slot

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent_or_keys, rope_key_or_values, valid, next_position): what a compiled decode step reads."""
        return self.latent_or_keys, self.rope_key_or_values, self.valid, self.next_position

    @classmethod
    def from_tensors(
        cls,
        config: ModelConfig,
        latent_or_keys: torch.Tensor,
        rope_key_or_values: torch.Tensor,
        valid: torch.Tensor,
        next_position: torch.Tensor,
    ) -> KVCache:
        """A cache over existing tensors (no copy): how an exported decode step, which takes tensors only, hands
        them to `MoELM.decode_logits`. Host-side counters start empty; the step reads only the tensors."""
        cache = cls.__new__(cls)
        cache.config, cache.latent_or_keys, cache.rope_key_or_values = config, latent_or_keys, rope_key_or_values
        cache.valid, cache.next_position = valid, next_position
        cache.batch_size, cache.capacity = valid.shape
        cache.length, cache.max_next_position = 0, 0
        return cache

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all layers."""
        if self.config.attention == "mla":
            per_slot = self.latent_or_keys[:, 0, 0].numel() + self.rope_key_or_values[:, 0, 0].numel()
        else:
            per_slot = self.latent_or_keys[:, 0, :, 0].numel() + self.rope_key_or_values[:, 0, :, 0].numel()
        return per_slot * self.latent_or_keys.element_size()

    def reserve(self, token_mask_BT: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Claim slots for T new tokens; returns the first slot and the new tokens' positions [B, T]."""
        new = token_mask_BT.shape[1]
        positions = self.next_position.unsqueeze(1) + token_mask_BT.long().cumsum(1) - 1
        positions = positions.clamp(min=0)
        self._check_room(self.length + new, int(positions.max()))
        start = self.length
        self.valid[:, start : start + new] = token_mask_BT.bool()
        self.next_position += token_mask_BT.long().sum(1)
        self.max_next_position = int(self.next_position.max())
        self.length += new
        return start, positions

    def _check_room(self, slots_needed: int, highest_position: int) -> None:
        if slots_needed > self.capacity:
            raise CacheCapacityError(
                f"the request needs {slots_needed} cache slots but the cache holds {self.capacity}; "
                "allocate a larger capacity (prompt length + max_new_tokens)"
            )
        if highest_position >= self.config.max_position_embeddings:
            raise CacheCapacityError(
                f"position {highest_position} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )

    def claim_decode_slot(self) -> int:
        """Claim the next slot for one decode token per sequence (MoELM.decode_step), checking capacity and
        positions against host-side counters so no value is read back from the device."""
        self._check_room(self.length + 1, self.max_next_position)
        self.length += 1
        return self.length - 1

    def write_slot(self, slot: int, latent_or_keys_LB: torch.Tensor, rope_key_or_values_LB: torch.Tensor) -> None:
        """Store one token per sequence at `slot` for the first L layers (entries [L, B, ...]) and advance
        every sequence's position."""
        layers = latent_or_keys_LB.shape[0]
        if self.config.attention == "mla":
            self.latent_or_keys[:layers, :, slot] = latent_or_keys_LB
            self.rope_key_or_values[:layers, :, slot] = rope_key_or_values_LB
        else:
            self.latent_or_keys[:layers, :, :, slot] = latent_or_keys_LB
            self.rope_key_or_values[:layers, :, :, slot] = rope_key_or_values_LB
        self.valid[:, slot] = True
        self.next_position += 1
        self.max_next_position += 1

    def attention_mask(self, start: int, new: int) -> torch.Tensor:
        """Boolean [B, 1, new, start+new]: valid slots at or before each query's own slot (itself always)."""
        end = start + new
        query_slots = torch.arange(start, end, device=self.valid.device).unsqueeze(1)
        key_slots = torch.arange(end, device=self.valid.device).unsqueeze(0)
        allowed = (key_slots <= query_slots).unsqueeze(0) & self.valid[:, None, :end]
        allowed |= key_slots.unsqueeze(0) == query_slots.unsqueeze(0)
        return allowed.unsqueeze(1)

    def truncate(self, length: int) -> None:
        """Forget slots from `length` on (speculative decoding rejects drafted tokens this way)."""
        dropped = self.valid[:, length : self.length].long().sum(1)
        self.valid[:, length:] = False
        self.next_position -= dropped
        self.max_next_position = int(self.next_position.max())
        self.length = length
