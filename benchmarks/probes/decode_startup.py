"""Start-up of a compiled decode step in a fresh process: building its AOTInductor package vs loading it from the
on-disk package cache (moelm.infer.aot).

Each measurement is a new Python process (nothing warm in memory) that makes a model of the preset, prefills a
prompt and times its first compiled decode step; the first process builds into an empty cache directory, the
following ones find the package there. Weights are random and differ per process (another seed), as another
checkpoint of the same architecture would.

    python benchmarks/probes/decode_startup.py [--preset tiny --loads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

FIRST_STEP = """
import sys, time, torch
from moelm import MoELM, load_config
from moelm.infer.aot import AotDecodeStep
from moelm.model.cache import KVCache
torch.manual_seed(int(sys.argv[2]))
config = load_config(sys.argv[1])
model = MoELM(config).eval()
cache = KVCache(config, 1, 128)
ids = torch.randint(3, config.vocab_size, (1, 16))
with torch.inference_mode():
    model(ids, cache=cache)
    start = time.perf_counter()
    step = AotDecodeStep(model)
    logits = step(ids[:, -1:], cache)[0]
    seconds = time.perf_counter() - start
    assert torch.allclose(logits, model.decode_logits(ids[:, -1:], cache)[0], atol=1e-4)
print(seconds, step.built)
"""


def first_step_seconds(preset: str, seed: int, cache_dir: str) -> tuple[float, int]:
    env = {**os.environ, "MOELM_AOT_CACHE": cache_dir}
    result = subprocess.run(
        [sys.executable, "-c", FIRST_STEP, preset, str(seed)], env=env, capture_output=True, text=True, check=True
    )
    seconds, built = result.stdout.split()[-2:]
    return float(seconds), int(built)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--loads", type=int, default=2, help="processes that load the cached package")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        build, built = first_step_seconds(args.preset, 0, cache_dir)
        assert built == 1, "the first process should have built the package"
        loads = []
        for seed in range(1, args.loads + 1):
            seconds, built = first_step_seconds(args.preset, seed, cache_dir)
            assert built == 0, "a later process should have loaded the cached package"
            loads.append(seconds)
    load = sorted(loads)[len(loads) // 2]
    print(f"{args.preset}: first compiled step {build:.1f} s building the package, {load:.2f} s loading it")
    print(json.dumps({"build_s": round(build, 3), "load_s": round(load, 3), "build_over_load": round(build / load, 1)}))


if __name__ == "__main__":
    main()
