"""Run a model over a labelled corpus and measure its routing: load, entropy, co-selection, specialisation.

Each document is one forward pass (no padding to account for); every MoE layer's routing decision for every
token is kept with the token's id and its document's domain. The numbers come from moelm.analysis.statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelm.analysis import statistics
from moelm.data.builtin import builtin_corpus
from moelm.data.sources import jsonl_records
from moelm.model.transformer import MoELM


@dataclass
class RoutingTrace:
    """Per MoE layer: each token's experts [T, k] and score entropy [T]; per token: its id and domain index."""

    domains: list[str]
    token_ids: list[int] = field(default_factory=list)
    token_domains: list[int] = field(default_factory=list)
    experts: dict[int, list[np.ndarray]] = field(default_factory=dict)
    entropies: dict[int, list[np.ndarray]] = field(default_factory=dict)


def labelled_documents(source: str, limit: int = 400, seed: int = 1) -> list[tuple[str, str]]:
    """(domain, text) pairs: `builtin` (its four domains) or a JSONL file with `text` and `domain` fields."""
    if source == "builtin":
        return [(record.domain, record.text) for record in builtin_corpus(limit, seed=seed)]
    documents = []
    for line, record in jsonl_records(Path(source)):
        if not isinstance(record.get("text"), str) or not isinstance(record.get("domain"), str):
            raise ValueError(f"{source}:{line}: each record needs a string 'text' and a string 'domain'")
        documents.append((record["domain"], record["text"]))
        if len(documents) >= limit:
            break
    if not documents:
        raise ValueError(f"{source}: no records")
    return documents


@torch.no_grad()
def trace_routing(
    model: MoELM, tokenizer: Any, documents: Iterable[tuple[str, str]], max_tokens: int = 256
) -> RoutingTrace:
    """Route every document through `model` (eval mode) and keep the routing of every token."""
    documents = list(documents)
    trace = RoutingTrace(domains=sorted({domain for domain, _ in documents}))
    index = {domain: i for i, domain in enumerate(trace.domains)}
    model.eval()
    for domain, text in documents:
        ids = tokenizer.encode(text).ids[:max_tokens]
        if not ids:
            continue
        out = model(torch.tensor([ids], device=model.embed_tokens.weight.device))
        trace.token_ids.extend(ids)
        trace.token_domains.extend([index[domain]] * len(ids))
        for layer, routing in out.routing.items():
            trace.experts.setdefault(layer, []).append(routing.expert_ids_TK.cpu().numpy())
            probs = routing.scores_TE.float()
            probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-20)
            entropy = -(probs * probs.clamp(min=1e-20).log()).sum(-1)
            trace.entropies.setdefault(layer, []).append(entropy.cpu().numpy())
    return trace


def summarise(trace: RoutingTrace, model: MoELM, tokenizer: Any, top_tokens: int = 5) -> dict[str, Any]:
    """Every number of the analysis, per layer and over layers, as plain JSON-ready values."""
    config = model.config
    num_experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    domains_T = np.asarray(trace.token_domains)
    token_ids_T = np.asarray(trace.token_ids)
    layers = {}
    for layer in sorted(trace.experts):
        experts_TK = np.concatenate(trace.experts[layer])
        load_E = np.bincount(experts_TK.reshape(-1), minlength=num_experts).astype(np.float64)
        counts_DE = statistics.joint_counts(
            np.repeat(domains_T, top_k), experts_TK.reshape(-1), len(trace.domains), num_experts
        )
        shares = statistics.domain_top_expert_share(counts_DE, top_k)
        favourite_tokens = []
        for expert in range(num_experts):
            chosen = token_ids_T[(experts_TK == expert).any(1)]
            ids, counts = np.unique(chosen, return_counts=True)
            best = ids[np.argsort(-counts)[:top_tokens]]
            favourite_tokens.append([tokenizer.decode([int(t)]) for t in best])
        layers[str(layer)] = {
            "load": load_E.tolist(),
            **statistics.load_summary(load_E),
            "routing_entropy": float(np.concatenate(trace.entropies[layer]).mean()),
            "dropped_frac": 0.0,  # evaluation is dropless unless eval_capacity_factor is set
            **statistics.specialisation(domains_T, experts_TK, len(trace.domains), num_experts),
            "domain_top_expert_share": dict(zip(trace.domains, shares.tolist(), strict=True)),
            "co_selection": statistics.co_selection(experts_TK, num_experts).tolist(),
            "top_tokens": favourite_tokens,
        }
    mean = {
        key: float(np.mean([layer[key] for layer in layers.values()])) if layers else 0.0
        for key in ("load_max_over_mean", "routing_entropy", "mi_bits", "mi_shuffled_bits")
    }
    return {
        "domains": trace.domains,
        "tokens": len(token_ids_T),
        "num_experts": num_experts,
        "top_k": top_k,
        "uniform_top_expert_share": top_k / num_experts,
        "mean_over_layers": mean,
        "layers": layers,
    }
