"""Why the absorbed MLA decode folds heads into one bmm: one decode step of the small preset over a long cache,
the current step against the former formulation (per-head queries broadcast against the shared latent cache,
which makes matmul copy the cache once per head), timed in turn.

    python benchmarks/probes/absorbed_decode.py [--batch 8 --cached 1024 --repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from unittest import mock

import torch

from moelm import MoELM, load_config
from moelm.infer import rows
from moelm.infer.generate import left_pad
from moelm.model import attention
from moelm.model.cache import KVCache


def broadcast_bmm(x_BNTa: torch.Tensor, y_Bab: torch.Tensor) -> torch.Tensor:
    """The former product: y gains a head dimension and matmul broadcasts it."""
    return x_BNTa @ y_Bab.unsqueeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cached", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config("small")
    model = MoELM(config).eval()
    ids, mask = left_pad([[5] * args.cached] * args.batch, 0)
    cache = KVCache(config, args.batch, 2 * args.cached + args.repeats * 4, dtype=torch.float32)
    times: dict[str, list[float]] = {"folded": [], "broadcast": []}
    with torch.inference_mode():
        model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        tokens = torch.full((args.batch, 1), 7)
        outputs = {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name in times:
                patch = broadcast_bmm if name == "broadcast" else attention._per_head_bmm
                with mock.patch.object(attention, "_per_head_bmm", patch):
                    view = rows.view(cache, args.batch, cache.length + 1)
                    start = time.perf_counter()
                    outputs[name] = model.decode_step(tokens, view)
                    times[name].append(time.perf_counter() - start)
        torch.testing.assert_close(outputs["folded"], outputs["broadcast"], rtol=1e-4, atol=1e-4)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    result = {
        "probe": "absorbed_decode",
        "preset": "small",
        "batch": args.batch,
        "cached_tokens": args.cached,
        "threads": torch.get_num_threads(),
        "step_ms": {name: round(1e3 * value, 1) for name, value in medians.items()},
        "speedup": round(medians["broadcast"] / medians["folded"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
