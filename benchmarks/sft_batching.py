"""SFT batching: packing (block-diagonal attention) vs padding with length bucketing, same examples and model.

Both modes train the tiny preset for the same number of steps on the built-in math + logic conversations; the
figure of merit is real (non-pad) tokens per second of training, plus the share of padded positions. The faster
mode is the default of `sft.batching`.

    python benchmarks/sft_batching.py [--steps 30 --preset tiny --seq-len 128 --batch-size 16]

Last line: JSON with tokens/s per mode and the pack/pad ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moelm import MoELM, load_config
from moelm.data.builtin import builtin_corpus
from moelm.data.chat import DEFAULT_CHAT_TEMPLATE
from moelm.data.sft import builtin_example
from moelm.data.tokenizer import train_tokenizer
from moelm.train.curriculum import CurriculumSampler
from moelm.train.sft import SFTBatches, encode_examples


def measure(mode: str, args: argparse.Namespace, encoded: list, vocab: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = MoELM(load_config(args.preset).replace(vocab_size=vocab)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = CurriculumSampler([e.difficulty for e in encoded], [e.task for e in encoded], seed=0)
    batches = SFTBatches(encoded, [], [], sampler, args.batch_size, args.seq_len, args.steps, 2, mode)
    real = positions = 0
    elapsed = 0.0
    for index in range(args.steps + 2):
        inputs, metrics = batches.train_batch(index)
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= 2:  # the first steps warm up allocator and kernels
            elapsed += time.perf_counter() - start
            real += metrics["tokens"]
            positions += inputs["input_ids"].numel()
    return {"tokens_per_s": real / elapsed, "pad_fraction": 1 - real / positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    records = list(builtin_corpus(3000, seed=1, domains=("math", "logic")))
    tokenizer = train_tokenizer([r.text for r in records], vocab_size=2048)
    examples = [builtin_example(r) for r in records]
    encoded, _ = encode_examples(tokenizer, examples, DEFAULT_CHAT_TEMPLATE, args.seq_len)
    results = {mode: measure(mode, args, encoded, tokenizer.get_vocab_size()) for mode in ("pack", "pad")}
    for mode, figures in results.items():
        print(f"{mode:5s} {figures['tokens_per_s']:10.0f} real tokens/s   pad fraction {figures['pad_fraction']:.2f}")
    summary = {f"{mode}_{k}": v for mode, figures in results.items() for k, v in figures.items()}
    summary["pack_over_pad"] = results["pack"]["tokens_per_s"] / results["pad"]["tokens_per_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
