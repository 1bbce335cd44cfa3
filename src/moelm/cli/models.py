"""`moelm info`, `demo` and `export`: what a model is, one forward pass of a preset, a checkpoint as a directory."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from moelm.cli import common
from moelm.config import load_config, preset_names

if TYPE_CHECKING:
    from moelm.config import ModelConfig
    from moelm.model.transformer import MoELM

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float8": 1}


def model_summary(model: MoELM) -> dict[str, float]:
    """Parameter counts (total, active per token, MTP) and weight memory per dtype, for reports."""
    total = model.num_parameters()
    summary: dict[str, float] = {
        "total_parameters": total,
        "active_parameters": model.num_active_parameters(),
        "mtp_parameters": model.num_parameters(include_mtp=True) - total,
    }
    for dtype, nbytes in DTYPE_BYTES.items():
        summary[f"weights_gib_{dtype}"] = model.num_parameters(include_mtp=True) * nbytes / 1024**3
    return summary


def _format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _print_summary(config: ModelConfig, model: MoELM) -> None:
    summary = model_summary(model)
    layers = config.num_hidden_layers
    moe_layers = sum(config.is_moe_layer(i) for i in range(layers))
    print(
        f"layers: {layers} ({moe_layers} MoE, {layers - moe_layers} dense)  attention: {config.attention}  "
        f"experts: {config.n_routed_experts} routed (top-{config.num_experts_per_tok}, "
        f"{config.n_group} groups keep {config.topk_group}) + {config.n_shared_experts} shared, "
        f"scoring: {config.scoring_func}  MTP depths: {config.num_nextn_predict_layers}"
    )
    print(f"total parameters:  {_format_count(summary['total_parameters'])}  (excluding MTP)")
    print(f"active per token:  {_format_count(summary['active_parameters'])}")
    print(f"MTP parameters:    {_format_count(summary['mtp_parameters'])}")
    for dtype in DTYPE_BYTES:
        print(f"weights in {dtype:<9} {summary[f'weights_gib_{dtype}']:.3f} GiB")


def cmd_info(args: argparse.Namespace) -> None:
    """Print configuration, parameter counts and weight memory of a preset, YAML, config.json or model dir."""
    import torch

    from moelm.model.transformer import MoELM

    config = load_config(args.model)
    for key, value in config.to_dict().items():
        print(f"  {key}: {value}")
    with torch.device("meta"):
        model = MoELM(config)
    _print_summary(config, model)
    if Path(args.model).is_dir():
        _print_directory(Path(args.model))


def _print_directory(path: Path) -> None:
    """Architecture, quantisation and files of a model directory, read from its metadata only."""
    import json

    from moelm.model.fp8 import block_size

    raw = json.loads((path / "config.json").read_text())
    block = block_size(raw)
    files = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    quantised = f"FP8 e4m3, {block[0]}x{block[1]} block scales" if block else "none"
    print(f"architecture:      {raw.get('model_type', 'unknown')} ({', '.join(raw.get('architectures') or [])})")
    print(f"quantisation:      {quantised}  stored dtype: {raw.get('torch_dtype', 'unknown')}")
    print(f"weight files:      {len(files)} ({size / 1024**3:.3f} GiB on disk)")


def cmd_demo(args: argparse.Namespace) -> None:
    """Build a model from a preset, report its size and run one forward pass with a loss."""
    import torch

    from moelm.model.transformer import MoELM

    config = load_config(args.preset)
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's {config.max_position_embeddings} positions")
    torch.manual_seed(args.seed)
    model = MoELM(config).eval()
    _print_summary(config, model)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    start = time.perf_counter()
    with torch.no_grad():
        out = model(tokens, labels=tokens)
    elapsed = time.perf_counter() - start
    mtp = f", MTP loss {out.mtp_loss.item():.4f}" if out.mtp_loss is not None else ""
    print(
        f"forward {args.batch_size}x{args.seq_len}: logits {tuple(out.logits.shape)}, "
        f"LM loss {out.lm_loss.item():.4f}{mtp} (random init: ln(vocab) = {math.log(config.vocab_size):.4f})"
    )
    print(f"  {args.batch_size * args.seq_len / elapsed:,.0f} tokens/s; tokens per expert (max/mean load):")
    for layer, routing in out.routing.items():
        counts = routing.tokens_per_expert_E
        shown = " ".join(str(int(c)) for c in counts.tolist())
        print(f"  layer {layer}: {shown}  ({(counts.max() / counts.mean()).item():.2f})")
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved HF DeepseekV3 directory to {args.save}")


def cmd_export(args: argparse.Namespace) -> None:
    """Write a training checkpoint (verified against its manifest) or a model directory as an HF model
    directory, or as one GGUF file for llama.cpp; a LoRA adapter (with --merge-lora) as its merged model."""
    import shutil
    import tempfile

    import torch

    from moelm.files import DamagedFileError, verify_manifest
    from moelm.model.peft_format import is_adapter_dir
    from moelm.model.transformer import MoELM
    from moelm.train.checkpoint import ADAPTER_DIR, is_sharded

    if args.checkpoint is not None and is_sharded(args.checkpoint):
        _export_sharded(args)
        return
    if args.checkpoint is not None:
        source = args.checkpoint / "model"
        if is_adapter_dir(args.checkpoint / ADAPTER_DIR):
            source = args.checkpoint / ADAPTER_DIR
        elif not (source / "config.json").is_file():
            raise ValueError(f"--checkpoint {args.checkpoint}: not a moelm checkpoint (expected {source}/config.json)")
        if (args.checkpoint / "manifest.json").is_file():
            try:
                verify_manifest(args.checkpoint)
            except DamagedFileError as error:
                raise ValueError(f"--checkpoint {args.checkpoint}: {error}") from None
    else:
        source = args.model
        if not (source / "config.json").is_file() and not is_adapter_dir(source):
            raise ValueError(f"--model {source}: not a model directory (expected {source}/config.json)")
    adapter = is_adapter_dir(source)
    if adapter and not args.merge_lora:
        raise ValueError(
            f"{source} is a LoRA adapter (adapter_config.json): pass --merge-lora to write its base model with the "
            "adapters merged in"
        )
    if args.merge_lora and not adapter:
        raise ValueError(f"--merge-lora: {source} is a plain model directory, not a LoRA adapter")
    if args.format == "gguf":
        if adapter:  # llama.cpp reads plain weights: merge into a temporary directory first
            if not (source / "tokenizer.json").is_file():
                raise ValueError(f"{source}: no tokenizer.json (a GGUF file carries its vocabulary)")
            with tempfile.TemporaryDirectory() as merged:
                _write_hf(MoELM.from_pretrained(source, dtype=torch.float32), source, Path(merged), None, None)
                _export_gguf(args, Path(merged), label=f"{source} (merged)")
            return
        _export_gguf(args, source)
        return
    if args.outtype is not None:
        raise ValueError("--outtype applies to --format gguf; for an HF directory use --dtype or --quantization")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {args.out} is not empty; pass --overwrite to replace the model files in it")
    model = MoELM.from_pretrained(source, dtype=common.dtype(args.dtype))
    _write_hf(model, source, args.out, args.max_shard_size, args.quantization)
    provenance = source.parent / "run.json" if args.checkpoint is not None else source / "run.json"
    if provenance.is_file() and provenance != args.out / "run.json":  # the recipe and versions behind the weights
        shutil.copyfile(provenance, args.out / "run.json")
    print(f"exported {args.checkpoint or source} to {args.out}")


def _export_sharded(args: argparse.Namespace) -> None:
    """A sharded (torchrun) checkpoint as an HF directory, read one tensor at a time."""
    import shutil

    from moelm.dist.checkpoint import export_hf
    from moelm.files import DamagedFileError, verify_manifest

    if args.format != "hf" or args.quantization is not None or args.merge_lora:
        raise ValueError(
            f"--checkpoint {args.checkpoint} is sharded (written under torchrun): export it as an HF directory first "
            "(--format hf, no --quantization), then export that directory with --model"
        )
    try:
        verify_manifest(args.checkpoint)
    except DamagedFileError as error:
        raise ValueError(f"--checkpoint {args.checkpoint}: {error}") from None
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {args.out} is not empty; pass --overwrite to replace the model files in it")
    export_hf(args.checkpoint, args.out, args.max_shard_size or "5GB", common.dtype(args.dtype))
    for name in ("tokenizer.json", "run.json"):
        if (args.checkpoint / name).is_file():
            shutil.copyfile(args.checkpoint / name, args.out / name)
    print(f"exported {args.checkpoint} to {args.out}")


def _write_hf(model: MoELM, source: Path, out: Path, max_shard_size: str | None, quantization: str | None) -> None:
    """The model as an HF directory with the source's tokenizer files beside it."""
    import shutil

    model.save_pretrained(out, max_shard_bytes=max_shard_size or "5GB", quantization=quantization)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def _export_gguf(args: argparse.Namespace, source: Path, label: str | None = None) -> None:
    from moelm.model.gguf_export import export_gguf

    if args.dtype is not None or args.quantization is not None:
        raise ValueError("--dtype and --quantization apply to HF directories; for GGUF use --outtype")
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; --format gguf writes one file (e.g. model.gguf)")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists; pass --overwrite to replace it")
    result = export_gguf(source, args.out, args.outtype or "f32")
    for note in result.notes:
        print(f"note: {note}")
    print(f"exported {label or source} to {args.out} ({result.tensors} tensors, {result.bytes / 2**20:.1f} MiB)")


GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # moelm.model.gguf_export.OUTTYPES, kept import-free


def register(sub: argparse._SubParsersAction) -> None:
    """The info, demo and export subcommands."""
    info = sub.add_parser("info", help="configuration, parameter counts and memory of a model")
    info.add_argument("model", help=f"preset ({', '.join(preset_names())}), YAML, config.json or model dir")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="build a preset model, print its size and run a forward pass")
    demo.add_argument("--preset", default="tiny", help="preset name or YAML file")
    demo.add_argument("--batch-size", type=common.POSITIVE_INT, default=2)
    demo.add_argument("--seq-len", type=common.POSITIVE_INT, default=64)
    demo.add_argument("--seed", type=common.SEED, default=0)
    demo.add_argument("--save", type=Path, default=None, help="also write the model as an HF directory")
    demo.set_defaults(func=cmd_demo)

    export = sub.add_parser("export", help="write a checkpoint or model as an HF directory or a GGUF file")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="OUT/checkpoints/step-N")
    source.add_argument("--model", type=Path, help="a model directory (e.g. OUT/model)")
    export.add_argument("--out", required=True, type=Path, help="the HF directory, or the .gguf file, to write")
    export.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf (default) or gguf (llama.cpp)")
    export.add_argument("--outtype", choices=GGUF_OUTTYPES, default=None, help="GGUF weight type (default f32)")
    export.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    export.add_argument("--dtype", choices=common.DTYPES, default=None, help="store the weights in this dtype")
    export.add_argument("--max-shard-size", default="5GB", help="split into shards of at most this size")
    export.add_argument("--quantization", choices=("fp8",), default=None, help="DeepSeek's block-scaled FP8")
    export.add_argument(
        "--merge-lora",
        action="store_true",
        help="the source is a LoRA adapter: write its base with the adapters merged",
    )
    export.set_defaults(func=cmd_export)
