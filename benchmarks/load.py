"""Load time and peak memory of a saved model directory: moelm vs transformers' from_pretrained.

The small preset is saved once in three layouts (one float32 file, float32 shards, FP8 block-scaled) and each
loader loads each layout in its own fresh subprocess, round-robin, so both see the same page cache and drift.
Peak memory is the rise of the peak resident set (VmHWM, reset after the imports) over the resident set before
the load, as a multiple of the loaded weights' bytes. The page-cache read speed of the same files (one read of
every byte) is the floor a loader cannot beat.

    python benchmarks/load.py [--preset small --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moelm import MoELM, load_config

LOADER = r"""
import json, sys, time
from pathlib import Path
import torch
loader, path = sys.argv[1], sys.argv[2]
if loader == "moelm":
    from moelm import MoELM
    load = lambda: MoELM.from_pretrained(path, dtype=torch.float32)
else:
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
def status(key):
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) * 1024
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"seconds": seconds, "peak_rise_x_weights": (status("VmHWM") - before) / weights}))
"""


def load_once(loader: str, path: Path) -> dict[str, float] | str:
    """One load in a fresh process: its seconds and peak-memory rise, or the error's last line."""
    result = subprocess.run([sys.executable, "-c", LOADER, loader, str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        return (result.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return json.loads(result.stdout.strip().splitlines()[-1])


def page_cache_read_seconds(path: Path) -> float:
    """Seconds to read every weight file once from the (warm) page cache."""
    start = time.perf_counter()
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as handle:
            while handle.read(64 * 2**20):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MoELM(load_config(args.preset))
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with tempfile.TemporaryDirectory() as root:
        layouts = {
            "single": dict(max_shard_bytes="5GB"),
            "sharded": dict(max_shard_bytes=weight_bytes // 4 + 1),
            "fp8": dict(max_shard_bytes="5GB", quantization="fp8"),
        }
        for name, options in layouts.items():
            model.save_pretrained(Path(root) / name, **options)
        del model
        results: dict[str, dict[str, list]] = {name: {"moelm": [], "transformers": []} for name in layouts}
        floors = {name: [] for name in layouts}
        for _ in range(args.repeats):
            for name in layouts:
                directory = Path(root) / name
                floors[name].append(page_cache_read_seconds(directory))
                for loader in ("moelm", "transformers"):
                    results[name][loader].append(load_once(loader, directory))

    table = {}
    for name, by_loader in results.items():
        row: dict[str, object] = {"page_cache_read_s": round(statistics.median(floors[name]), 4)}
        for loader, runs in by_loader.items():
            good = [r for r in runs if isinstance(r, dict)]
            if not good:
                row[loader] = {"error": runs[0]}
                continue
            row[loader] = {
                "seconds": round(statistics.median(r["seconds"] for r in good), 4),
                "peak_rise_x_weights": round(max(r["peak_rise_x_weights"] for r in good), 3),
            }
        if isinstance(row["moelm"], dict) and "seconds" in row["moelm"] and "seconds" in row["transformers"]:
            row["speedup_vs_transformers"] = round(row["transformers"]["seconds"] / row["moelm"]["seconds"], 2)
        table[name] = row
    summary = {"preset": args.preset, "float32_weight_gib": round(weight_bytes / 1024**3, 3), "layouts": table}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
