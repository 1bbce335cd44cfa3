"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) and grouped-query attention as the cheap option.

Both take hidden states [B, T, H], cos/sin for the positions, and an optional boolean mask [B, 1, T, T]
(True = may attend), or a `DocumentMask` (packed documents, run by flex_attention's block-sparse kernel, which
skips the blocks no query of a document sees). Without a mask they use the causal fast path of
`scaled_dot_product_attention`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from moelm.config import ModelConfig
from moelm.model.cache import KVCache
from moelm.model.kernels.cpu import weight_product
from moelm.model.layers import Linear, RMSNorm, apply_rope, softmax_scale


class DocumentMask:
    """Causal attention inside each packed document, for flex_attention: the document ids per position and the
    BlockMask built from them, once per length and shared by every layer of a forward (MTP layers see a prefix).
    torch 2.13's flex_attention has no CPU backward, so training selects it on CUDA only (train.attention)."""

    def __init__(self, document_ids_BT: torch.Tensor) -> None:
        self.document_ids = document_ids_BT
        self._blocks: dict[int, object] = {}

    def prefix(self, length: int) -> DocumentMask:
        """The mask of the first `length` positions (queries and keys)."""
        if length == self.document_ids.shape[1]:
            return self
        return DocumentMask(self.document_ids[:, :length])

    def block_mask(self):  # noqa: ANN201 - torch's BlockMask
        from torch.nn.attention.flex_attention import create_block_mask

        batch, length = self.document_ids.shape
        if length not in self._blocks:
            ids = self.document_ids

            def same_document_causal(b, h, q, kv):  # noqa: ANN001, ANN202 - flex's mask_mod signature
                return (q >= kv) & (ids[b, q] == ids[b, kv])

            # Compiled on CUDA (as torchtitan builds it): the eager builder materialises the whole [B, T, T] mask.
            self._blocks[length] = create_block_mask(
                same_document_causal, batch, None, length, length, device=ids.device, _compile=ids.is_cuda
            )
        return self._blocks[length]


@functools.cache
def _flex_attention(compiled: bool):  # noqa: ANN202 - flex_attention, compiled or not
    """flex_attention compiled into its fused kernel (on CUDA; eager it materialises every score), or the eager
    reference (the CPU forward the tests compare against SDPA)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def attend(
    q_BNTd: torch.Tensor,
    k_BnTd: torch.Tensor,
    v_BnTe: torch.Tensor,
    mask: torch.Tensor | DocumentMask | None,
    scale: float,
) -> torch.Tensor:
    """Scaled dot-product attention, causal when no explicit mask is given.

    MLA's value width (v_head_dim) is narrower than its query/key width; the fused (flash) kernels want equal
    widths, so values are zero-padded and the padding sliced off: several times faster on CPU than the unfused
    math path that mismatched widths fall back to (benchmarks/probes/attention_padding.py).
    """
    if isinstance(mask, DocumentMask):  # flex_attention takes a narrower value width as it is
        grouped = k_BnTd.shape[1] != q_BNTd.shape[1]
        return _flex_attention(q_BNTd.is_cuda)(
            q_BNTd, k_BnTd, v_BnTe, block_mask=mask.block_mask(), scale=scale, enable_gqa=grouped
        )
    value_dim = v_BnTe.shape[-1]
    if value_dim != q_BNTd.shape[-1]:
        v_BnTe = F.pad(v_BnTe, (0, q_BNTd.shape[-1] - value_dim))
    if mask is None:
        # Same lengths: causal. A lone decode query over a cache sees every key (callers mask otherwise).
        causal = q_BNTd.shape[-2] == k_BnTd.shape[-2]
        out = F.scaled_dot_product_attention(q_BNTd, k_BnTd, v_BnTe, is_causal=causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q_BNTd, k_BnTd, v_BnTe, attn_mask=mask, scale=scale)
    return out[..., :value_dim]


class MultiHeadLatentAttention(nn.Module):
    """MLA: keys and values come from a low-rank latent c (kv_lora_rank) plus one shared rotary key.

    Training and prefill expand the latent into per-head K/V (kv_b_proj) and run ordinary attention; the
    weight-absorbed decode over the latent cache lives with the inference engine.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        qk_head_dim = config.qk_head_dim
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = Linear(config.hidden_size, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=bias)
        self.scale = softmax_scale(config, qk_head_dim)

    def project_query(self, x_BTH: torch.Tensor) -> torch.Tensor:
        """Per-head queries [B, T, h, qk_nope + qk_rope] (through the q LoRA when configured)."""
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTH)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTH)))
        return q.unflatten(-1, (self.num_heads, -1))

    def project_latent(self, x_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cacheable part of a token: normed latent c [B, T, r] and the un-rotated shared key [B, T, d_rope]."""
        latent, k_pe = self.kv_a_proj_with_mqa(x_BTH).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_pe

    def forward(
        self,
        x_BTH: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """Attention over this call's tokens, or (with a cache) over every cached token too.

        With a cache the latent and rotated shared key are written to their slots; a first prefill then runs
        the expanded path, later calls the absorbed one (absorb=True/False forces either, for tests).
        """
        q = self.project_query(x_BTH)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.project_latent(x_BTH)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)
        if cache is not None:
            end = start + x_BTH.shape[1]
            cache.latent_or_keys[layer, :, start:end] = latent
            cache.rope_key_or_values[layer, :, start:end] = k_pe.squeeze(2)
            if absorb or (absorb is None and start > 0):
                return self._absorbed(
                    q_nope, q_pe, cache.latent_or_keys[layer, :, :end], cache.rope_key_or_values[layer, :, :end], mask
                )
            latent = cache.latent_or_keys[layer, :, :end]
            k_pe = cache.rope_key_or_values[layer, :, :end].unsqueeze(2)
        return self._expanded(q_nope, q_pe, latent, k_pe, mask)

    def decode(
        self,
        x_B1H: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        latent_BSC: torch.Tensor,
        k_pe_BSr: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One token per sequence against a read-only cache: the output and this token's cache entries.

        Pure and fixed-shape (the whole capacity is scored, `mask` [B, 1, 1, S] hiding unwritten slots; the
        token's own key is scored beside the cache), so torch.compile captures it once for every step; the
        caller writes the returned entries into the cache (MoELM.decode_step)."""
        q = self.project_query(x_B1H)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.project_latent(x_B1H)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        out = self._absorbed(q_nope, q_pe, latent_BSC, k_pe_BSr, mask, own=(latent, k_pe))
        return out, (latent.squeeze(1), k_pe.squeeze(1))

    def _expanded(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-head K/V from the latent (kv_b_proj), then ordinary attention: the training/prefill path."""
        kv = self.kv_b_proj(latent).unflatten(-1, (self.num_heads, -1))
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, -1, self.num_heads, -1)), dim=-1)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def _absorbed(
        self,
        q_nope_BTNd: torch.Tensor,
        q_pe_BTNr: torch.Tensor,
        latent_BSC: torch.Tensor,
        k_pe_BSr: torch.Tensor,
        mask: torch.Tensor | None,
        own: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Weight-absorbed attention over the latent cache (references §3): W_UK folds into the query and
        W_UV into the output, so K/V are never expanded: scores = (q_nope W_UK) c^T + q_pe k_pe^T.

        own: a single query's own (latent [B, 1, R], rotated key [B, 1, r]) when they are not in the cache
        yet; scored as one extra, always visible, key."""
        w_b = self.kv_b_proj.effective_weight().view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
        w_uk_NdC, w_uv_NvC = w_b[:, : self.qk_nope_head_dim], w_b[:, self.qk_nope_head_dim :]
        q_latent_BNTC = weight_product(_absorb_key, q_nope_BTNd, w_uk_NdC)
        q_pe_BNTr = q_pe_BTNr.transpose(1, 2)
        scores = _per_head_bmm(q_latent_BNTC, latent_BSC.transpose(1, 2))
        scores = scores + _per_head_bmm(q_pe_BNTr, k_pe_BSr.transpose(1, 2))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if own is not None:
            own_latent_B1C, own_k_pe_B1r = own[0].unsqueeze(1), own[1].unsqueeze(1)
            own_score = (q_latent_BNTC * own_latent_B1C).sum(-1, keepdim=True)
            own_score = own_score + (q_pe_BNTr * own_k_pe_B1r).sum(-1, keepdim=True)
            scores = torch.cat((scores, own_score), dim=-1)
        probs = (scores.float() * self.scale).softmax(dim=-1).to(latent_BSC.dtype)
        if own is None:
            out_latent_BNTC = _per_head_bmm(probs, latent_BSC)
        else:
            out_latent_BNTC = _per_head_bmm(probs[..., :-1], latent_BSC) + probs[..., -1:] * own_latent_B1C
        out = weight_product(_absorb_value, out_latent_BNTC, w_uv_NvC)
        return self.o_proj(out.flatten(2))


def _absorb_key(q_nope_BTNd: torch.Tensor, w_uk_NdC: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bthd,hdr->bhtr", q_nope_BTNd, w_uk_NdC)


def _absorb_value(out_latent_BNTC: torch.Tensor, w_uv_NvC: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bhtr,hvr->bthv", out_latent_BNTC, w_uv_NvC)


def _per_head_bmm(x_BNTa: torch.Tensor, y_Bab: torch.Tensor) -> torch.Tensor:
    """x @ y for every head against one per-row matrix (the latent cache is shared by all heads).

    Heads and queries are folded into one row dimension of a single bmm: broadcasting y over a head dimension
    instead makes matmul materialise a copy of the whole cache per head at every decode step.
    """
    batch, heads, queries, _ = x_BNTa.shape
    out = torch.bmm(x_BNTa.reshape(batch, heads * queries, -1), y_Bab)
    return out.view(batch, heads, queries, -1)


class GroupedQueryAttention(nn.Module):
    """Standard GQA with interleaved-pair RoPE on the whole head; num_key_value_heads K/V heads."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.gqa_head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.scale = softmax_scale(config, self.head_dim)

    def forward(
        self,
        x_BTH: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """Attention over this call's tokens, or (with a cache) over every cached token too."""
        q = apply_rope(self.q_proj(x_BTH).unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)
        k = apply_rope(self.k_proj(x_BTH).unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(x_BTH).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if cache is not None:
            end = start + x_BTH.shape[1]
            cache.latent_or_keys[layer, :, :, start:end] = k.transpose(1, 2)
            cache.rope_key_or_values[layer, :, :, start:end] = v.transpose(1, 2)
            k = cache.latent_or_keys[layer, :, :, :end].transpose(1, 2)
            v = cache.rope_key_or_values[layer, :, :, :end].transpose(1, 2)
        repeats = self.num_heads // self.num_kv_heads
        if repeats > 1:
            k = k.repeat_interleave(repeats, dim=2)
            v = v.repeat_interleave(repeats, dim=2)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def decode(
        self,
        x_B1H: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys_BnSd: torch.Tensor,
        values_BnSd: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One token per sequence against a read-only cache (see MultiHeadLatentAttention.decode): the output
        and this token's K/V [B, h_kv, d]."""
        q = apply_rope(self.q_proj(x_B1H).unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)
        k = apply_rope(self.k_proj(x_B1H).unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(x_B1H).unflatten(-1, (self.num_kv_heads, self.head_dim))
        k_all = torch.cat((keys_BnSd, k.transpose(1, 2)), dim=2)
        v_all = torch.cat((values_BnSd, v.transpose(1, 2)), dim=2)
        repeats = self.num_heads // self.num_kv_heads
        if repeats > 1:
            k_all = k_all.repeat_interleave(repeats, dim=1)
            v_all = v_all.repeat_interleave(repeats, dim=1)
        mask = F.pad(mask, (0, 1), value=True)  # the token's own key
        out = attend(q.transpose(1, 2), k_all, v_all, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).flatten(2)), (k.squeeze(1), v.squeeze(1))


def build_attention(config: ModelConfig) -> nn.Module:
    """The attention module the config asks for."""
    return MultiHeadLatentAttention(config) if config.attention == "mla" else GroupedQueryAttention(config)
