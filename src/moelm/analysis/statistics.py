"""Statistics of expert assignments as pure functions of integer arrays (no model, no files).

An assignment is one (token, slot) pair: a token routed to k experts makes k assignments, each labelled with the
token's domain. Mutual information is measured in bits between the domain and the chosen expert of an
assignment; the shuffled baseline recomputes it after permuting the domain labels over tokens (a token keeps its k
experts, it only changes label), so a finite sample's bias is visible: specialisation means MI well above it.
"""

from __future__ import annotations

import numpy as np


def joint_counts(domains_N: np.ndarray, experts_N: np.ndarray, num_domains: int, num_experts: int) -> np.ndarray:
    """Counts [D, E] of assignments per (domain, expert)."""
    counts = np.zeros((num_domains, num_experts), dtype=np.float64)
    np.add.at(counts, (domains_N, experts_N), 1.0)
    return counts


def mutual_information(counts_DE: np.ndarray) -> float:
    """I(domain; expert) in bits from a joint count table."""
    total = counts_DE.sum()
    if total == 0:
        return 0.0
    joint = counts_DE / total
    outer = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    nonzero = joint > 0
    return float((joint[nonzero] * np.log2(joint[nonzero] / outer[nonzero])).sum())


def domain_entropy(domains_T: np.ndarray, num_domains: int) -> float:
    """H(domain) in bits over tokens: the most MI can be."""
    p = np.bincount(domains_T, minlength=num_domains) / max(len(domains_T), 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def specialisation(
    domains_T: np.ndarray, experts_TK: np.ndarray, num_domains: int, num_experts: int, shuffles: int = 5, seed: int = 0
) -> dict[str, float]:
    """MI between domain and expert for one layer, the mean MI with shuffled domains, and H(domain)."""
    top_k = experts_TK.shape[1]
    repeat = np.repeat(domains_T, top_k)
    observed = mutual_information(joint_counts(repeat, experts_TK.reshape(-1), num_domains, num_experts))
    rng = np.random.default_rng(seed)
    baseline = [
        mutual_information(
            joint_counts(np.repeat(rng.permutation(domains_T), top_k), experts_TK.reshape(-1), num_domains, num_experts)
        )
        for _ in range(shuffles)
    ]
    return {
        "mi_bits": observed,
        "mi_shuffled_bits": float(np.mean(baseline)),
        "domain_entropy_bits": domain_entropy(domains_T, num_domains),
    }


def domain_top_expert_share(counts_DE: np.ndarray, top_k: int) -> np.ndarray:
    """For each domain, the share of its assignments that go to its own top_k most used experts
    (uniform routing gives about top_k / E)."""
    shares = np.zeros(counts_DE.shape[0])
    for d, row in enumerate(counts_DE):
        if row.sum() > 0:
            shares[d] = np.sort(row)[::-1][:top_k].sum() / row.sum()
    return shares


def co_selection(experts_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] counts of tokens that chose both experts (diagonal: tokens that chose the expert)."""
    matrix = np.zeros((num_experts, num_experts), dtype=np.float64)
    for slot_a in range(experts_TK.shape[1]):
        for slot_b in range(experts_TK.shape[1]):
            np.add.at(matrix, (experts_TK[:, slot_a], experts_TK[:, slot_b]), 1.0)
    return matrix


def load_summary(counts_E: np.ndarray) -> dict[str, float]:
    """Max over mean load and coefficient of variation of one layer's per-expert assignment counts."""
    mean = counts_E.mean()
    if mean == 0:
        return {"load_max_over_mean": 0.0, "load_cv": 0.0}
    return {"load_max_over_mean": float(counts_E.max() / mean), "load_cv": float(counts_E.std() / mean)}
