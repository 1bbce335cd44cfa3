"""`moelm data builtin|traces` and `moelm tokenizer train`: corpora, verified traces and tokenizers."""

from __future__ import annotations

import argparse
from pathlib import Path

from moelm.cli import common


def cmd_data_builtin(args: argparse.Namespace) -> None:
    """Write the built-in corpus as JSONL (text, domain, difficulty, prompt, answer)."""
    import json

    from moelm.data.builtin import builtin_corpus
    from moelm.files import atomic_write_text

    records = builtin_corpus(args.num_records, seed=args.seed)
    atomic_write_text(args.out, "".join(json.dumps(record.to_dict()) + "\n" for record in records))
    print(f"wrote {args.num_records} records to {args.out}")


def cmd_data_traces(args: argparse.Namespace) -> None:
    """Rejection sampling: G completions per prompt from a teacher, verified, kept as SFT records."""
    from moelm.train.traces import sample_traces, trace_prompts, write_traces

    prompts = trace_prompts(args.source, args.data_dir, args.num_prompts, args.seed)
    generator = common.load_generator(args)
    records = sample_traces(
        generator, prompts, args.samples, args.temperature, args.max_new_tokens, args.keep, args.seed
    )
    counts = write_traces(records, args.out)
    summary = ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "nothing kept"
    print(
        f"{len(prompts)} prompts x {args.samples} samples -> {sum(counts.values())} records in {args.out} ({summary})"
    )


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """Train a byte-level BPE tokenizer on a data source and save tokenizer.json."""
    from moelm.data.sources import iter_documents
    from moelm.data.tokenizer import save_tokenizer_file, train_tokenizer

    tokenizer = train_tokenizer(iter_documents(args.data, args.text_field), vocab_size=args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer_file(tokenizer, args.out / "tokenizer.json")
    print(f"tokenizer with {tokenizer.get_vocab_size()} tokens saved to {args.out / 'tokenizer.json'}")


def register(sub: argparse._SubParsersAction) -> None:
    """The data and tokenizer subcommand groups."""
    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    builtin = data.add_parser("builtin", help="write the built-in multi-domain corpus as JSONL")
    builtin.add_argument("--out", type=Path, required=True)
    builtin.add_argument("--num-records", type=common.POSITIVE_INT, default=1000)
    builtin.add_argument("--seed", type=common.SEED, default=0)
    builtin.set_defaults(func=cmd_data_builtin)

    traces = data.add_parser("traces", help="rejection-sample verified reasoning traces from a model (SFT records)")
    traces.add_argument("--model", type=Path, required=True, help="teacher model directory")
    common.add_device_args(traces)
    traces.add_argument("--source", default="builtin", help="builtin, gsm8k, mbpp (with --data-dir) or a JSONL file")
    traces.add_argument("--data-dir", type=Path, default=None)
    traces.add_argument("--num-prompts", type=common.POSITIVE_INT, default=200)
    traces.add_argument("--samples", type=common.POSITIVE_INT, default=4, help="completions per prompt (G)")
    traces.add_argument("--temperature", type=common.NON_NEGATIVE_FLOAT, default=1.0)
    traces.add_argument("--max-new-tokens", type=common.POSITIVE_INT, default=96)
    traces.add_argument("--keep", choices=["correct", "best", "all"], default="correct")
    traces.add_argument("--seed", type=common.SEED, default=0)
    traces.add_argument("--compile", action="store_true", help=common.COMPILE_HELP)
    traces.add_argument("--out", type=Path, required=True, help="JSONL of {prompt, reasoning, response, verdict}")
    traces.set_defaults(func=cmd_data_traces)

    tok = sub.add_parser("tokenizer", help="tokenizer utilities").add_subparsers(dest="tok_command", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    tok_train.add_argument("--data", required=True, help="'builtin', a .jsonl/.txt file or a folder")
    tok_train.add_argument("--text-field", default="text")
    tok_train.add_argument("--vocab-size", type=common.POSITIVE_INT, default=2048)
    tok_train.add_argument("--out", type=Path, required=True)
    tok_train.set_defaults(func=cmd_tokenizer_train)
