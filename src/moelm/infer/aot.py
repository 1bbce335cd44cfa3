"""The decode step compiled ahead of time with AOTInductor, one package per (batch, cache capacity).

torch.compile's call path costs a noticeable share of a small model's decode step on CPU before any kernel runs:
dynamo's frame entry and cache lookup, collecting the parameters as graph inputs, the AOTAutograd wrapper. An
AOTInductor package is called with the token and the four cache tensors only; its weights are constants that
point at the model's own parameters (user-managed, nothing copied), so in-place weight updates are seen and a
parameter replaced by a new tensor rebuilds the packages. `benchmarks/probes/decode_step.py` times the two
backends on the same step; `benchmarks/decode.py` measures whole requests (figures in README).

Building a package takes about a minute on 2 cores, and since a package holds no weights it serves every model
of the same architecture: packages are kept on disk (`package_cache_dir`) under a key of everything the compiled
code depends on, so a later process — or another checkpoint of the same shape — loads one in a second.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import moelm
from moelm.files import atomic_path
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
        latent_or_keys: torch.Tensor,
        rope_key_or_values: torch.Tensor,
        valid: torch.Tensor,
        next_position: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = KVCache.from_tensors(self.model.config, latent_or_keys, rope_key_or_values, valid, next_position)
        return self.model.decode_logits(input_ids_B1, cache)


CACHE_ENV = "MOELM_AOT_CACHE"


def package_cache_dir() -> Path | None:
    """Where decode packages are kept between processes: $MOELM_AOT_CACHE if set ("off" or "0" keeps none),
    else $XDG_CACHE_HOME/moelm/aot, else ~/.cache/moelm/aot."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "0", "off", "false", "no") else Path(chosen)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "moelm" / "aot"


@functools.cache
def _code_fingerprint() -> str:
    """A digest of moelm's own source: the exported graph is whatever this code traces to."""
    root = Path(moelm.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def package_key(model: MoELM, inputs: tuple[torch.Tensor, ...]) -> str | None:
    """The on-disk name of the package for this model and these step inputs: a digest of what the compiled code
    depends on (moelm's source, torch version, CPU instruction set and thread count, GPU model, config, the
    shapes, dtypes and strides of every weight and input) and of nothing it does not (weight values). None for
    a model holding modules from outside moelm and torch, whose code the digest could not see."""
    if any(not type(module).__module__.startswith(("moelm.", "torch.")) for module in model.modules()):
        return None
    described = {
        "moelm_source": _code_fingerprint(),
        "torch": torch.__version__,
        "python": platform.python_version_tuple()[:2],
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),  # inductor writes the thread count into the kernels
        "accelerator": _accelerator(model.embed_tokens.weight.device),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": model.config.to_dict(),
        "training": model.training,
        "activation_dtype": str(model.compute_dtype),
        "weights": [
            (name, list(t.shape), list(t.stride()), str(t.dtype), str(t.device))
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        ],
        "inputs": [(list(t.shape), list(t.stride()), str(t.dtype), str(t.device)) for t in inputs],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _accelerator(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    return f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"


class AotDecodeStep:
    """Callable like `MoELM.decode_logits(input_ids_B1, cache)`; builds a package the first time it sees a shape,
    or loads it from `cache_dir` (default `package_cache_dir()`, where MOELM_AOT_CACHE=off keeps none)."""

    def __init__(self, model: MoELM, cache_dir: Path | str | None = None) -> None:
        self.step = _DecodeStep(model)
        self.runners: dict[tuple[int, ...], object] = {}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else package_cache_dir()
        self.built = 0  # packages compiled by this step (the rest came from the cache)
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
        tensors = (input_ids_B1, *cache.tensors())
        key = tuple(dim for tensor in tensors for dim in tensor.shape)
        runner = self.runners.get(key)
        if runner is None:
            runner = self.runners[key] = self._build(tensors, len(self.runners))
        logits, firsts, seconds = runner(*tensors)
        return logits, firsts, seconds

    def _build(self, tensors: tuple[torch.Tensor, ...], index: int) -> object:
        cached = self._cache_path(tensors)
        if cached is not None and cached.exists():
            try:
                return self._load(cached)
            except (RuntimeError, OSError, ValueError, KeyError) as error:  # stale or damaged: build it again
                warnings.warn(f"rebuilding decode package {cached.name}: cannot load it ({error})", stacklevel=2)
                cached.unlink(missing_ok=True)
        local = Path(self._directory.name) / f"decode-{index}.pt2"
        with torch.inference_mode(False), torch.no_grad():
            examples = tuple(torch.zeros_like(t) for t in tensors)  # ordinary tensors: export refuses inference ones
            exported = torch.export.export(self.step, examples, strict=False)
            path = torch._inductor.aoti_compile_and_package(
                exported,
                package_path=str(local),
                inductor_configs={"aot_inductor.package_constants_in_so": False},
            )
        self.built += 1
        if cached is not None:
            try:  # readers never see half a package
                with atomic_path(cached) as partial:
                    shutil.copyfile(path, partial)
            except OSError as error:  # a full or read-only disk: this process still has its package
                warnings.warn(f"decode package not cached in {cached.parent}: {error}", stacklevel=2)
        return self._load(Path(path))

    def _cache_path(self, tensors: tuple[torch.Tensor, ...]) -> Path | None:
        key = None if self.cache_dir is None else package_key(self.step.model, tensors)
        if key is None:
            return None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            warnings.warn(f"decode packages not cached: cannot create {self.cache_dir} ({error})", stacklevel=2)
            return None
        return self.cache_dir / f"decode-{key}.pt2"

    def _load(self, path: Path) -> object:
        runner = torch._inductor.aoti_load_package(str(path))
        constants = {fqn: tensor for (_, _, fqn), (tensor, _) in zip(self._slots, self._snapshot, strict=True)}
        runner.load_constants(
            {fqn: constants[fqn] for fqn in runner.get_constant_fqns()},
            check_full_update=True,
            user_managed=True,
        )
        return runner
