"""What bounds the compiled batch-1 decode step: dependent vs independent matrix-vector products.

A batch-1 decode step streams its weights through a chain of matrix-vector products, each needing the one before.
This compiles two graphs the way moelm's decode step is compiled (inductor, C++ wrapper, a product written as
multiply + sum, as `moelm.model.kernels.cpu` does for one-row linears): `--count` products of `--size` x `--size`
distinct weights, once chained (each input is the previous output) and once independent (all on one input).
Same bytes, same arithmetic; timed in turn. The gap is what synchronising between dependent products costs.

    python benchmarks/probes/matvec_chain.py [--size 512 --count 80 --rounds 7]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import interleaved_medians  # noqa: E402


def chained(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    for weight in weights:
        x = torch.tanh((weight * x.reshape(1, -1)).sum(-1))
    return x


def independent(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.tanh((weight * x.reshape(1, -1)).sum(-1)) for weight in weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--count", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="graph calls per timed round")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(args.size, args.size) / args.size**0.5 for _ in range(args.count)]  # distinct: no reuse
    x = torch.randn(args.size)
    options = {"cpp_wrapper": True}
    graphs = {
        "chained": torch.compile(chained, dynamic=False, options=options),
        "independent": torch.compile(independent, dynamic=False, options=options),
    }
    steps = {}
    with torch.inference_mode():
        for name, graph in graphs.items():
            graph(x, weights)  # compile outside the timing

            def run(graph=graph) -> None:  # noqa: ANN001
                for _ in range(args.calls):
                    graph(x, weights)

            steps[name] = run
        seconds = interleaved_medians(steps, args.rounds)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    results = {}
    for name, value in seconds.items():
        per_call = value / args.calls
        gb_s, us = nbytes / per_call / 1e9, per_call / args.count * 1e6
        results[f"{name}_gb_s"], results[f"{name}_us_per_product"] = gb_s, us
        print(f"{name:12s} {gb_s:6.1f} GB/s  {us:6.1f} us per product")
    results["chained_extra_us_per_product"] = results["chained_us_per_product"] - results["independent_us_per_product"]
    results["independent_over_chained"] = results["independent_gb_s"] / results["chained_gb_s"]
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
