"""Grouped GEMM that `torch.compile` can trace on CPU.

torch 2.13 runs `grouped_mm` on CPU in float32 (forward and backward) but its fake-tensor kernel accepts only
bf16, so tracing a CPU float32 model fails. Wrapping the op as a custom operator with its own shape function and
backward (the same two grouped GEMMs torch's backward uses) keeps the compiled graph whole on CPU. Eager code and
CUDA use torch's op directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelm.model.kernels.cpu import cpu_has_native_bf16

_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@torch.library.custom_op("moelm::grouped_mm", mutates_args=())
def _cpu_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows a[offs[e-1]:offs[e]] times b[e]: [R, K] x [E, K, N] -> [R, N]."""
    return _torch_grouped_mm(a, b, offs=offs)


@_cpu_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("moelm::grouped_mm_weight_grad", mutates_args=())
def _cpu_weight_grad(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group grad_e^T a_e: [R, K], [R, N] -> [E, N, K], the weight gradient in the [E, N, K] layout the
    experts store (their weights enter transposed), so no copy is needed to accumulate it."""
    return torch._grouped_mm(grad.t(), a, offs=offs)


@_cpu_weight_grad.register_fake
def _(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(offs.shape[0], grad.shape[1], a.shape[1])


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = _cpu_grouped_mm(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = _cpu_weight_grad(a, grad, offs).transpose(-2, -1) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_cpu_grouped_mm.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[R, K] x [E, K, N] with rows grouped by the cumulative offsets `offs` -> [R, N].

    Eager code calls torch's op (its eager backward is faster than the custom op's, benchmarks/moe_layer.py);
    only CPU tracing goes through the custom op.
    """
    if a.is_cuda or not torch.compiler.is_compiling():
        return _torch_grouped_mm(a, b, offs=offs)
    return _cpu_grouped_mm(a, b, offs)


available = _torch_grouped_mm is not None


def expert_backend(requested: str, device: torch.device, dtype: torch.dtype, training: bool) -> str:
    """The routed experts' kernel: one grouped GEMM where torch has a fast one, else a GEMM per expert.

    Measured with torch 2.13 (benchmarks/moe_layer.py, benchmarks/forward.py): with gradients grouped_mm beats
    the loop in float32 on CPU, forward-only the loop wins (it visits only the experts that received tokens),
    and torch's CPU grouped_mm in bf16 is far slower on CPUs without bf16 hardware.
    `training` means gradients are being recorded.
    """
    if requested == "loop" or not available:
        return "loop"
    if requested == "grouped_mm":
        return "grouped_mm"
    if device.type == "cuda":
        return "grouped_mm" if dtype in (torch.bfloat16, torch.float32) else "loop"
    if not training:
        return "loop"
    if dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16()):
        return "grouped_mm"
    return "loop"
