"""Instruments that measure on a real run what `moelm plan` predicts: the bytes autograd saves for the backward,
the training state a rank allocates, and the rise of a process's resident memory (sharded checkpoints)."""

from __future__ import annotations

import os
import threading
import time
import weakref

import torch


class SavedTensorMeter:
    """Bytes of the tensors autograd holds for backward, now and at their peak: what `layer_activation_bytes`
    predicts, measured on a real step. Storages are counted once however many saved tensors view them, and
    parameters (saved by every matmul) not at all."""

    def __init__(self, parameters: list[torch.Tensor]) -> None:
        self._parameters = set()
        for p in parameters:
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.device.type != "meta" and local.untyped_storage().size():
                self._parameters.add(local.untyped_storage().data_ptr())
        self._live: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> object:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return tensor
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return tensor  # a weight (FSDP's gathered ones included), not an activation
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        try:
            pointer = local.untyped_storage().data_ptr()
        except RuntimeError:  # a storage FSDP already freed
            return tensor
        if pointer in self._parameters or pointer == 0:
            return tensor
        entry = self._live.setdefault(pointer, [local.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        holder = _Held(tensor)
        weakref.finalize(holder, self._release, pointer)
        return holder

    def _unpack(self, packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed

    def _release(self, pointer: int) -> None:
        entry = self._live.get(pointer)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[pointer]


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def measured_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """This rank's parameter, gradient and optimizer-moment bytes as allocated (local shards)."""

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    grads = sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters() if p.grad is not None)
    moments = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim():
                moments += local(value).numel() * local(value).element_size()
    return {"parameters": float(params), "gradients": float(grads), "optimizer": float(moments)}


def resident_bytes() -> int:
    """This process's resident set (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class ResidentPeak:
    """The highest resident memory above the level at entry, sampled every millisecond on a thread: a gathered
    state shows up even when it is freed before the block ends."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self.seconds = 0.0
        self._running = False

    def __enter__(self) -> ResidentPeak:
        self.start, self.peak, self._running = resident_bytes(), 0, True
        self._began = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, resident_bytes() - self.start)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, resident_bytes() - self.start)
        self.seconds = time.perf_counter() - self._began
