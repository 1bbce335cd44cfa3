"""Prefill with few-row linears as weight @ rows^T (moelm.model.layers) vs plain F.linear, same model and prompt.

Prefill's routed experts see a handful of rows each; for 2-6 rows moelm multiplies weight @ rows^T with the rows
contiguous, because the BLAS kernel behind rows @ weight^T streams the weight slowly at those sizes. This times
one prompt's cached prefill both ways (the F.linear variant swaps the function out for the run), in turn, and
checks the logits agree.

    python benchmarks/probes/prefill_linear.py [--preset small --prompt 64 --rounds 7]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import moelm.model.layers as layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import interleaved_medians  # noqa: E402

from moelm import MoELM, load_config
from moelm.model.cache import KVCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    config = load_config(args.preset)
    torch.manual_seed(0)
    model = MoELM(config).eval()
    ids = torch.randint(3, config.vocab_size, (1, args.prompt))
    few_row = layers._cpu_linear
    logits = {}

    def prefill(name: str, linear) -> None:  # noqa: ANN001
        def run() -> None:
            layers._cpu_linear = linear
            try:
                cache = KVCache(config, 1, args.prompt)
                logits[name] = model(ids, cache=cache, logits_to_keep=1).logits
            finally:
                layers._cpu_linear = few_row

        return run

    steps = {
        "few_row_mm": prefill("few_row_mm", few_row),
        "f_linear": prefill("f_linear", lambda x, weight, bias, rows: F.linear(x, weight, bias)),
    }
    with torch.inference_mode():
        seconds = interleaved_medians(steps, args.rounds)
    torch.testing.assert_close(logits["few_row_mm"], logits["f_linear"], rtol=1e-4, atol=1e-4)
    ms = {name: 1000 * value for name, value in seconds.items()}
    print(f"{args.preset} prefill of {args.prompt} tokens: {ms['few_row_mm']:.1f} ms, F.linear {ms['f_linear']:.1f} ms")
    print(
        json.dumps(
            {
                "few_row_mm_ms": round(ms["few_row_mm"], 2),
                "f_linear_ms": round(ms["f_linear"], 2),
                "f_linear_over_few_row_mm": round(ms["f_linear"] / ms["few_row_mm"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
