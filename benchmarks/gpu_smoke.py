"""One run for a lent GPU: parity with the CPU, a few training steps, decode speed, MoE-layer share of bf16 peak,
and a 2-rank torchrun pre-training run (EP2 x FSDP, NCCL) where the machine has two GPUs.

Prints one line per check on stderr and one JSON object last. `--device cpu` runs the same script on the CPU
(parity is then CPU against itself), which is how it is kept working on machines without a GPU.

    python benchmarks/gpu_smoke.py [--device cuda --preset small]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moelm import MoELM, load_config
from moelm.devices import resolve_device
from moelm.infer import generate


def timed(fn, device: torch.device, repeats: int = 5) -> float:  # noqa: ANN001
    """Median seconds of fn() after one warm-up call, synchronising the device around each call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    device = resolve_device(args.device)
    config = load_config(args.preset)
    torch.manual_seed(0)
    cpu_model = MoELM(config).eval()
    model = MoELM(config).to(device).eval()
    model.load_state_dict(cpu_model.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 128))
    results: dict[str, float | str] = {"device": str(device), "preset": args.preset}

    with torch.no_grad():  # 1. float32 logits against the CPU
        diff = (model(ids.to(device)).logits.float().cpu() - cpu_model(ids).logits).abs().max().item()
    results["float32_logit_max_diff_vs_cpu"] = diff
    print(f"parity: max |logit difference| vs CPU {diff:.2e}", file=sys.stderr)

    train_model = MoELM(config).to(device).train()  # 2. a few bf16-autocast training steps
    optimizer = torch.optim.AdamW(train_model.parameters(), lr=3e-4)
    batch = torch.randint(0, config.vocab_size, (8, 256), device=device)
    losses = []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = train_model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    seconds = timed(step, device)
    results["train_tokens_per_s"] = round(batch.numel() / seconds, 1)
    results["train_loss_first_last"] = f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    print(f"training: {results['train_tokens_per_s']} tok/s, loss {results['train_loss_first_last']}", file=sys.stderr)

    for batch_size in (1, 16):  # 3. greedy decode
        prompt = torch.randint(0, config.vocab_size, (batch_size, 64), device=device)
        seconds = timed(lambda prompt=prompt: generate(model, prompt, 64), device, repeats=3)
        results[f"decode_batch{batch_size}_tok_s"] = round(batch_size * 64 / seconds, 1)
        print(f"decode batch {batch_size}: {results[f'decode_batch{batch_size}_tok_s']} tok/s", file=sys.stderr)

    # 4. one MoE layer forward+backward in bf16 against the device's measured bf16 GEMM peak
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    moe = model.layers[config.first_k_dense_replace].mlp.to(dtype).train()
    x = torch.randn(4096, config.hidden_size, device=device, dtype=dtype, requires_grad=True)

    def moe_step() -> None:
        out, _ = moe(x.unsqueeze(0))
        out.float().pow(2).mean().backward()

    moe_seconds = timed(moe_step, device)
    flops = 3 * 2 * 4096 * config.num_experts_per_tok * 3 * config.hidden_size * config.moe_intermediate_size
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    gemm_seconds = timed(lambda: a @ a, device)
    peak = 2 * 4096**3 / gemm_seconds
    results["moe_layer_tflops"] = round(flops / moe_seconds / 1e12, 3)
    results["gemm_peak_tflops"] = round(peak / 1e12, 3)
    results["moe_layer_share_of_peak"] = round(flops / moe_seconds / peak, 3)
    print(f"MoE layer: {results['moe_layer_share_of_peak']:.0%} of the measured {dtype} GEMM peak", file=sys.stderr)
    results.update(flex_against_sdpa(config, device))
    results.update(two_rank_run(device))
    print(json.dumps(results))


def flex_against_sdpa(config, device: torch.device) -> dict[str, float | str]:  # noqa: ANN001
    """A packed batch's training step with flex_attention's document mask against SDPA's boolean mask: loss and
    gradient difference, and step times (flex has no CPU backward in torch 2.13: skipped there)."""
    if device.type != "cuda":
        print("flex vs SDPA: skipped (no CPU backward)", file=sys.stderr)
        return {"flex": "skipped: CPU"}
    torch.manual_seed(0)
    model = MoELM(config).to(device).train()
    ids = torch.randint(0, config.vocab_size, (4, 1024), device=device)
    documents = (torch.arange(1024, device=device) // 256).expand(4, -1)  # four 256-token documents per row
    positions = (torch.arange(1024, device=device) % 256).expand(4, -1)
    grads, times = {}, {}
    for kernel in ("sdpa", "flex"):
        model.attention_kernel = kernel

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, position_ids=positions, document_ids=documents).loss.backward()

        times[kernel] = timed(step, device)
        grads[kernel] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    diff = ((grads["flex"] - grads["sdpa"]).norm() / grads["sdpa"].norm()).item()
    print(
        f"flex vs SDPA: grad rel diff {diff:.2e}, step {times['flex']:.4f} s vs {times['sdpa']:.4f} s", file=sys.stderr
    )
    return {"flex_grad_rel_diff": diff, "flex_step_s": times["flex"], "sdpa_step_s": times["sdpa"]}


def two_rank_run(device: torch.device) -> dict[str, float | str]:
    """`moelm pretrain` on 2 ranks (EP2 x FSDP, bf16 on CUDA) for a few steps: NCCL's collectives and the
    expert all-to-all on real devices. On the CPU, gloo with one thread per rank, its twin."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        print("2-rank run: skipped (one GPU)", file=sys.stderr)
        return {"two_rank": "skipped: one GPU"}
    settings = ["model.preset=tiny", "train.max_steps=4", "train.batch_size=8", "data.seq_len=128"]
    settings += ["data.builtin_records=600", "data.vocab_size=512", "train.log_every=1", "train.eval_every=1000"]
    settings += ["log.progress=false", "log.sample_tokens=0", "parallel.expert_degree=2"]
    settings += [f"train.device={device.type}", f"train.dtype={'bfloat16' if device.type == 'cuda' else 'float32'}"]
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "run"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        command += ["-m", "moelm", "pretrain", "--out", str(out)]
        for item in settings:
            command += ["--set", item]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"2-rank run: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            return {"two_rank": "failed"}
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = records[-1]["tokens_per_s"]
    print(
        f"2-rank EP2 run: {tokens_per_s} tok/s, loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}",
        file=sys.stderr,
    )
    return {"two_rank": "ok", "two_rank_tok_s": tokens_per_s, "two_rank_loss_last": records[-1]["loss"]}


if __name__ == "__main__":
    main()
