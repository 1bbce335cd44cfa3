"""Why training slows as experts grow at fixed top-k: one grouped GEMM (forward + backward) at 8 vs 64 experts.

The same 8,192 rows (8 x 256 tokens, top-4) go through one expert projection (H=256 -> 256) as torch's
grouped_mm, and as a padded batched GEMM (every expert's slab padded to the largest), timed in turn. With 64
experts each slab holds ~128 rows instead of ~1,024, which BLAS runs less efficiently.

    python benchmarks/probes/grouped_gemm_slabs.py [--experts 8,64 --repeats 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import interleaved_medians  # noqa: E402


def steps(experts: int, rows: int, hidden: int, out: int) -> dict[str, object]:
    """grouped_mm and padded bmm, each a forward and a backward on the same rows and weights."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(experts), rows, replacement=True, generator=generator)
    counts = counts.bincount(minlength=experts)
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(experts, out, hidden, requires_grad=True)
    grad = torch.randn(rows, out)
    widest = int(counts.max())
    slots = torch.cat([torch.arange(c) + e * widest for e, c in enumerate(counts.tolist())])

    def grouped() -> None:
        torch._grouped_mm(x, w.transpose(1, 2), offs=offsets).backward(grad)
        x.grad = w.grad = None

    def padded() -> None:
        slabs = x.new_zeros(experts * widest, hidden).index_copy(0, slots, x).view(experts, widest, hidden)
        torch.bmm(slabs, w.transpose(1, 2)).view(-1, out).index_select(0, slots).backward(grad)
        x.grad = w.grad = None

    return {"grouped_mm": grouped, "padded_bmm": padded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="8,64")
    parser.add_argument("--rows", type=int, default=8 * 256 * 4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    results = {}
    for experts in (int(e) for e in args.experts.split(",")):
        seconds = interleaved_medians(steps(experts, args.rows, 256, 256), args.repeats)
        for name, value in seconds.items():
            results[f"E{experts}_{name}_ms"] = round(1000 * value, 2)
        print(f"{experts} experts: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in seconds.items()), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
