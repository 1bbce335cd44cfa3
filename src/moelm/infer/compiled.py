"""The decode step compiled: an inference-side object that owns the compiled graph, its backend and the key it
was built for, so the network module carries no compilation state.

The step is `MoELM.decode_logits`: fixed shapes per (batch, cache capacity), no host syncs, so one graph serves
every step of every request of that shape. Prefill stays eager.
"""

from __future__ import annotations

import types

import torch

from moelm.model.transformer import DecodeFn, MoELM

BACKENDS = ("auto", "aot", "inductor")


class CompiledDecode:
    """`step()` returns the compiled decode step, rebuilt when the model's dtype, device or train/eval mode changed.

    backend:
    - "aot", what "auto" picks on CPU: AOTInductor packages called with the token and the cache tensors only,
      the model's weights loaded by reference (moelm.infer.aot), skipping torch.compile's per-call Python path.
    - "inductor", what "auto" picks elsewhere: torch.compile with inductor's C++ wrapper. Dynamo's guards on the
      model's modules cost about a millisecond per step, so they are skipped, which is safe only for this one
      model object: the step is compiled from a private copy of the function's code (dynamo keeps compiled
      graphs per code object, so no other model can hit them), and parameters are read at every call.
    Both see in-place weight updates.
    """

    def __init__(self, model: MoELM, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"invalid compile backend {backend!r}: must be one of {', '.join(map(repr, BACKENDS))}")
        self.model = model
        self.backend = backend
        self.key: tuple | None = None  # (dtype, activation dtype, device, training, backend) built for
        self._step: DecodeFn | None = None

    def resolved_backend(self) -> str:
        """The backend "auto" stands for on the model's current device."""
        if self.backend != "auto":
            return self.backend
        return "aot" if self.model.embed_tokens.weight.device.type == "cpu" else "inductor"

    def step(self) -> DecodeFn:
        """The compiled `decode_logits` for the model as it is now."""
        weight = self.model.embed_tokens.weight
        backend = self.resolved_backend()
        key = (weight.dtype, self.model.compute_dtype, weight.device, self.model.training, backend)
        if self._step is None or key != self.key:
            if backend == "aot":
                from moelm.infer.aot import AotDecodeStep

                self._step = AotDecodeStep(self.model)
            else:
                self._step = _inductor_decode(self.model)
            self.key = key
        return self._step


def compile_decode(model: MoELM, backend: str = "auto") -> CompiledDecode:
    """A compiled decode step for `model`; pass it to `generate` / `stream` (`compiled=`) or a TextGenerator.

    Compilation is lazy: the first decode step of each shape builds (or loads) its graph.
    """
    return CompiledDecode(model, backend)


def _inductor_decode(model: MoELM) -> DecodeFn:
    import torch._dynamo.config as dynamo_config

    # one graph per (batch, capacity bucket); dynamo's default limit of 8 would fall back to eager
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    function = type(model).decode_logits
    private = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)
    return torch.compile(
        types.MethodType(private, model),
        fullgraph=True,
        dynamic=False,
        options={"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
    )
