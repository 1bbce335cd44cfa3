"""LoRA against full fine-tuning: trainable parameters, training memory and tokens/s on one preset, and
optionally held-out SFT accuracy of both from one base model.

Speed and memory: each variant trains in its own process (so its peak RSS is its own), the variants taken in
turn `--repeats` times, medians reported. A step is AdamW over random tokens [batch, seq]; memory is the peak
RSS above the RSS once the model is built (gradients, optimizer state and activations).

    python benchmarks/lora.py [--preset small --rank 16 --steps 4 --repeats 2]
    python benchmarks/lora.py --sft-base runs/quickstart/pretrain/model [--sft-steps 200 --lora-lr 3e-3]

With --sft-base (the quickstart's pre-trained model, OUT/pretrain/model), the quickstart's SFT stage runs twice
from it, full and LoRA at --rank with lr --lora-lr, and each result is scored as the quickstart scores its
stages (greedy accuracy on its held-out built-in problems, per domain). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = "attention,experts,shared_experts"


def child(args: argparse.Namespace) -> None:
    """One variant's measurement, printed as JSON (runs in its own process)."""
    import torch

    from moelm import MoELM, load_config
    from moelm.model.lora import LoraSpec, attach_lora, lora_parameters

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MoELM(load_config(args.preset)).train()
    total = sum(p.numel() for p in model.parameters())
    if args.variant == "lora":
        attach_lora(model, LoraSpec(rank=args.rank, alpha=2.0 * args.rank, targets=tuple(TARGETS.split(","))))
        params = lora_parameters(model)
    else:
        params = list(model.parameters())
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    rss_built = _rss_bytes()
    vocab = model.config.vocab_size
    seconds = []
    for step in range(args.steps + 1):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len))
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state
            seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "total_parameters": total,
                "trainable_parameters": trainable,
                "tokens_per_s": args.batch_size * args.seq_len / statistics.median(seconds),
                "training_memory_mib": (peak - rss_built) / 2**20,
                "peak_rss_mib": peak / 2**20,
            }
        )
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def speed_and_memory(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.repeats):
        for variant in runs:
            command = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(result.stdout.strip().splitlines()[-1]))
    out = {}
    for variant, records in runs.items():
        out[variant] = {key: statistics.median(r[key] for r in records) for key in records[0]}
        print(f"{variant}: {json.dumps(out[variant])}", file=sys.stderr)
    return out


def sft_accuracy(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The quickstart's SFT stage from the same pre-trained model, full and LoRA, each scored like the
    quickstart scores it (greedy, its held-out built-in problems per domain)."""
    from moelm.quickstart import evaluate_stage, stage_recipe
    from moelm.train.sft import SFTTrainer

    scores = {}
    with tempfile.TemporaryDirectory() as scratch:
        for variant in ("full", "lora"):
            recipe = stage_recipe("sft", args.sft_steps, args.seed).replace(log={"progress": False})
            if variant == "lora":
                lora = {"rank": args.rank, "alpha": 2.0 * args.rank, "targets": TARGETS.split(",")}
                recipe = recipe.replace(lora=lora, optim={"lr": args.lora_lr})
            out = Path(scratch) / variant
            start = time.perf_counter()
            SFTTrainer(recipe, out, base_model=Path(args.sft_base), echo=lambda _line: None).run()
            seconds = time.perf_counter() - start
            model_dir = out / ("adapter" if variant == "lora" else "model")
            metrics = evaluate_stage(model_dir, out / "eval.json", args.problems)
            scores[variant] = {**{k: v for k, v in metrics.items() if "/" not in k or k.count("/") == 1}}
            scores[variant]["train_seconds"] = seconds
            print(f"sft {variant}: {json.dumps(scores[variant])}", file=sys.stderr)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sft-base", default=None, help="a pre-trained tiny model directory with tokenizer.json")
    parser.add_argument("--sft-steps", type=int, default=200, help="the quickstart's SFT steps at 15 minutes")
    parser.add_argument("--problems", type=int, default=200, help="held-out built-in problems scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA's learning rate (full SFT: the recipe's)")
    parser.add_argument("--child", choices=("full", "lora"), dest="variant", default=None)
    args = parser.parse_args()
    if args.variant is not None:
        child(args)
        return
    result = {"preset": args.preset, "rank": args.rank, "targets": TARGETS, **speed_and_memory(args)}
    result["lora_vs_full"] = {
        "trainable": result["lora"]["trainable_parameters"] / result["full"]["trainable_parameters"],
        "memory": result["lora"]["training_memory_mib"] / result["full"]["training_memory_mib"],
        "tokens_per_s": result["lora"]["tokens_per_s"] / result["full"]["tokens_per_s"],
    }
    if args.sft_base:
        result["sft"] = sft_accuracy(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
