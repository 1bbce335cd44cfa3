"""Is an interrupted and resumed run bitwise the uninterrupted one? The tiny recipe of the tests (30 steps,
checkpoints every 5), one straight run, then runs stopped with SIGTERM at several delays after their first
logged step and resumed; each line says where the run stopped and whether the final weights equal the
straight run's. Run it on an idle machine and again beside a CPU hog (`yes > /dev/null &`) to compare.

    python benchmarks/probes/resume_determinism.py [--delays 0,0.2,0.5,0.8,1.2,1.6,2.0,2.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import pretrain_command  # noqa: E402 - the tests' own tiny recipe

STEPS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default="0,0.2,0.5,0.8,1.2,1.6,2.0,2.5", help="seconds after the first log line")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    base = args.out or Path(tempfile.mkdtemp())
    subprocess.run(pretrain_command(base / "straight", STEPS), check=True, capture_output=True)
    straight = load_file(base / "straight" / "model" / "model.safetensors")
    results = []
    for trial, delay in enumerate(float(d) for d in args.delays.split(",")):
        out = base / f"stopped{trial}"
        process = subprocess.Popen(
            pretrain_command(out, STEPS), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        metrics = out / "metrics.jsonl"
        while process.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.05)
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        stopped_at = err.strip().splitlines()[-1].split("at step ")[-1].split()[0]
        subprocess.run([*pretrain_command(out, STEPS), "--resume"], check=True, capture_output=True)
        resumed = load_file(out / "model" / "model.safetensors")
        equal = all(straight[name].equal(resumed[name]) for name in straight)
        worst = max((straight[name] - resumed[name]).abs().max().item() for name in straight)
        results.append({"delay_s": delay, "stopped_at": stopped_at, "bitwise_equal": equal, "max_abs_diff": worst})
        print(results[-1], flush=True)
    if args.out is None:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"runs": results, "bitwise_equal": sum(r["bitwise_equal"] for r in results)}))


if __name__ == "__main__":
    main()
