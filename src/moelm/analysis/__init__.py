"""Routing analytics: what the experts of a trained MoE learned (load, entropy, co-selection, specialisation)."""
