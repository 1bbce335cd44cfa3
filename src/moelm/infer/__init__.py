"""Inference: KV-cached batched generation, sampling, streaming, a compiled decode step and MTP speculation."""

from moelm.infer.compiled import CompiledDecode, compile_decode
from moelm.infer.generate import GenerationStats, StepOutput, generate, left_pad, stream
from moelm.infer.sampling import SamplingParams, sample

__all__ = [
    "CompiledDecode",
    "GenerationStats",
    "SamplingParams",
    "StepOutput",
    "compile_decode",
    "generate",
    "left_pad",
    "sample",
    "stream",
]
