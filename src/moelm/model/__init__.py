"""The moelm network: layers, attention, router, dispatch, experts, MoE block, causal LM and HF interop.

This package is the network and nothing else: it imports only `moelm.config`, `moelm.constants`, `moelm.files`
and itself. Training machinery (bias balancing, telemetry), inference engines and compiled state live above it.

Shape suffixes on tensor names (`x_BTH` is [batch, tokens, hidden]); one meaning per letter in the whole package:
    B  batch                          T  tokens (queries) of the sequence or the flattened batch
    S  cache slots / keys             L  layers
    H  hidden size                    V  vocabulary
    N  attention heads                n  key/value heads (GQA)
    d  query/key width per head       e  value width per head (v_head_dim)
    r  rotary width (qk_rope_head_dim) C  compressed KV latent width (kv_lora_rank)
    E  routed experts                 K  experts chosen per token (top-k)
    R  rows after dispatch (token, expert pairs, grouped by expert)
    I  expert intermediate size       P, Q  output and input width of a per-row matrix-vector product
"""

from moelm.model.router import Router, Routing
from moelm.model.transformer import MoELM, MoELMOutput

__all__ = ["MoELM", "MoELMOutput", "Router", "Routing"]
