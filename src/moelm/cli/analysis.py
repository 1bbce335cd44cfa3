"""`moelm analyze`: routing analytics of one model, or several side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from moelm.cli import common


def cmd_analyze(args: argparse.Namespace) -> None:
    """Routing analytics of one model (report.html, report.json, PNGs), or several side by side."""
    from moelm.analysis.report import analyze, compare

    if args.compare:
        summaries = {}
        for index, model_dir in enumerate(args.compare):
            summary = analyze(model_dir, args.out / f"run{index}", args.data, None, args.limit, args.overwrite)
            summaries[f"run{index} {model_dir}"] = summary
        print(compare(summaries))
        print(f"reports in {args.out}/run*/report.html")
        return
    if args.model is None:
        raise ValueError("moelm analyze needs --model DIR or --compare DIR1 DIR2 ...")
    summary = analyze(args.model, args.out, args.data, args.metrics, args.limit, args.overwrite)
    mean = summary["mean_over_layers"]
    print(
        f"{summary['tokens']} tokens; mean over MoE layers: load max/mean {mean['load_max_over_mean']:.3f}, "
        f"routing entropy {mean['routing_entropy']:.3f}, I(domain; expert) {mean['mi_bits']:.4f} bits "
        f"(shuffled domains {mean['mi_shuffled_bits']:.4f})"
    )
    print(f"report: {args.out / 'report.html'}")


def register(sub: argparse._SubParsersAction) -> None:
    """The analyze subcommand."""
    analyze = sub.add_parser("analyze", help="routing analytics: expert load, co-selection, specialisation")
    analyze.add_argument("--model", type=Path, default=None, help="model directory with tokenizer.json")
    analyze.add_argument("--data", default="builtin", help="builtin, or a JSONL file with text and domain fields")
    analyze.add_argument("--metrics", type=Path, default=None, help="a run's metrics.jsonl (load over time)")
    analyze.add_argument("--out", type=Path, default=Path("analysis"), help="where the report goes")
    analyze.add_argument("--limit", type=common.POSITIVE_INT, default=400, help="documents to route")
    analyze.add_argument("--compare", type=Path, nargs="+", default=None, help="several model directories")
    analyze.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    analyze.set_defaults(func=cmd_analyze)
