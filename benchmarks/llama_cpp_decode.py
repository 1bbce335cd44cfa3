"""Batch-1 decode against llama.cpp on the same weights: speed per weight format, and fidelity to float32.

moelm's compiled decode step in float32, bf16 weights (float32 activations, moelm's CPU default, and the bf16
stream it replaced) and int8 weights, against llama.cpp (llama-cpp-python, the `bench` extra) running moelm's own
GGUF export of the same model in f32, bf16 and q8_0. Speed: a random `--preset` model, a `--prompt`-token prompt
and `--new` greedy tokens, all contenders timed in turn round after round (medians of `--repeats`), each with
`--threads` threads. Read roofline: tokens/s if a step cost only reading its weights once, at the read bandwidth
measured in this run (a sum over 1 GiB). Fidelity (with `--model DIR`, e.g. the quickstart's model): the largest
logit difference from moelm float32 over a few prompts and the number of greedy tokens (of `--fidelity-tokens`)
before each format's text first differs from float32's.

    python benchmarks/llama_cpp_decode.py [--preset small] [--model runs/qs0/grpo/model]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import interleaved_medians, read_bandwidth

from moelm import MoELM, load_config
from moelm.data.tokenizer import load_tokenizer_file, save_tokenizer_file, train_tokenizer
from moelm.infer import compile_decode, generate
from moelm.model.gguf_export import export_gguf, load_with_llama_cpp
from moelm.model.quantize import quantize_int8

GGUF_TYPES = ("f32", "bf16", "q8_0")
PROMPTS = [
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Question: A train travels 60 km in one hour. How far does it go in 3 hours?",
    "If all cats are animals and Tom is a cat, then",
]


def moelm_variants(model_dir: Path) -> dict[str, MoELM]:
    """The moelm formats, each loaded from the same directory."""
    f32 = MoELM.from_pretrained(model_dir, mtp=False).eval()
    bf16 = MoELM.from_pretrained(model_dir, dtype=torch.bfloat16, mtp=False, float32_norms=True).eval()
    bf16.set_activation_dtype(torch.float32)  # what TextGenerator and the CLI load on a CPU
    rounded_norms = MoELM.from_pretrained(model_dir, dtype=torch.bfloat16, mtp=False).eval()
    rounded_norms.set_activation_dtype(torch.float32)  # the float32 stream with bf16 norm weights
    stream = MoELM.from_pretrained(model_dir, dtype=torch.bfloat16, mtp=False).eval()
    int8 = quantize_int8(MoELM.from_pretrained(model_dir, mtp=False).eval())
    return {
        "moelm_f32": f32,
        "moelm_bf16": bf16,
        "moelm_bf16_bf16_norms": rounded_norms,
        "moelm_bf16_stream": stream,
        "moelm_int8": int8,
    }


def weight_bytes(model: MoELM) -> int:
    """Bytes one decode step reads from weights: active parameters (one embedding row), at their storage size."""
    config = model.config
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        size = tensor.numel() * tensor.element_size()
        if name == "embed_tokens.weight":
            size = size // config.vocab_size
        elif ".experts." in name:
            size = size * config.num_experts_per_tok // config.n_routed_experts
        total += size
    return total


def llama_greedy(llm, ids: list[int], new: int) -> list[int]:  # noqa: ANN001 - llama_cpp.Llama
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == new:
            break
    return out


def save_random_model(preset: str, directory: Path) -> None:
    config = load_config(preset)
    torch.manual_seed(0)
    MoELM(config).save_pretrained(directory)
    text = [p * 3 for p in PROMPTS] * 40
    size = min(config.vocab_size, 512)
    save_tokenizer_file(train_tokenizer(text, vocab_size=size, min_frequency=1), directory / "tokenizer.json")


def speed(model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    models = moelm_variants(model_dir)
    llamas = {}
    for kind in GGUF_TYPES:
        export_gguf(model_dir, work / f"model-{kind}.gguf", kind)
        llamas[f"llama_{kind}"] = load_with_llama_cpp(
            work / f"model-{kind}.gguf", n_ctx=args.prompt + args.new + 8, n_threads=args.threads
        )
    vocab = models["moelm_f32"].config.vocab_size
    ids = torch.randint(3, min(vocab, 500), (1, args.prompt))
    steps: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        compiled = compile_decode(model)
        steps[name] = lambda m=model, c=compiled: generate(m, ids, args.new, compiled=c)
    for name, llm in llamas.items():
        steps[name] = lambda llm=llm: llama_greedy(llm, ids[0].tolist(), args.new)
    start = time.perf_counter()
    with torch.inference_mode():
        for step in steps.values():  # builds (or loads) the compiled graphs outside the timing
            step()
    print(f"warm-up (compiled graph builds) {time.perf_counter() - start:.0f} s", flush=True)
    with torch.inference_mode():
        seconds = interleaved_medians(steps, args.repeats, warmup=0)
    bandwidth = read_bandwidth()
    results = {"read_gb_s": bandwidth / 1e9}
    gguf_bytes = {f"llama_{kind}": (work / f"model-{kind}.gguf").stat().st_size for kind in GGUF_TYPES}
    print(f"{'contender':<18} {'tok/s':>8} {'weights MB/token':>17} {'roofline tok/s':>15} {'of roofline':>11}")
    for name, t in seconds.items():
        rate = args.new / t
        if name in models:
            read = weight_bytes(models[name])
        else:  # the file's weights scaled to active ones like moelm's own count
            ratio = weight_bytes(models["moelm_f32"]) / (work / "model-f32.gguf").stat().st_size
            read = gguf_bytes[name] * ratio
        roof = bandwidth / read
        results[f"{name}_tok_s"] = rate
        results[f"{name}_roofline_frac"] = rate / roof
        print(f"{name:<18} {rate:>8.1f} {read / 1e6:>17.1f} {roof:>15.1f} {rate / roof:>10.1%}")
    for ours, theirs in (("moelm_f32", "llama_f32"), ("moelm_bf16", "llama_bf16"), ("moelm_int8", "llama_q8_0")):
        results[f"{ours}_over_{theirs}"] = seconds[theirs] / seconds[ours]
        print(f"{ours} / {theirs}: {seconds[theirs] / seconds[ours]:.2f}x")
    return results


def first_difference(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), len(reference))


def fidelity(model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    tokenizer = load_tokenizer_file(model_dir / "tokenizer.json")
    models = moelm_variants(model_dir)
    llamas = {}
    for kind in GGUF_TYPES:
        export_gguf(model_dir, work / f"fidelity-{kind}.gguf", kind)
        llamas[f"llama_{kind}"] = load_with_llama_cpp(
            work / f"fidelity-{kind}.gguf", n_ctx=512, logits_all=True, n_threads=args.threads
        )
    errors: dict[str, list[float]] = {name: [] for name in [*models, *llamas]}
    typical: dict[str, list[float]] = {name: [] for name in errors}  # per-position max errors, all prompts
    agree: dict[str, list[int]] = {name: [] for name in errors}
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        with torch.inference_mode():
            reference = generate(models["moelm_f32"], torch.tensor([ids]), args.fidelity_tokens)[0]
            sequence = reference[:-1]
            reference_logits = models["moelm_f32"](sequence[None]).logits[0].numpy()
            for name, model in models.items():
                logits = model(sequence[None]).logits[0].float().numpy()
                errors[name].append(float(np.abs(logits - reference_logits).max()))
                typical[name].extend(np.abs(logits - reference_logits).max(-1).tolist())
                tokens = generate(model, torch.tensor([ids]), args.fidelity_tokens)[0, len(ids) :].tolist()
                agree[name].append(first_difference(tokens, reference[len(ids) :].tolist()))
        for name, llm in llamas.items():
            llm.reset()
            llm.eval(sequence.tolist())
            logits = np.array(llm.scores[: len(sequence)])
            errors[name].append(float(np.abs(logits - reference_logits).max()))
            typical[name].extend(np.abs(logits - reference_logits).max(-1).tolist())
            tokens = llama_greedy(llm, ids, args.fidelity_tokens)
            agree[name].append(first_difference(tokens, reference[len(ids) :].tolist()))
    results = {}
    print(f"\nfidelity to moelm float32 ({model_dir}, {len(PROMPTS)} prompts, {args.fidelity_tokens} greedy tokens)")
    print("(a position's error: its largest |logit difference|; the largest is usually a routing near-tie)")
    print(f"{'format':<18} {'median position':>15} {'worst position':>14} {'greedy tokens equal (per prompt)':>34}")
    for name in errors:
        results[f"{name}_max_logit_err"] = max(errors[name])
        results[f"{name}_median_logit_err"] = float(np.median(typical[name]))
        results[f"{name}_min_greedy_agreement"] = min(agree[name])
        median = float(np.median(typical[name]))
        print(f"{name:<18} {median:>15.4f} {max(errors[name]):>14.4f} {str(agree[name]):>34}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--model", type=Path, default=None, help="a trained model directory for the fidelity table")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fidelity-tokens", type=int, default=64)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="moelm-llama-") as work:
        work = Path(work)
        if not args.skip_speed:
            save_random_model(args.preset, work / "model")
            results.update(speed(work / "model", work, args))
        if args.model is not None:
            results.update(fidelity(args.model, work, args))
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
