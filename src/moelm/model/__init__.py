"""The moelm network: layers, attention, router, experts, MoE block, causal LM and HF interop."""

from moelm.model.router import Router, Routing
from moelm.model.transformer import MoELM, MoELMOutput

__all__ = ["MoELM", "MoELMOutput", "Router", "Routing"]
