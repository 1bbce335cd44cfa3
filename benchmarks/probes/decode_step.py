"""One compiled decode step, AOTInductor package vs torch.compile, on the same model and cache.

Isolates what `compile_decode`'s two backends differ in — the call path around the same kind of kernels — from
prefill and sampling, which `benchmarks/decode.py` includes. Both steps are built first (untimed), then timed in
turn over many steps; median milliseconds per step and the ratio.

    python benchmarks/probes/decode_step.py [--preset small --batch 1 --steps 100 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import interleaved_medians  # noqa: E402

from moelm import MoELM, load_config
from moelm.infer.compiled import compile_decode
from moelm.infer.engine import slot_bucket
from moelm.model.cache import KVCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="decode steps per timed call")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.preset)
    torch.manual_seed(0)
    model = MoELM(config).eval()
    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt))
    cache = KVCache(config, args.batch, slot_bucket(args.prompt + 1))
    token = ids[:, -1:]
    steps, logits = {}, {}
    with torch.inference_mode():
        model(ids, cache=cache, logits_to_keep=1)
        for backend in ("aot", "inductor"):
            step = compile_decode(model, backend).step()
            logits[backend] = step(token, cache)[0]  # builds the step for this shape

            def run(step=step) -> None:  # noqa: ANN001
                for _ in range(args.steps):
                    step(token, cache)  # reads the cache only: every call does the same work

            steps[backend] = run
        torch.testing.assert_close(logits["aot"], logits["inductor"])
        seconds = interleaved_medians(steps, args.rounds)
    ms = {backend: 1000 * value / args.steps for backend, value in seconds.items()}
    print(f"{args.preset} batch {args.batch}: aot {ms['aot']:.2f} ms/step, torch.compile {ms['inductor']:.2f} ms/step")
    results = {"aot_ms_per_step": ms["aot"], "inductor_ms_per_step": ms["inductor"]}
    results["inductor_over_aot"] = ms["inductor"] / ms["aot"]
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
