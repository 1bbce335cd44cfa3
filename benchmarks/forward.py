"""Forward throughput of moelm vs transformers' DeepseekV3ForCausalLM on the same weights and inputs.

For each preset and dtype: build a moelm model, save it as an HF directory, load that directory with
transformers, check the logits agree, then time both forwards (no grad, eval mode) in the same process.
The last stdout line is one JSON object with every figure and the moelm / transformers ratios.

    python benchmarks/forward.py [--presets tiny,small] [--dtypes float32,bfloat16] [--batch 8 --seq 256]
"""

from __future__ import annotations

import argparse
import json

import torch
from common import median_seconds, transformers_twin

from moelm import MoELM, load_config


def time_forward(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds per forward call (two warm-up calls)."""
    with torch.inference_mode():
        return median_seconds(lambda: model(ids), repeats, warmup=2)


def bench_preset(preset: str, dtype_name: str, batch: int, seq: int, repeats: int) -> dict[str, float]:
    """Tokens/s of both implementations for one preset and dtype, plus their max logit difference."""
    dtype = getattr(torch, dtype_name)
    config = load_config(preset).replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = MoELM(config)
    theirs = transformers_twin(ours, dtype=dtype).eval()
    ours = ours.to(dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.inference_mode():
        diff = (ours(ids).logits.float() - theirs(ids).logits.float()).abs().max().item()
    tokens = batch * seq
    ours_tps = tokens / time_forward(ours, ids, repeats)
    theirs_tps = tokens / time_forward(theirs, ids, repeats)
    return {"moelm_tok_s": ours_tps, "hf_tok_s": theirs_tps, "ratio": ours_tps / theirs_tps, "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import transformers

    results: dict[str, float | str | int] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "seq": args.seq,
    }
    print(f"{'preset':<8} {'dtype':<9} {'moelm tok/s':>12} {'HF tok/s':>12} {'ratio':>7} {'max|dlogit|':>12}")
    for preset in args.presets.split(","):
        for dtype_name in args.dtypes.split(","):
            row = bench_preset(preset, dtype_name, args.batch, args.seq, args.repeats)
            print(
                f"{preset:<8} {dtype_name:<9} {row['moelm_tok_s']:>12,.0f} {row['hf_tok_s']:>12,.0f} "
                f"{row['ratio']:>6.2f}x {row['max_abs_diff']:>12.2e}",
                flush=True,
            )
            for key, value in row.items():
                results[f"{preset}_{dtype_name}_{key}"] = round(value, 6 if key == "max_abs_diff" else 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
