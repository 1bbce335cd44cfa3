"""The decode step compiled ahead of time with AOTInductor, one package per (batch, cache capacity).

torch.compile's call path costs about 0.4 ms per token on a 2-core CPU before any kernel runs (profile of the
small preset, probe): dynamo's frame entry and cache lookup, collecting the ~120 parameters as graph inputs, the
AOTAutograd wrapper. An AOTInductor
package is called with the token and the four cache tensors only; its weights are constants that point at the
model's own parameters (user-managed, nothing copied), so in-place weight updates are seen and a parameter
replaced by a new tensor rebuilds the packages. benchmarks/decode_step.py, small preset, batch 1: 3.97-4.44 ms per
step against torch.compile's 4.67-4.68 ms; benchmarks/decode.py measures whole requests.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from moelm.model.cache import KVCache
from moelm.model.transformer import MoELM


class _DecodeStep(nn.Module):
    """MoELM.decode_logits over tensors only, the form torch.export takes."""

    def __init__(self, model: MoELM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids_B1: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        valid: torch.Tensor,
        next_position: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = KVCache.from_tensors(self.model.config, first, second, valid, next_position)
        return self.model.decode_logits(input_ids_B1, cache)


class AotDecodeStep:
    """Callable like `MoELM.decode_logits(input_ids_B1, cache)`; builds a package the first time it sees a shape."""

    def __init__(self, model: MoELM) -> None:
        self.step = _DecodeStep(model)
        self.runners: dict[tuple[int, ...], object] = {}
        self._directory = tempfile.TemporaryDirectory(prefix="moelm-aot-")
        # where every weight the packages read is registered (its module's parameter or buffer dict), with the
        # tensor and storage seen at build time; checked before each step: a dict lookup and a pointer per weight
        self._slots = [
            (registry, name, f"{prefix}.{name}" if prefix else name)
            for prefix, module in self.step.named_modules()
            for registry in (module._parameters, module._buffers)
            for name, tensor in registry.items()
            if tensor is not None
        ]
        self._snapshot = self._take_snapshot()

    def _take_snapshot(self) -> list[tuple[torch.Tensor, int]]:
        return [(registry[name], registry[name].data_ptr()) for registry, name, _ in self._slots]

    def _weights_replaced(self) -> bool:
        return any(
            registry.get(name) is not tensor or tensor.data_ptr() != pointer
            for (registry, name, _), (tensor, pointer) in zip(self._slots, self._snapshot, strict=True)
        )

    def __call__(self, input_ids_B1: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._weights_replaced():  # the loaded packages point at the old tensors
            self.runners.clear()
            self._snapshot = self._take_snapshot()
        tensors = (input_ids_B1, cache.first, cache.second, cache.valid, cache.next_position)
        key = tuple(dim for tensor in tensors for dim in tensor.shape)
        runner = self.runners.get(key)
        if runner is None:
            runner = self.runners[key] = self._build(tensors, len(self.runners))
        logits, firsts, seconds = runner(*tensors)
        return logits, firsts, seconds

    def _build(self, tensors: tuple[torch.Tensor, ...], index: int) -> object:
        with torch.inference_mode(False), torch.no_grad():
            examples = tuple(torch.zeros_like(t) for t in tensors)  # ordinary tensors: export refuses inference ones
            exported = torch.export.export(self.step, examples, strict=False)
            path = torch._inductor.aoti_compile_and_package(
                exported,
                package_path=str(Path(self._directory.name) / f"decode-{index}.pt2"),
                inductor_configs={"aot_inductor.package_constants_in_so": False},
            )
        runner = torch._inductor.aoti_load_package(path)
        constants = {fqn: tensor for (_, _, fqn), (tensor, _) in zip(self._slots, self._snapshot, strict=True)}
        runner.load_constants(
            {fqn: constants[fqn] for fqn in runner.get_constant_fqns()},
            check_full_update=True,
            user_managed=True,
        )
        return runner
