"""MoE layer forward+backward throughput: moelm vs transformers' DeepseekV3MoE vs a dense SwiGLU.

Same weights and inputs in one process, the three timed in turn, round after round. transformers runs its
experts with the `grouped_mm` implementation, as it does inside DeepseekV3ForCausalLM (the bare module would
fall back to a slower loop). The dense SwiGLU has the same active parameters ((k + shared) * I intermediate
width). Rooflines: at large T the achieved FLOP/s of the whole moelm layer over a large GEMM's FLOP/s measured
in this run; at small T the time the weight and gradient bytes need at the measured copy bandwidth over the
measured time.

    python benchmarks/moe_layer.py [--tokens 4096,64] [--dtypes float32,bfloat16] [--experts 64 --top-k 6]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from common import add_allocator_flag, apply_allocator_flag, copy_bandwidth, interleaved_medians

from moelm import ModelConfig
from moelm.model.kernels.cpu import linear
from moelm.model.layers import SwiGLU
from moelm.model.moe import MoE


def fwd_bwd_step(module: torch.nn.Module, x: torch.Tensor, unpack: bool) -> Callable[[], None]:
    """One forward + backward (input and parameter gradients) into fresh gradient buffers."""
    grad_out = torch.randn_like(x)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        (out[0] if unpack else out).backward(grad_out)

    return step


def matmul_flops_per_s(dtype: torch.dtype, size: int = 2048) -> float:
    """Peak-ish GEMM throughput through the same linear() the experts use."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    linear(a, b)
    start = time.perf_counter()
    for _ in range(3):
        linear(a, b)
    return 3 * 2 * size**3 / (time.perf_counter() - start)


def build_pair(args: argparse.Namespace, dtype: torch.dtype):
    """moelm MoE and transformers DeepseekV3MoE with identical weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    shape = dict(
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
    )
    ours = MoE(ModelConfig(**shape))
    hf_config = DeepseekV3Config(**shape)
    hf_config._experts_implementation = "grouped_mm"
    theirs = DeepseekV3MoE(hf_config)
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        theirs.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        theirs.experts.down_proj.copy_(ours.experts.down_proj)
        gate, up = ours.shared_experts.gate_up_proj.weight.chunk(2)
        theirs.shared_experts.gate_proj.weight.copy_(gate)
        theirs.shared_experts.up_proj.weight.copy_(up)
        theirs.shared_experts.down_proj.weight.copy_(ours.shared_experts.down_proj.weight)
    dense = SwiGLU(args.hidden, (args.top_k + 1) * args.intermediate)
    return ours.to(dtype), theirs.to(dtype), dense.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,64")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    add_allocator_flag(parser)
    args = parser.parse_args()
    apply_allocator_flag(args)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    results: dict[str, float] = {"copy_gb_s": bandwidth / 1e9}
    header = (
        f"{'T':>5} {'dtype':<9} {'moelm tok/s':>12} {'HF tok/s':>10} {'dense tok/s':>12} {'vs HF':>6} {'roofline':>9}"
    )
    print(header)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        peak = matmul_flops_per_s(dtype)
        results[f"{dtype_name}_matmul_gflop_s"] = peak / 1e9
        ours, theirs, dense = build_pair(args, dtype)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(1, tokens, args.hidden, dtype=dtype, requires_grad=True)
            with torch.no_grad():
                diff = (ours(x)[0].float() - theirs(x).float()).abs().max().item()
            steps = {
                "ours": fwd_bwd_step(ours, x, unpack=True),
                "hf": fwd_bwd_step(theirs, x, unpack=False),
                "dense": fwd_bwd_step(dense, x, unpack=False),
            }
            seconds = interleaved_medians(steps, args.repeats)
            t_ours, t_hf, t_dense = seconds["ours"], seconds["hf"], seconds["dense"]
            # fwd+bwd FLOPs: 3 x forward; forward 6*H*I per (token, expert) pair incl. shared, plus the router.
            pairs = tokens * (args.top_k + 1)
            flops = 3 * (pairs * 6 * args.hidden * args.intermediate + 2 * tokens * args.hidden * args.experts)
            if tokens >= 1024:
                roofline = flops / t_ours / peak
            else:
                with torch.no_grad():
                    touched = ours.gate(x.detach().reshape(-1, args.hidden)).tokens_per_expert_E.gt(0).sum().item()
                weight_bytes = (touched + 1) * 3 * args.hidden * args.intermediate * x.element_size()
                roofline = (2 * weight_bytes / bandwidth) / t_ours  # read weights, write their gradients
            key = f"T{tokens}_{dtype_name}"
            row = {
                "moelm_tok_s": tokens / t_ours,
                "hf_tok_s": tokens / t_hf,
                "dense_tok_s": tokens / t_dense,
                "ratio_vs_hf": t_hf / t_ours,
                "ratio_vs_dense": t_dense / t_ours,
                "roofline_frac": roofline,
                "max_abs_diff": diff,
            }
            results.update({f"{key}_{name}": value for name, value in row.items()})
            print(
                f"{tokens:>5} {dtype_name:<9} {row['moelm_tok_s']:>12,.0f} {row['hf_tok_s']:>10,.0f} "
                f"{row['dense_tok_s']:>12,.0f} {row['ratio_vs_hf']:>5.2f}x {roofline:>8.0%}",
                flush=True,
            )
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
