"""Does MKL give two processes the same bits? GEMM time and cross-process agreement per MKL_CBWR setting.

For each setting: the median time of a 512x1024x1024 and an 8x1024x1024 float32 GEMM (2 threads, in a child
process, since MKL reads MKL_CBWR once at load), and `--pairs` pairs of fresh one-step `moelm pretrain` runs of
the tests' tiny recipe whose step-1 weights are compared bit for bit. The README's figures were measured with two
`yes` processes loading both cores (`--load`); on an idle machine the pairs usually agree under every setting.

    python benchmarks/probes/mkl_reproducibility.py [--settings "AUTO;AUTO,STRICT;COMPATIBLE"] [--pairs 10] [--load]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GEMM = """
import statistics, time, torch
torch.set_num_threads(2)
out = {}
for m in (512, 8):
    a, b = torch.randn(m, 1024), torch.randn(1024, 1024)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(30):
        start = time.perf_counter(); a @ b; times.append(time.perf_counter() - start)
    out[f"gemm_{m}x1024x1024_ms"] = statistics.median(times) * 1e3
print(__import__("json").dumps(out))
"""


def pretrain(out: Path, env: dict[str, str]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_RUN

    args = [sys.executable, "-m", "moelm.cli", "pretrain", "--out", str(out)]
    for item in [*TINY_RUN, "train.max_steps=1", "train.save_every=1"]:
        args += ["--set", item]
    subprocess.run(args, check=True, capture_output=True, env=env)


def step_one(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(next((out / "checkpoints" / "step-1").rglob("*.safetensors")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="AUTO;COMPATIBLE", help="MKL_CBWR values, separated by ;")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--load", action="store_true", help="keep both cores busy with `yes` meanwhile")
    args = parser.parse_args()
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(2)] if args.load else []
    results: dict[str, float] = {}
    try:
        for setting in args.settings.split(";"):
            env = {**os.environ, "MKL_CBWR": setting}
            timing = json.loads(
                subprocess.run([sys.executable, "-c", GEMM], env=env, capture_output=True, text=True, check=True).stdout
            )
            differing = 0
            for _ in range(args.pairs):
                with tempfile.TemporaryDirectory() as work:
                    first, second = Path(work) / "straight", Path(work) / "interrupted"
                    pretrain(first, env)
                    pretrain(second, env)
                    a, b = step_one(first), step_one(second)
                    differing += any(not a[name].equal(b[name]) for name in a)
            row = {**timing, "pairs_differing": differing, "pairs": args.pairs}
            print(setting, row, flush=True)
            results.update({f"{setting}_{key}": value for key, value in row.items()})
    finally:
        for hog in hogs:
            hog.kill()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
