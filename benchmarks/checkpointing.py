"""Peak activation memory and step time per activation_checkpointing mode (none | full | moe).

Each mode runs in its own subprocess so peak memory is that mode's alone: on CPU the peak resident set
(ru_maxrss) minus the resident set once the model, optimizer state and gradients exist (a warm-up step
allocates them); on CUDA torch's peak allocated bytes minus the same baseline.

    python benchmarks/checkpointing.py [--preset small --batch 4 --seq 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from moelm import MoELM, load_config
from moelm.config import MoEOptions

MODES = ("none", "full", "moe")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def run_mode(args: argparse.Namespace) -> dict[str, float]:
    """One mode: warm-up step, then timed steps; returns peak activation bytes and median step seconds."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = load_config(args.preset)
    torch.manual_seed(0)
    model = MoELM(config, MoEOptions(activation_checkpointing=args.mode)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradient buffers so the baseline includes them

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _rss_bytes()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"peak_activation_mb": peak / 2**20, "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mode", choices=MODES, help="internal: run one mode and print its JSON")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    results: dict[str, float] = {}
    print(f"{'mode':<6} {'peak activation MB':>19} {'step s':>8}")
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--preset", args.preset]
        command += ["--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        results.update({f"{mode}_{k}": v for k, v in row.items()})
        print(f"{mode:<6} {row['peak_activation_mb']:>19,.0f} {row['step_s']:>8.2f}", flush=True)
    for mode in ("full", "moe"):
        results[f"{mode}_memory_saving"] = (
            1 - results[f"{mode}_peak_activation_mb"] / results["none_peak_activation_mb"]
        )
        results[f"{mode}_time_overhead"] = results[f"{mode}_step_s"] / results["none_step_s"] - 1
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
