"""`moelm plan` on DeepSeek-V3's published training layout, beside the figures its technical report states.

The layout (DeepSeek-V3 technical report, arXiv:2412.19437, section 3): 2048 H800 GPUs, 16-way pipeline
parallelism with DualPipe, 64-way expert parallelism across 8 nodes, ZeRO-1 data parallelism, no tensor
parallelism; sequences of 4096 tokens and a batch of 15360 sequences. The report states 180K H800 GPU hours per
trillion training tokens (1543 tokens/s per GPU) and that training fits without tensor parallelism. The
micro-batch size is not stated: one sequence per rank per micro-batch is assumed (128 rows over the 128
data-parallel ranks of a stage, 120 micro-batches per step). moelm's own conventions are planned (float32 master
weights, gradients and moments, bf16 activations, uniform routing with all-to-all rows in the activation dtype);
DeepSeek keeps bf16 moments, dispatches in FP8 and limits each token to 4 nodes. Prints one JSON object.

    python benchmarks/plan_v3.py
"""

from __future__ import annotations

import json

from moelm.config import load_config
from moelm.dist.plan import Layout, make_plan

REPORTED = {"tokens_per_s_per_gpu": 1e12 / (180e3 * 3600), "fits_80gb_without_tp": True, "gpus": 2048}


def main() -> None:
    config = load_config("v3-shape")
    base = Layout(
        gpus=2048,
        pipeline_degree=16,
        expert_degree=64,
        sharding="zero1",
        schedule="dualpipev",
        batch_size=128,
        grad_accum=120,
        seq_len=4096,
        activation_bytes=2,
    )
    rows = {}
    for label, layout in (("as published", base), ("with full activation checkpointing", _full(base))):
        plan = make_plan(config, layout, "h800", 400.0, name="v3-shape")
        data = plan.to_dict()
        rows[label] = {
            "peak_memory_gib": plan.peak_memory / 2**30,
            "state_gib_rank0": plan.ranks[0].state.total / 2**30,
            "activations_gib_peak": max(rank.activations + rank.recompute for rank in plan.ranks) / 2**30,
            "fits_80gb": plan.fits,
            "step_s_serial": plan.step_s,
            "step_s_overlapped": plan.overlapped_step_s,
            "tokens_per_s_per_gpu_serial_bound": data["tokens_per_s_per_gpu"],
            "tokens_per_s_per_gpu_overlapped_bound": plan.tokens_per_step / plan.overlapped_step_s / 2048,
            "a2a_gb_per_rank_step": max(rank.a2a_bytes for rank in plan.ranks) / 1e9,
            "compute_s_per_step": max(rank.compute_s for rank in plan.ranks),
        }
    print(json.dumps({"reported": REPORTED, "moelm_plan": rows}, indent=1))


def _full(layout: Layout) -> Layout:
    from dataclasses import replace

    return replace(layout, checkpointing="full")


if __name__ == "__main__":
    main()
