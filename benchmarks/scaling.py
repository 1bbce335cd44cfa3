"""Data- and expert-parallel scaling on one machine: 1 process x T threads against T processes x 1 thread.

Each configuration runs `moelm pretrain` (small preset by default) for a few steps in its own output directory,
in turn: one process with all threads, then torchrun with one thread per rank under FSDP (resharding after
forward, and not), with replicated parameters and averaged gradients, and under expert parallelism (EP = ranks).
Tokens/s is the median over the steps after the first two (rank 0's step time for the global batch). For the EP
run the trainer logs the all-to-all bytes that left each rank and the share of the step spent in the exchanges;
the analytical count per step is 4 exchanges (dispatch + combine, forward + backward) x tokens per rank x k x
hidden x 4 bytes x (P-1)/P per MoE layer, for uniform routing.

Pipeline parallelism (PP = ranks, 1F1B over `--micro-batches` micro-batches) is timed against one process on the
same model without MTP (a pipeline refuses it) and the same accumulation. Sharded checkpoints: under FSDP x EP each
rank's save and load time, its peak resident-memory rise and its shard bytes (benchmarks/dcp_roundtrip.py),
beside the full float32 training state (weights and two AdamW moments) a gathered save would hold on rank 0.

    python benchmarks/scaling.py [--preset small --ranks 2 --steps 8 --batch 8 --seq 256 --micro-batches 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from moelm import load_config


def settings(args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        f"model.preset={args.preset}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"data.seq_len={args.seq}",
        "data.builtin_records=3000",
        "data.vocab_size=2048",
        "train.log_every=1",
        "train.eval_every=1000",
        f"train.save_every={args.steps}",
        "log.progress=false",
        "log.sample_tokens=0",
        *extra,
    ]


def launch(command: list[str], args: argparse.Namespace, ranks: int) -> None:
    """`python -m ...` in one process with all threads, or under torchrun with one thread per rank."""
    env = dict(os.environ)
    if ranks > 1:
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *command]
    else:
        env["OMP_NUM_THREADS"] = str(args.ranks)
        command = [sys.executable, *command]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])


def run(out: Path, args: argparse.Namespace, ranks: int, *extra: str) -> dict[str, float]:
    command = ["-m", "moelm", "pretrain", "--out", str(out)]
    for item in settings(args, *extra):
        command += ["--set", item]
    launch(command, args, ranks)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[2:] or records
    summary = {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed), 1)}
    if "dist/a2a_bytes_sent" in timed[0]:
        summary["a2a_bytes_per_step"] = statistics.median(r["dist/a2a_bytes_sent"] for r in timed)
        summary["a2a_time_share"] = round(statistics.median(r["dist/a2a_time_share"] for r in timed), 3)
    return summary


def checkpoint_roundtrip(root: Path, args: argparse.Namespace, *extra: str) -> list[dict[str, float]]:
    """Every rank's save / load seconds, resident-memory rise and shard size (benchmarks/dcp_roundtrip.py)."""
    worker = Path(__file__).with_name("dcp_roundtrip.py")
    command = [str(worker), str(root / "dcp"), str(root / "dcp-result")]
    for item in settings(args, *extra):
        command += ["--set", item]
    launch(command, args, args.ranks)
    return [json.loads((root / f"dcp-result.rank{rank}.json").read_text()) for rank in range(args.ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=4)
    args = parser.parse_args()
    config = load_config(args.preset)
    with tempfile.TemporaryDirectory() as root:
        one = run(Path(root) / "one", args, 1)
        fsdp = run(Path(root) / "fsdp", args, args.ranks, "parallel.fsdp=true")
        fsdp_keep = run(
            Path(root) / "fsdp2", args, args.ranks, "parallel.fsdp=true", "parallel.reshard_after_forward=false"
        )
        replicated = run(Path(root) / "replicated", args, args.ranks, "parallel.fsdp=false")
        ep = run(Path(root) / "ep", args, args.ranks, "parallel.fsdp=true", f"parallel.expert_degree={args.ranks}")
        no_mtp = ("model.num_nextn_predict_layers=0", f"train.grad_accum={args.micro_batches}")
        one_accum = run(Path(root) / "one-accum", args, 1, *no_mtp)
        pp = run(Path(root) / "pp", args, args.ranks, *no_mtp, f"parallel.pipeline_degree={args.ranks}")
        dcp = checkpoint_roundtrip(Path(root), args, "parallel.fsdp=true", f"parallel.expert_degree={args.ranks}")
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers + config.num_nextn_predict_layers))
    tokens_per_rank = args.batch * args.seq // args.ranks
    analytical = (
        4 * tokens_per_rank * config.num_experts_per_tok * config.hidden_size * 4 * (args.ranks - 1) / args.ranks
    ) * moe_layers
    summary = {
        "preset": args.preset,
        "global_batch_tokens": args.batch * args.seq,
        f"1x{args.ranks}_threads_tok_s": one["tokens_per_s"],
        f"{args.ranks}x1_fsdp_tok_s": fsdp["tokens_per_s"],
        f"{args.ranks}x1_fsdp_no_reshard_tok_s": fsdp_keep["tokens_per_s"],
        f"{args.ranks}x1_replicated_tok_s": replicated["tokens_per_s"],
        f"{args.ranks}x1_ep{args.ranks}_fsdp_tok_s": ep["tokens_per_s"],
        "fsdp_over_threads": round(fsdp["tokens_per_s"] / one["tokens_per_s"], 3),
        "ep_over_threads": round(ep["tokens_per_s"] / one["tokens_per_s"], 3),
        "a2a_bytes_per_step_measured": ep.get("a2a_bytes_per_step"),
        "a2a_bytes_per_step_analytical": int(analytical),
        "a2a_time_share": ep.get("a2a_time_share"),
        f"1x{args.ranks}_threads_no_mtp_accum{args.micro_batches}_tok_s": one_accum["tokens_per_s"],
        f"{args.ranks}x1_pp{args.ranks}_1f1b_tok_s": pp["tokens_per_s"],
        "pp_over_threads": round(pp["tokens_per_s"] / one_accum["tokens_per_s"], 3),
        f"dcp_per_rank_ep{args.ranks}_fsdp": dcp,
        "full_training_state_mb": dcp[0]["full_state_mb"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
