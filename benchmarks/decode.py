"""Decode throughput: moelm's cached engine vs transformers' generate on the same weights.

For each preset, dtype and batch size: prompt of 64 tokens, 128 new tokens, greedy, no EOS; moelm eager and
with `compile=True` (the decode step captured as one graph; compile time excluded by a warm-up run of the same
shape), transformers as its users run it; the three are timed in turn, round after round (median of
`--repeats`), so machine drift hits them alike. Tokens are checked equal to transformers' (in float32). Also moelm
with MTP speculation (acceptance rate reported; an untrained MTP head rarely agrees, so speculation only pays
off on trained models) and the decode roofline: bytes a step must read (active parameters except the
embedding table, of which one row per token is read, plus the KV cache) over the read bandwidth (half the copy
bandwidth measured in this run).

    python benchmarks/decode.py [--presets tiny,small] [--dtypes float32,bfloat16] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from common import copy_bandwidth, interleaved_medians, timed, transformers_twin

from moelm import MoELM, load_config
from moelm.infer import GenerationStats, compile_decode, generate
from moelm.model.cache import KVCache


def recorded(outputs: dict[str, torch.Tensor], name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """fn as a timed step that keeps its latest output under `name` (tokens are compared after timing)."""
    return lambda: outputs.__setitem__(name, fn())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()

    bandwidth = copy_bandwidth()
    results: dict[str, float] = {"copy_gb_s": bandwidth / 1e9}
    print(
        f"{'preset':<6} {'dtype':<9} {'batch':>5} {'eager tok/s':>12} {'compiled':>9} {'HF tok/s':>9} "
        f"{'eager/HF':>8} {'comp/HF':>8} {'roofline':>9}"
    )
    for preset in args.presets.split(","):
        config = load_config(preset)
        torch.manual_seed(0)
        base = MoELM(config).eval()
        hf_models = {d: transformers_twin(base, dtype=getattr(torch, d)).eval() for d in args.dtypes.split(",")}
        cache = KVCache(config, 1, 1)
        expanded = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
        results[f"{preset}_kv_bytes_per_token_mla"] = cache.bytes_per_token
        results[f"{preset}_kv_bytes_per_token_expanded"] = expanded * 4
        for dtype_name, hf in hf_models.items():
            dtype = getattr(torch, dtype_name)
            ours = base.to(dtype)
            compiled = compile_decode(ours)  # built lazily per (batch, capacity): the warm-up round compiles
            table = 0 if config.tie_word_embeddings else base.embed_tokens.weight.numel()
            streamed = ours.num_active_parameters() - table
            active_bytes = streamed * torch.finfo(dtype).bits // 8
            for batch in (int(b) for b in args.batches.split(",")):
                ids = torch.randint(3, config.vocab_size, (batch, args.prompt))
                outputs: dict[str, torch.Tensor] = {}
                steps = {
                    "eager": recorded(outputs, "eager", lambda ids=ids, ours=ours: generate(ours, ids, args.new)),
                    # the warm-up call compiles this (batch, capacity, dtype) graph, outside the timing
                    "compiled": recorded(
                        outputs,
                        "compiled",
                        lambda ids=ids, ours=ours, compiled=compiled: generate(ours, ids, args.new, compiled=compiled),
                    ),
                    "hf": recorded(
                        outputs,
                        "hf",
                        lambda ids=ids, hf=hf: hf.generate(
                            ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, eos_token_id=None
                        ),
                    ),
                }
                with torch.inference_mode():
                    seconds = interleaved_medians(steps, args.repeats)
                t_ours, t_comp, t_hf = seconds["eager"], seconds["compiled"], seconds["hf"]
                out_ours, out_comp, out_hf = outputs["eager"], outputs["compiled"], outputs["hf"]
                same = bool(torch.equal(out_ours, out_hf)) and bool(torch.equal(out_comp, out_hf))
                tokens = batch * args.new
                kv_bytes = cache.bytes_per_token // 4 * torch.finfo(dtype).bits // 8 * (args.prompt + args.new // 2)
                limit = bandwidth / 2 / (active_bytes + batch * kv_bytes) * batch  # reads only: half a copy
                key = f"{preset}_{dtype_name}_b{batch}"
                row = {
                    "moelm_tok_s": tokens / t_ours,
                    "compiled_tok_s": tokens / t_comp,
                    "hf_tok_s": tokens / t_hf,
                    "ratio": t_hf / t_ours,
                    "compiled_ratio": t_hf / t_comp,
                    "roofline_frac": tokens / min(t_ours, t_comp) / limit,
                    "same_tokens": float(same),
                }
                results.update({f"{key}_{k}": v for k, v in row.items()})
                print(
                    f"{preset:<6} {dtype_name:<9} {batch:>5} {row['moelm_tok_s']:>12,.1f} "
                    f"{row['compiled_tok_s']:>9,.1f} {row['hf_tok_s']:>9,.1f} "
                    f"{row['ratio']:>7.2f}x {row['compiled_ratio']:>7.2f}x "
                    f"{row['roofline_frac']:>8.1%}" + ("" if same else "  (tokens differ)"),
                    flush=True,
                )
            if config.num_nextn_predict_layers and dtype == torch.float32:
                ids = torch.randint(3, config.vocab_size, (1, args.prompt))
                stats = GenerationStats()
                with torch.inference_mode():
                    t_spec, _ = timed(lambda: generate(ours, ids, args.new, speculative=True, stats=stats))  # noqa: B023
                results[f"{preset}_speculative_tok_s"] = args.new / t_spec
                results[f"{preset}_speculative_acceptance"] = stats.acceptance_rate
                rate = stats.acceptance_rate
                print(f"{preset:<6} {'mtp-spec':<9} {1:>5} {args.new / t_spec:>12,.1f}  acceptance {rate:.0%}")
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
