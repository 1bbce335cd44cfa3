"""CPU kernel choices for linear layers: what this CPU multiplies fast, and how few-row products are laid out.

Read by the network's layers and by the expert backend selection; nothing here holds model state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def _read_cpu_bf16_flag() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: trust the vendor library's bf16 kernels
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Read once at import: a hardware fact, and file reads inside traced code would break torch.compile graphs.
_CPU_NATIVE_BF16 = _read_cpu_bf16_flag()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), from /proc/cpuinfo on Linux."""
    return _CPU_NATIVE_BF16


HALF_DTYPES = (torch.bfloat16, torch.float16)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear, except that half-precision GEMMs on CPUs without bf16 hardware run in float32, that
    float32 activations meet half-precision weights as llama.cpp has them meet (see `weight_product`), and that
    an int8 weight is multiplied with its per-output-channel `scale` (moelm.model.quantize).

    Upcasting bf16 operands is exact and the products accumulate in fp32 as a bf16 kernel's would, so the
    result matches a native bf16 GEMM up to the final rounding; on an AVX2-only CPU it is several times faster
    than torch's emulated bf16 GEMM (benchmarks/forward.py, bfloat16 rows).
    """
    rows = x.numel() // max(x.shape[-1], 1)
    if weight.dtype == torch.int8:
        return _int8_linear(x, weight, scale, bias, rows)
    if x.dtype != weight.dtype and weight.dtype in HALF_DTYPES and not torch.is_autocast_enabled(x.device.type):
        if rows == 1 and x.device.type == "cpu" and torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return _streamed_matvec(x, weight, bias)  # float32 products, reading the half-precision weight
        # llama.cpp's product: the input rounded to the weight's type, float32 accumulation and a float32 result
        # (a bf16 GEMM would also round its output, which the greedy texts of benchmarks/llama_cpp_decode.py show)
        out = F.linear(x.to(weight.dtype).to(x.dtype), weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return out
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if rows == 1 and torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return _streamed_matvec(x, weight, bias)
    if cpu_has_native_bf16():
        return _cpu_linear(x, weight, bias, rows)
    if x.dtype in (torch.bfloat16, torch.float16):
        out = _cpu_linear(x.float(), weight.float(), None if bias is None else bias.float(), rows)
        return out.to(x.dtype)
    if torch.is_autocast_enabled("cpu"):
        # bf16 autocast: round the operands to bf16 as autocast would, multiply in fp32, return bf16.
        low = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            out = F.linear(x.to(low).float(), weight.to(low).float(), None if bias is None else bias.to(low).float())
        return out.to(low)
    return _cpu_linear(x, weight, bias, rows)


def weight_product(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """`product(x, weight)`, with float32 activations rounded to a half-precision weight's dtype and the product
    computed and returned in float32: llama.cpp's convention for bf16 / f16 files (its matmuls quantise the
    activations to the weight type, accumulate in float32 and return float32, while the residual stream, norms,
    softmax and router stay float32). Keeping the stream in float32 is what holds bf16 logits near the float32
    model's. The widened weight is a temporary: exact, and slower than a bf16 GEMM outside the compiled batch-1
    step (which multiplies the bf16 weight in its fused kernel)."""
    if x.dtype == weight.dtype or weight.dtype not in HALF_DTYPES:
        return product(x, weight)
    return product(x.to(weight.dtype).to(x.dtype), weight.to(x.dtype))


def _cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """F.linear, except that 2-6 rows without autograd multiply as weight @ rows^T with the rows contiguous.

    For so few rows the BLAS kernel behind x @ weight^T streams the weight at a fraction of the memory bandwidth;
    weight @ rows^T with each row a contiguous column runs about twice as fast. Prefill's routed experts see a
    few rows each (`benchmarks/probes/prefill_linear.py` measures the whole prefill with and without this).
    """
    if not 2 <= rows <= 6 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, -1).contiguous().T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _streamed_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A one-row linear as multiply + sum, which inductor fuses with its neighbours into a kernel that
    streams the weight with both cores; the BLAS GEMV it replaces was the slowest part of a compiled batch-1
    decode step (benchmarks/decode.py measures the whole step)."""
    out = (weight.float() * x.reshape(1, -1).float()).sum(-1).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def _int8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """x @ (weight * scale)^T for an int8 weight. A compiled one-row product is a multiply + sum that inductor
    fuses into one kernel reading the int8 bytes (a quarter of float32's); elsewhere the weight is widened for
    the call, slower than float32, since int8 weights are a batch-1 decode option."""
    if scale is None:
        raise ValueError("an int8 weight needs its per-channel scale")
    if rows == 1 and torch.compiler.is_compiling() and not torch.is_grad_enabled():
        out = (weight * x.reshape(1, -1).float()).sum(-1) * scale
        out = out.view(*x.shape[:-1], weight.shape[0])
    else:
        out = F.linear(x.float(), weight.float()) * scale
    if bias is not None:
        out = out + bias
    return out.to(x.dtype)
