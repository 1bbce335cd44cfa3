"""Inference: the one decode loop (Engine), batched sampling, streaming, prefix caching, a compiled decode step
and MTP speculation."""

from moelm.infer.compiled import CompiledDecode, compile_decode
from moelm.infer.engine import Engine, EngineRequest
from moelm.infer.generate import GenerationStats, StepOutput, generate, left_pad, stream
from moelm.infer.prefix_cache import PrefixCache
from moelm.infer.sampling import SamplingParams, sample

__all__ = [
    "CompiledDecode",
    "Engine",
    "EngineRequest",
    "GenerationStats",
    "PrefixCache",
    "SamplingParams",
    "StepOutput",
    "compile_decode",
    "generate",
    "left_pad",
    "sample",
    "stream",
]
