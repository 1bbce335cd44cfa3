"""Evaluation: benchmark tasks, answer extraction, metrics and a sandbox for model-written code."""
