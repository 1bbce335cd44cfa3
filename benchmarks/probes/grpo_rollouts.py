"""Rollout throughput of GRPO's sampling call: G completions of each of P prompts in one batch, sampled (T=1,
top-p 1) to a fixed number of new tokens, as `GRPOTrainer.sample` runs it, through whatever `stream` this
checkout has. Run it from two checkouts in turn to compare them (the script only uses the public `stream`).

    python benchmarks/probes/grpo_rollouts.py --model runs/qs0/grpo/model [--prompts 4 --group 8 --new 96]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import statistics
import time
from pathlib import Path

import torch

from moelm.infer.generate import left_pad, stream
from moelm.infer.sampling import SamplingParams
from moelm.infer.text import TextGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="decode through the compiled step (warm-up builds)")
    args = parser.parse_args()
    generator = TextGenerator.from_pretrained(args.model)
    texts = [f"What is {a} + {b}? Think step by step." for a, b in ((12, 7), (35, 48), (101, 9), (66, 66))]
    encoded = [generator.tokenizer.encode(texts[i % len(texts)]).ids for i in range(args.prompts)]
    rows = [ids for ids in encoded for _ in range(args.group)]
    ids, mask = left_pad(rows, generator.model.config.pad_token_id or 0)
    options = {"attention_mask": mask, "eos_token_id": None}
    accepted = inspect.signature(
        importlib.import_module("moelm.infer.generate")._stream
    ).parameters  # this checkout's stream: per-row seeds or generators
    if "prefix_cache" in accepted:
        from moelm.infer.prefix_cache import PrefixCache
    if args.compile:
        from moelm.infer.compiled import compile_decode

        options["compiled"] = compile_decode(generator.model)
    seconds = []
    for repeat in range(args.repeats + 1):
        if "seeds" in accepted:
            options["seeds"] = [repeat * 1000 + row for row in range(len(rows))]
        else:
            options["generators"] = [torch.Generator().manual_seed(repeat * 1000 + r) for r in range(len(rows))]
        if "prefix_cache" in accepted:
            options["prefix_cache"] = PrefixCache()
        start = time.perf_counter()
        with torch.no_grad():
            produced = sum(
                s.tokens_BN.shape[1] for s in stream(generator.model, ids, args.new, SamplingParams(1.0), **options)
            )
        if repeat:  # the first is a warm-up
            seconds.append(time.perf_counter() - start)
    tokens = len(rows) * args.new
    print(
        json.dumps(
            {
                "rows": len(rows),
                "new_tokens": args.new,
                "steps": produced,
                "median_s": statistics.median(seconds),
                "rollout_tok_s": tokens / statistics.median(seconds),
            }
        )
    )


if __name__ == "__main__":
    main()
