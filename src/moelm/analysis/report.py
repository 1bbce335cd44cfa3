"""`moelm analyze`: routing analytics of a model directory written as PNGs, report.json and a static report.html.

The HTML references only files written beside it, so it opens from disk with no server. matplotlib runs with
the Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from moelm.analysis.routing import labelled_documents, summarise, trace_routing
from moelm.files import atomic_write_text


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_over_time(metrics_file: Path) -> dict[str, list[tuple[float, float]]]:
    """moe/layerN/load_max_over_mean against the step, per layer, from a run's metrics.jsonl."""
    series: dict[str, list[tuple[float, float]]] = {}
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        for key, value in record.items():
            if key.startswith("moe/layer") and key.endswith("/load_max_over_mean"):
                series.setdefault(key.split("/")[1], []).append((record["step"], value))
    return series


def write_plots(summary: dict[str, Any], out: Path, series: dict[str, list] | None = None) -> list[str]:
    """The analysis figures as PNGs in `out`; returns their file names."""
    plt = _pyplot()
    layers = sorted(summary["layers"], key=int)
    written = []

    figure, axis = plt.subplots(figsize=(8, 1 + 0.5 * len(layers)))
    image = axis.imshow([summary["layers"][layer]["load"] for layer in layers], aspect="auto", cmap="viridis")
    axis.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    axis.set_xlabel("expert")
    axis.set_ylabel("MoE layer")
    axis.set_title("tokens routed to each expert")
    figure.colorbar(image, label="tokens")
    figure.tight_layout()
    figure.savefig(out / "expert_load.png")
    plt.close(figure)
    written.append("expert_load.png")

    figure, axis = plt.subplots(figsize=(6, 3.5))
    positions = range(len(layers))
    axis.bar(
        [p - 0.2 for p in positions], [summary["layers"][name]["mi_bits"] for name in layers], 0.4, label="domains"
    )
    axis.bar(
        [p + 0.2 for p in positions],
        [summary["layers"][name]["mi_shuffled_bits"] for name in layers],
        0.4,
        label="shuffled domains",
    )
    axis.set_xticks(list(positions), [f"layer {layer}" for layer in layers])
    axis.set_ylabel("I(domain; expert), bits")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "specialisation.png")
    plt.close(figure)
    written.append("specialisation.png")

    middle = layers[len(layers) // 2]
    figure, axis = plt.subplots(figsize=(5, 4.5))
    image = axis.imshow(summary["layers"][middle]["co_selection"], cmap="magma")
    axis.set_title(f"experts chosen together (layer {middle})")
    axis.set_xlabel("expert")
    axis.set_ylabel("expert")
    figure.colorbar(image, label="tokens routed to both")
    figure.tight_layout()
    figure.savefig(out / "co_selection.png")
    plt.close(figure)
    written.append("co_selection.png")

    if series:
        figure, axis = plt.subplots(figsize=(7, 3.5))
        for layer, points in sorted(series.items()):
            axis.plot([p[0] for p in points], [p[1] for p in points], label=layer)
        axis.set_xlabel("step")
        axis.set_ylabel("max / mean expert load")
        axis.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(out / "load_over_time.png")
        plt.close(figure)
        written.append("load_over_time.png")
    return written


def write_html(summary: dict[str, Any], images: list[str], out: Path, title: str) -> None:
    """A static page: the summary table per layer, the figures, each expert's favourite tokens."""
    rows = []
    for layer, values in sorted(summary["layers"].items(), key=lambda item: int(item[0])):
        shares = ", ".join(f"{d} {s:.2f}" for d, s in values["domain_top_expert_share"].items())
        rows.append(
            f"<tr><td>{layer}</td><td>{values['load_max_over_mean']:.2f}</td><td>{values['routing_entropy']:.3f}</td>"
            f"<td>{values['mi_bits']:.4f}</td><td>{values['mi_shuffled_bits']:.4f}</td><td>{html.escape(shares)}</td></tr>"
        )
    middle = sorted(summary["layers"], key=int)[len(summary["layers"]) // 2]
    tokens = "".join(
        f"<li>expert {e}: {html.escape(' | '.join(repr(t) for t in words))}</li>"
        for e, words in enumerate(summary["layers"][middle]["top_tokens"])
    )
    figures = "".join(f'<figure><img src="{name}" alt="{name}"></figure>' for name in images)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}
td,th{{padding:2px 8px}}img{{max-width:100%}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>{summary["tokens"]} tokens from domains {html.escape(", ".join(summary["domains"]))};
{summary["num_experts"]} routed experts, top-{summary["top_k"]}. Uniform routing would give each domain's own top
experts a share of {summary["uniform_top_expert_share"]:.2f}.</p>
<table><tr><th>layer</th><th>load max/mean</th><th>routing entropy</th><th>MI bits</th><th>MI shuffled</th>
<th>share of each domain's tokens on its top-k experts</th></tr>{"".join(rows)}</table>
{figures}<h2>Most frequent tokens per expert (layer {middle})</h2><ul>{tokens}</ul></body></html>"""
    atomic_write_text(out / "report.html", page)


def analyze(
    model_dir: Path,
    out: Path,
    data: str = "builtin",
    metrics: Path | None = None,
    limit: int = 400,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The whole analysis of one model directory into `out` (report.json, report.html, PNGs); an earlier report
    there is replaced only with overwrite=True."""
    from moelm.infer.text import TextGenerator

    if (out / "report.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a report; pass --overwrite to replace it or choose another --out")

    generator = TextGenerator.from_pretrained(model_dir)
    trace = trace_routing(generator.model, generator.tokenizer, labelled_documents(data, limit))
    summary = summarise(trace, generator.model, generator.tokenizer)
    if metrics is None and (model_dir.parent / "metrics.jsonl").is_file():
        metrics = model_dir.parent / "metrics.jsonl"
    series = load_over_time(metrics) if metrics is not None and metrics.is_file() else {}
    summary["final_metrics"] = _last_metrics(metrics) if metrics is not None and metrics.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    images = write_plots(summary, out, series)
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1))
    write_html(summary, images, out, f"Routing analysis of {model_dir}")
    return summary


def _last_metrics(metrics: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    for line in metrics.read_text().splitlines():
        try:
            last.update(json.loads(line))
        except ValueError:
            continue
    return {k: v for k, v in last.items() if k in ("step", "loss", "lm_loss", "val_loss", "val_ppl")}


def compare(summaries: dict[str, dict[str, Any]]) -> str:
    """A text table of several analyses side by side (balance methods: aux loss, aux-free bias, none)."""
    header = f"{'run':<48} {'load max/mean':>14} {'MI bits':>9} {'MI shuffled':>12} {'loss':>8}"
    lines = [header]
    for name, summary in summaries.items():
        mean = summary["mean_over_layers"]
        loss = summary.get("final_metrics", {}).get("loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        shown = name if len(name) <= 48 else name[:8] + "..." + name[-37:]
        lines.append(
            f"{shown:<48} {mean['load_max_over_mean']:>14.3f} {mean['mi_bits']:>9.4f} "
            f"{mean['mi_shuffled_bits']:>12.4f} {loss_text:>8}"
        )
    return "\n".join(lines)
