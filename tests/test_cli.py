"""The `moelm` command line: the README's main job, `info`, and one-line errors for bad input."""

from __future__ import annotations

from moelm import ModelConfig, MoELM
from moelm.cli import main


def test_demo_prints_counts_and_a_forward_pass(capsys, tmp_path):
    assert main(["demo", "--preset", "tiny", "--seq-len", "16", "--save", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "total parameters:  2.27M" in out
    assert "active per token:  1.39M" in out
    assert "LM loss" in out
    assert MoELM.from_pretrained(tmp_path / "m").config.hidden_size == 128


def test_info_reports_v3_shape_without_allocating(capsys):
    assert main(["info", "v3-shape"]) == 0
    out = capsys.readouterr().out
    assert "total parameters:  671.03B" in out
    assert "active per token:  37.55B" in out


def test_info_on_a_saved_directory(capsys, tmp_path):
    MoELM(ModelConfig()).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "hidden_size: 128" in capsys.readouterr().out


def test_unknown_preset_is_a_one_line_error(capsys):
    assert main(["info", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelm: error:") and "tiny" in err and "Traceback" not in err


def test_generate_prints_a_completion_and_tokens_per_second(capsys, tmp_path):
    from conftest import save_tiny_model_with_tokenizer

    from moelm.infer.text import TextGenerator

    model, tokenizer = save_tiny_model_with_tokenizer(tmp_path)
    argv = ["generate", "--model", str(tmp_path), "--prompt", "the quick", "--max-new-tokens", "5"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    expected = TextGenerator(model.eval(), tokenizer).generate(["the quick"], 5)[0]
    assert captured.out.rstrip("\n") == expected
    assert "tokens/s" in captured.err
    assert main([*argv, "--stream", "--temperature", "0.7", "--seed", "3"]) == 0


def test_generate_without_tokenizer_is_a_one_line_error(capsys, tmp_path):
    MoELM(ModelConfig()).save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_chat_answers_each_turn(monkeypatch, capsys, tmp_path):
    from conftest import save_tiny_model_with_tokenizer

    save_tiny_model_with_tokenizer(tmp_path)
    answers = iter(["two plus two", ""])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(answers))
    assert main(["chat", "--model", str(tmp_path), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().err.count("tokens/s") == 1


def test_data_builtin_and_tokenizer_train_commands(tmp_path, capsys):
    import json

    corpus = tmp_path / "corpus.jsonl"
    assert main(["data", "builtin", "--out", str(corpus), "--num-records", "50", "--seed", "2"]) == 0
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(records) == 50 and {"text", "domain", "difficulty", "prompt", "answer"} <= set(records[0])
    assert (
        main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "tok")]) == 0
    )
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert main(["tokenizer", "train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "t2")]) == 2
    assert "not found" in capsys.readouterr().err
