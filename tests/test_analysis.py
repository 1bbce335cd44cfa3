"""Routing analytics: the statistics on constructed routings, and `moelm analyze` end to end on a tiny model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import save_tiny_model_with_tokenizer

from moelm.analysis import statistics
from moelm.cli import main


def constructed(num_tokens: int = 4000, num_domains: int = 4, specialised: bool = True, seed: int = 0):
    """Tokens of 4 domains; specialised: domain d always picks experts 2d and 2d+1; else random distinct pairs."""
    rng = np.random.default_rng(seed)
    domains = rng.integers(0, num_domains, num_tokens)
    if specialised:
        experts = np.stack([2 * domains, 2 * domains + 1], axis=1)
    else:
        experts = np.stack([rng.permutation(8)[:2] for _ in range(num_tokens)])
    return domains, experts


def test_a_router_that_sends_each_domain_to_its_own_experts_has_high_mi_and_a_low_shuffled_baseline():
    domains, experts = constructed()
    result = statistics.specialisation(domains, experts, 4, 8)
    assert result["mi_bits"] == pytest.approx(result["domain_entropy_bits"], abs=1e-9)  # experts tell the domain
    assert result["domain_entropy_bits"] == pytest.approx(2.0, abs=0.01)
    assert result["mi_shuffled_bits"] < 0.01
    counts = statistics.joint_counts(np.repeat(domains, 2), experts.reshape(-1), 4, 8)
    assert statistics.domain_top_expert_share(counts, 2) == pytest.approx(np.ones(4))


def test_a_router_that_ignores_the_domain_has_mi_near_zero_like_its_baseline():
    domains, experts = constructed(specialised=False)
    result = statistics.specialisation(domains, experts, 4, 8)
    assert result["mi_bits"] < 0.01 and result["mi_shuffled_bits"] < 0.01
    counts = statistics.joint_counts(np.repeat(domains, 2), experts.reshape(-1), 4, 8)
    assert np.all(statistics.domain_top_expert_share(counts, 2) < 0.35)  # uniform: 2/8


def test_co_selection_and_load_summary():
    experts = np.array([[0, 1], [0, 1], [2, 3]])
    matrix = statistics.co_selection(experts, 4)
    assert matrix[0, 1] == 2 and matrix[1, 0] == 2 and matrix[2, 3] == 1 and matrix[0, 2] == 0
    assert np.diag(matrix).tolist() == [2, 2, 1, 1]
    load = statistics.load_summary(np.array([4.0, 0.0, 2.0, 2.0]))
    assert load["load_max_over_mean"] == 2.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("analyzed") / "model"
    directory.mkdir()
    save_tiny_model_with_tokenizer(directory)
    metrics = [{"step": s, "loss": 5.0 - s / 10, "moe/layer1/load_max_over_mean": 2.0 - s / 20} for s in range(1, 6)]
    (directory.parent / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return directory


def test_analyze_writes_a_report_whose_files_all_exist(model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze", "--model", str(model_dir), "--out", str(out), "--limit", "40"]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    images = re.findall(r'src="([^"]+)"', page)
    assert "load_over_time.png" in images and "specialisation.png" in images
    assert all((out / name).is_file() and (out / name).stat().st_size > 1000 for name in images)
    summary = json.loads((out / "report.json").read_text())
    assert summary["domains"] == ["code", "language", "logic", "math"]
    layer = summary["layers"]["1"]
    assert sum(layer["load"]) == summary["tokens"] * summary["top_k"]
    assert 0 <= layer["mi_bits"] <= layer["domain_entropy_bits"] + 1e-9
    assert summary["final_metrics"]["loss"] == pytest.approx(4.5)


def test_a_uniform_router_shows_no_specialisation(model_dir, tmp_path):
    """Router weights zeroed: every token gets the same scores, hence the same experts: MI and baseline are 0."""
    from moelm import MoELM

    model = MoELM.from_pretrained(model_dir)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.weight.zero_()
    uniform = tmp_path / "uniform"
    model.save_pretrained(uniform)
    (uniform / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    from moelm.analysis.report import analyze

    summary = analyze(uniform, tmp_path / "out", limit=40)
    with pytest.raises(FileExistsError, match="--overwrite"):  # an earlier report is never silently replaced
        analyze(uniform, tmp_path / "out", limit=40)
    layer = summary["layers"]["1"]
    assert layer["mi_bits"] == pytest.approx(0.0, abs=1e-12) and layer["mi_shuffled_bits"] == pytest.approx(0.0)
    assert layer["load_max_over_mean"] == pytest.approx(summary["num_experts"] / summary["top_k"])


def test_compare_puts_runs_side_by_side(model_dir, tmp_path, capsys):
    argv = ["analyze", "--compare", str(model_dir), str(model_dir), "--out", str(tmp_path), "--limit", "20"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "load max/mean" in table and "run0 " in table and "run1 " in table


def test_a_jsonl_without_domains_is_a_one_line_error(model_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert main(["analyze", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o")]) == 2


def test_a_model_built_to_route_each_domain_to_its_own_experts_is_measured_as_specialised(tmp_path):
    """A real MoELM constructed so that the first MoE layer sends domain d's tokens to experts 2d and 2d+1:
    each domain's texts use their own letter (disjoint tokens), a token's embedding is one-hot on its domain's
    dimension, attention adds nothing (o_proj zero), and the router reads that dimension. Through `analyze`
    (tracing, statistics, report) the layer's MI must equal the domain entropy, its shuffled baseline ~0, and each
    domain's tokens must all land on its own two experts."""
    from conftest import tiny_config
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moelm import MoELM
    from moelm.analysis.report import analyze

    letters = {"alpha": "a", "beta": "b", "gamma": "c", "delta": "d"}
    rng = np.random.default_rng(0)
    records = [
        {"domain": domain, "text": letter * int(rng.integers(8, 40))}
        for _ in range(30)
        for domain, letter in letters.items()
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=10, special_tokens=["<s>", "</s>"])  # letters + their pairs
    tokenizer.train_from_iterator([r["text"] for r in records], trainer)
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), first_k_dense_replace=0, num_hidden_layers=1)
    model = MoELM(config)
    domain_order = sorted(letters)  # analyze numbers domains alphabetically
    with torch.no_grad():
        model.embed_tokens.weight.zero_()
        for token, token_id in tokenizer.get_vocab().items():
            owner = [d for d, letter in letters.items() if set(token) == {letter}]
            if owner:
                model.embed_tokens.weight[token_id, domain_order.index(owner[0])] = 1.0
        layer = model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        router = layer.mlp.router if hasattr(layer.mlp, "router") else layer.mlp.gate
        router.weight.zero_()
        for d in range(4):
            router.weight[2 * d, d] = router.weight[2 * d + 1, d] = 5.0
    model_dir = tmp_path / "constructed"
    model.save_pretrained(model_dir)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))

    summary = analyze(model_dir, tmp_path / "report", data=str(corpus), limit=len(records))
    first = summary["layers"]["0"]
    assert summary["domains"] == domain_order
    assert first["mi_bits"] == pytest.approx(first["domain_entropy_bits"], abs=1e-9)
    assert first["domain_entropy_bits"] > 1.5  # four domains with a fair share of tokens each
    assert first["mi_shuffled_bits"] < 0.01
    shares = first["domain_top_expert_share"]
    assert all(share == pytest.approx(1.0) for share in (shares.values() if isinstance(shares, dict) else shares))
