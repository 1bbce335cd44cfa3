"""Inference: KV-cached batched generation, sampling, streaming and MTP speculative decoding."""

from moelm.infer.generate import GenerationStats, StepOutput, generate, left_pad, stream
from moelm.infer.sampling import SamplingParams, sample

__all__ = ["GenerationStats", "SamplingParams", "StepOutput", "generate", "left_pad", "sample", "stream"]
