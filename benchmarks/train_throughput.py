"""Training tokens/s and MFU: moelm vs transformers' DeepseekV3ForCausalLM, same config, data and optimizer.

Both models start from the same weights (moelm saves, transformers loads), see the same random batches and
step with AdamW (fused, the one-flag option for both), timed in turn step after step. float32, then bf16
autocast on both. MFU uses the FLOPs-per-token formula of references §6 over a float32 GEMM's throughput
measured in this run.

    python benchmarks/train_throughput.py [--preset small --batch 4 --seq 256 --steps 4 --compile]
"""

from __future__ import annotations

import argparse
import json

import torch
from common import add_allocator_flag, apply_allocator_flag, interleaved_medians, training_step, transformers_twin

from moelm import MoELM, load_config
from moelm.train.trainer import flops_per_token, measured_peak_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", default="float32,bf16-autocast")
    parser.add_argument("--compile", action="store_true", help="also time moelm under torch.compile (one flag)")
    add_allocator_flag(parser)
    args = parser.parse_args()
    apply_allocator_flag(args)
    config = load_config(args.preset).replace(num_nextn_predict_layers=0)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq)
    batches = [torch.randint(0, config.vocab_size, shape, generator=generator) for _ in range(args.steps)]
    peak = measured_peak_flops(2048)
    tokens = args.batch * args.seq
    results: dict[str, float] = {"float32_matmul_gflop_s": peak / 1e9}
    print(f"{'mode':<14} {'moelm tok/s':>12} {'HF tok/s':>9} {'ratio':>6} {'moelm MFU':>10}")
    for mode in args.modes.split(","):
        autocast = mode == "bf16-autocast"
        torch.manual_seed(0)
        ours = MoELM(config).train()
        theirs = transformers_twin(ours).train()
        per_token = flops_per_token(ours, args.seq)
        steps = {"ours": training_step(ours, batches, autocast), "hf": training_step(theirs, batches, autocast)}
        if args.compile:
            # compiled in interleaved_medians' warm-up call, outside the timing
            steps["compiled"] = training_step(torch.compile(ours), batches, autocast)
        seconds = interleaved_medians(steps, args.steps)
        t_ours, t_hf = seconds["ours"], seconds["hf"]
        row = {
            "moelm_tok_s": tokens / t_ours,
            "hf_tok_s": tokens / t_hf,
            "ratio": t_hf / t_ours,
            "moelm_mfu": tokens / t_ours * per_token / peak,
            "hf_mfu": tokens / t_hf * per_token / peak,
        }
        if args.compile:
            t_compiled = seconds["compiled"]
            row["moelm_compiled_tok_s"] = tokens / t_compiled
            row["compiled_ratio"] = t_hf / t_compiled
            row["moelm_compiled_mfu"] = tokens / t_compiled * per_token / peak
        results.update({f"{mode}_{k}": v for k, v in row.items()})
        print(
            f"{mode:<14} {row['moelm_tok_s']:>12,.0f} {row['hf_tok_s']:>9,.0f} {row['ratio']:>5.2f}x "
            f"{row['moelm_mfu']:>9.1%}",
            flush=True,
        )
        if args.compile:
            print(
                f"{'  compiled':<14} {row['moelm_compiled_tok_s']:>12,.0f} {'':>9} {row['compiled_ratio']:>5.2f}x "
                f"{row['moelm_compiled_mfu']:>9.1%}",
                flush=True,
            )
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
