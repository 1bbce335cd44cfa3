"""The causal LM: embeddings -> decoder blocks (dense or MoE feed-forward) -> norm -> head, plus MTP modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelm.config import ConfigError, ModelConfig, MoEOptions
from moelm.constants import IGNORE_INDEX
from moelm.model.attention import DocumentMask, build_attention
from moelm.model.cache import KVCache
from moelm.model.experts import RoutedExperts
from moelm.model.hf import load_pretrained, save_pretrained
from moelm.model.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, SwiGLU
from moelm.model.lora import merge_lora
from moelm.model.moe import MoE
from moelm.model.peft_format import base_model_path, is_adapter_dir, load_adapter_into
from moelm.model.router import Router, Routing

# (input_ids [B, 1], cache) -> (logits [B, V], the token's latent_or_keys and rope_key_or_values entries [L, B, ...])
DecodeFn = Callable[[torch.Tensor, KVCache], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class MoELMOutput:
    """What a forward pass returns: logits, losses (None without labels) and each MoE layer's routing."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    routing: dict[int, Routing] = field(default_factory=dict)
    hidden_states: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # per kind, mean over MoE layers
    balance_loss: torch.Tensor | None = None  # sum of aux_losses (already in `loss`)
    # Predicted-token counts behind each mean (LM, then each MTP depth): data parallelism re-weights the ranks'
    # means by them so the gradient is that of the global batch's mean.
    lm_tokens: torch.Tensor | None = None
    mtp_terms: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (loss, tokens) per depth


class Block(nn.Module):
    """Pre-norm decoder block: x + Attn(norm(x)), then + FFN(norm(x)) with a dense or MoE FFN."""

    def __init__(self, config: ModelConfig, layer_idx: int, options: MoEOptions) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config, options) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)
        self.checkpoint_block = options.activation_checkpointing == "full"

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, Routing | None]:
        if self.checkpoint_block and self.training and torch.is_grad_enabled() and cache is None:
            # Non-reentrant checkpointing returns the first pass's Routing and replays the RNG state, so the
            # recomputation routes identically and nothing downstream sees its second set of counts.
            return checkpoint(self._forward, x, cos, sin, mask, token_mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask, token_mask, cache, start)

    def _forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, Routing | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer_idx, start)
        hidden = self.post_attention_layernorm(x)
        if self.is_moe:
            ffn_out, routing = self.mlp(hidden, token_mask)
            return x + ffn_out, routing
        return x + self.mlp(hidden), None

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One fixed-shape decode step of this block (see MoELM.decode_logits): output and new cache entries."""
        layer = self.layer_idx
        attn_out, entries = self.self_attn.decode(
            self.input_layernorm(x), cos, sin, cache.latent_or_keys[layer], cache.rope_key_or_values[layer], mask
        )
        x = x + attn_out
        hidden = self.post_attention_layernorm(x)
        return x + (self.mlp.decode(hidden) if self.is_moe else self.mlp(hidden)), entries


class MTPModule(nn.Module):
    """DeepSeek-V3 multi-token prediction depth: h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]) -> block."""

    def __init__(self, config: ModelConfig, layer_idx: int, options: MoEOptions) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_idx, options)
        self.shared_head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        next_embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, Routing | None]:
        merged = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        return self.block(merged, cos, sin, mask, token_mask, cache, start)


class MoELM(nn.Module):
    """DeepSeek-V3-style MoE causal language model."""

    def __init__(self, config: ModelConfig, options: MoEOptions | None = None) -> None:
        super().__init__()
        self.config = config
        self.options = options = options or MoEOptions()
        broken = options.conflicts_with(config)
        if broken is not None:
            raise ConfigError(f"invalid moe.{broken.key}={broken.value!r}: must be {broken.allowed}")
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, options) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + k, options) for k in range(config.num_nextn_predict_layers)
        )
        rope_dim = config.qk_rope_head_dim if config.attention == "mla" else config.gqa_head_dim
        self.rotary = RotaryEmbedding(config, rope_dim)
        # The residual stream's dtype when it differs from the weights' (set_activation_dtype); None: the same.
        self.activation_dtype: torch.dtype | None = None
        # How packed documents are masked: "sdpa" (a boolean [B, 1, T, T] mask) or "flex" (flex_attention's
        # block mask; see DocumentMask). A run setting (train.attention), never saved.
        self.attention_kernel = "sdpa"
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the residual stream and of cache entries: `activation_dtype`, else the weights' dtype."""
        return self.activation_dtype or self.embed_tokens.weight.dtype

    def set_activation_dtype(self, dtype: torch.dtype | None) -> MoELM:
        """Run the residual stream (embeddings, norms, attention, cache) in `dtype` whatever the weights' dtype.

        float32 with bf16 / f16 weights is llama.cpp's CPU convention: each matmul rounds its input to the
        weight's dtype and returns float32 (moelm.model.kernels.cpu.weight_product), where a stream kept in bf16
        rounds every product's output and every residual sum too; load with float32_norms=True to keep the
        norm weights float32 as well, as llama.cpp does. None returns to the weights' dtype. Inference only:
        training's bf16 runs through autocast over float32 master weights."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"invalid activation dtype {dtype}: must be a floating-point dtype")
        self.activation_dtype = dtype
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings in the residual stream's dtype."""
        return self.embed_tokens(input_ids).to(self.compute_dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for projections, embeddings, experts and router; ones for norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, RoutedExperts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std)
                module.e_score_correction_bias.zero_()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        document_ids: torch.Tensor | None = None,
    ) -> MoELMOutput:
        """Logits for every position; with labels (HF convention, unshifted, -100 ignored) the LM + MTP loss.

        attention_mask: [B, T] with 1 for real tokens (padding), or a boolean [B, T, T] / [B, 1, T, T]
        matrix of allowed query->key pairs (e.g. block-diagonal for packed documents; causality is added).
        cache: a KVCache; the tokens are appended to it and attend to everything cached before them
        (positions continue per sequence). logits_to_keep: only the last N positions get logits (0 = all).
        document_ids: [B, T] document index per position (packed rows): attention stays inside each document,
        and the block-diagonal mask is built here, on the model's device, instead of travelling as [B, T, T].
        """
        batch, seq_len = input_ids.shape
        token_mask = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        start = 0
        if cache is not None:
            new_tokens = token_mask if token_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            start, cached_positions = cache.reserve(new_tokens)
            position_ids = cached_positions if position_ids is None else position_ids
            # No mask needed when every slot is a real token and the queries are the first prefill (causal)
            # or a single decode token (it sees every earlier slot).
            all_valid = bool(cache.valid[:, : start + seq_len].all())
            needs_mask = not all_valid or (start > 0 and seq_len > 1)
            mask = cache.attention_mask(start, seq_len) if needs_mask else None
        elif document_ids is not None:
            mask = document_mask(document_ids, self.attention_kernel)
        else:
            mask = build_attention_mask(attention_mask, seq_len, input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).expand(batch, -1)
        # Padding tokens (2-D mask) are left out of routing statistics and balance losses.
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        routing: dict[int, Routing] = {}
        for block in self.layers:
            hidden, layer_routing = block(hidden, cos, sin, mask, token_mask, cache, start)
            if layer_routing is not None:
                routing[block.layer_idx] = layer_routing
        hidden = self.norm(hidden)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        out = MoELMOutput(logits=logits, routing=routing, hidden_states=hidden)
        if labels is not None:
            out.lm_loss = causal_lm_loss(logits, labels)
            out.lm_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
            out.loss = out.lm_loss
            if len(self.mtp):
                out.mtp_loss = self._mtp_loss(
                    input_ids, labels, hidden, position_ids, mask, token_mask, routing, out.mtp_terms, document_ids
                )
                out.loss = out.lm_loss + self.options.mtp_loss_weight * out.mtp_loss
        out.aux_losses = average_layer_losses(routing)
        if out.aux_losses:
            out.balance_loss = torch.stack(list(out.aux_losses.values())).sum()
            if out.loss is not None:
                out.loss = out.loss + out.balance_loss
        return out

    def decode_logits(
        self, input_ids_B1: torch.Tensor, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-token logits [B, V] for one new token per sequence, and its cache entries for every layer.

        Reads the cache and changes nothing: every shape is fixed by (batch, cache capacity) and no value goes
        back to the host, so torch.compile captures the whole step as one graph that serves every step of
        every request of that shape (attention scores the whole capacity under the validity mask). Writing
        the entries back is `decode_step`'s job, outside the graph: in-place cache updates inside it made
        inductor copy the cache every step."""
        mask = cache.valid[:, None, None, :]
        hidden = self.embed(input_ids_B1)
        cos, sin = self.rotary(cache.next_position.unsqueeze(1), hidden.dtype)
        firsts, seconds = [], []
        for block in self.layers:
            hidden, (latent_or_keys, rope_key_or_values) = block.decode(hidden, cos, sin, mask, cache)
            firsts.append(latent_or_keys)
            seconds.append(rope_key_or_values)
        logits = self.lm_head(self.norm(hidden[:, -1]))
        return logits, torch.stack(firsts), torch.stack(seconds)

    def decode_step(self, input_ids_B1: torch.Tensor, cache: KVCache, step_fn: DecodeFn | None = None) -> torch.Tensor:
        """Logits [B, V] for one token per sequence, appended to the cache; `step_fn` is `decode_logits` or
        a compiled copy of it (the inference side owns compilation)."""
        slot = cache.claim_decode_slot()
        logits, firsts, seconds = (step_fn or self.decode_logits)(input_ids_B1, cache)
        cache.write_slot(slot, firsts, seconds)
        return logits

    def _mtp_loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        routing: dict[int, Routing],
        terms: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over depths of the CE of depth k predicting t_{i+k+1} (the λ weight is applied by forward)."""
        seq_len = input_ids.shape[1]
        losses = []
        for depth, module in enumerate(self.mtp, start=1):
            keep = seq_len - depth
            if keep < 2:
                break
            next_embeds = self.embed(input_ids[:, depth:])
            cos, sin = self.rotary(position_ids[:, :keep], hidden.dtype)
            if isinstance(mask, DocumentMask):
                sub_mask = mask.prefix(keep)
            else:
                sub_mask = None if mask is None else mask[..., :keep, :keep]
            sub_tokens = None if token_mask is None else token_mask[:, :keep]
            hidden, layer_routing = module(next_embeds, hidden[:, :keep], cos, sin, sub_mask, sub_tokens)
            if layer_routing is not None:
                routing[module.block.layer_idx] = layer_routing
            logits = self.lm_head(module.shared_head_norm(hidden))
            targets = labels[:, depth:]
            # Position i predicts t_{i+depth+1}: ignore it when that token lies in another document, i.e.
            # when query i+depth+1 may not attend to key i under the (block-diagonal) mask.
            visible = None
            if document_ids is not None:
                visible = document_ids[:, depth + 1 :] == document_ids[:, : seq_len - depth - 1]
            elif mask is not None:
                visible = mask[:, 0].diagonal(offset=-(depth + 1), dim1=1, dim2=2)  # [B, T-depth-1]
            if visible is not None:
                shifted = targets[:, 1:].masked_fill(~visible, IGNORE_INDEX)
                targets = torch.cat((targets[:, :1], shifted), dim=1)
            losses.append(causal_lm_loss(logits, targets))
            if terms is not None:
                terms.append((losses[-1], (targets[:, 1:] != IGNORE_INDEX).sum()))
        if not losses:
            return hidden.new_zeros(())
        return torch.stack(losses).mean()

    def mtp_logits(
        self,
        hidden_BTH: torch.Tensor,
        next_ids_BT: torch.Tensor,
        position_ids_BT: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """The first MTP depth as a draft head: logits for t_{i+2} from the final-normed h_i and t_{i+1}.

        With a cache the MTP block writes its K/V into the cache's MTP layer at slots [start, start + T),
        the same slots the main model used for positions i, so drafting continues over the whole sequence.
        """
        module = self.mtp[0]
        cos, sin = self.rotary(position_ids_BT, hidden_BTH.dtype)
        mask = None if cache is None else cache.attention_mask(start, hidden_BTH.shape[1])
        hidden, _ = module(self.embed(next_ids_BT), hidden_BTH, cos, sin, mask, None, cache, start)
        return self.lm_head(module.shared_head_norm(hidden))

    def balancing_biases(self) -> dict[int, torch.Tensor]:
        """Each MoE layer's selection bias buffer by layer index (MTP blocks included): what aux-loss-free
        balancing updates in place."""
        blocks = [*self.layers, *(module.block for module in self.mtp)]
        return {block.layer_idx: block.mlp.gate.e_score_correction_bias for block in blocks if block.is_moe}

    # ------------------------------------------------------------------ parameter accounting
    def num_parameters(self, include_mtp: bool = False) -> int:
        """Total parameters (tied weights once); MTP modules only when asked, as DeepSeek reports 671B."""
        seen, total = set(), 0
        for name, param in self.named_parameters():
            if (not include_mtp and name.startswith("mtp.")) or id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
        return total

    def num_active_parameters(self, include_mtp: bool = False) -> int:
        """Parameters one token touches: everything except the routed experts it was not sent to."""
        inactive = 0
        for name, module in self.named_modules():
            if isinstance(module, RoutedExperts) and (include_mtp or not name.startswith("mtp.")):
                per_expert = module.gate_up_proj[0].numel() + module.down_proj[0].numel()
                inactive += (module.num_experts - self.config.num_experts_per_tok) * per_expert
        return self.num_parameters(include_mtp) - inactive

    # ------------------------------------------------------------------ HF directories
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        mtp: bool = True,
        options: MoEOptions | None = None,
        float32_norms: bool = False,
    ) -> MoELM:
        """Load an HF DeepseekV3 / DeepseekV2 (or moelm-saved) directory: config.json + safetensors, never
        pickles; mtp=False skips the MTP layers (inference does not run them). `options` are the run settings
        (default: MoEOptions(), or those an older moelm stored in the directory's config.json, with a note);
        float32_norms keeps norm weights float32 under a half-precision `dtype` (see set_activation_dtype).
        A PEFT LoRA directory (adapter_config.json) loads its base model with the adapters merged in.
        device="meta" builds the model without reading a tensor: a parallel strategy then reads each rank's rows
        (ParallelStrategy.load_pretrained)."""
        if is_adapter_dir(path):
            model = load_pretrained(
                cls,
                base_model_path(path),
                dtype=dtype,
                device=device,
                mtp=mtp,
                options=options,
                float32_norms=float32_norms,
            )
            load_adapter_into(model, path)
            return merge_lora(model)
        return load_pretrained(
            cls, path, dtype=dtype, device=device, mtp=mtp, options=options, float32_norms=float32_norms
        )

    def save_pretrained(
        self,
        path: str | Path,
        max_shard_bytes: int | str = 2 * 1024**3,
        strict_hf: bool = False,
        quantization: str | None = None,
    ) -> None:
        """Write an HF DeepseekV3 directory (per-expert keys, sharded above max_shard_bytes, e.g. "5GB").

        strict_hf=True refuses options plain transformers cannot represent instead of keeping them under
        the 'moelm' config key; quantization="fp8" writes DeepSeek's block-scaled FP8 projection weights.
        """
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes, strict_hf=strict_hf, quantization=quantization)


def document_mask(document_ids: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor | DocumentMask:
    """Causal attention inside each packed document: a boolean [B, 1, T, T] mask for SDPA, or a DocumentMask
    for flex_attention; built on the ids' device either way."""
    if kernel == "flex":
        return DocumentMask(document_ids)
    return build_attention_mask(same_document(document_ids), document_ids.shape[1], document_ids.device)


def same_document(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T, T]: query and key positions that belong to the same document."""
    return document_ids.unsqueeze(2) == document_ids.unsqueeze(1)


def build_attention_mask(
    attention_mask: torch.Tensor | None, seq_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B, 1, T, T] allowed-pairs mask (causal AND the given mask), or None for plain causal.

    Every query may always see itself, so rows of padding tokens stay finite instead of NaN.
    """
    if attention_mask is None:
        return None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if attention_mask.dim() == 2:
        allowed = causal & attention_mask.bool()[:, None, None, :]
    else:
        pairs = attention_mask.bool()
        allowed = causal & (pairs if pairs.dim() == 4 else pairs[:, None])
    eye = torch.eye(seq_len, dtype=torch.bool, device=device)
    return allowed | eye


def average_layer_losses(routing: dict[int, Routing]) -> dict[str, torch.Tensor]:
    """Each balance loss averaged over the MoE layers that produced it (references §2: per layer, then mean)."""
    per_kind: dict[str, list[torch.Tensor]] = {}
    for layer_routing in routing.values():
        for name, value in layer_routing.losses.items():
            per_kind.setdefault(name, []).append(value)
    return {name: torch.stack(values).mean() for name, values in per_kind.items()}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: logits[:, t] predicts labels[:, t+1]; -100 labels are ignored.

    The labels are shifted (padded with -100), not the logits, so the [B, T, V] logits are never copied."""
    shifted_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    return F.cross_entropy(logits.flatten(0, 1).float(), shifted_labels, ignore_index=IGNORE_INDEX)
