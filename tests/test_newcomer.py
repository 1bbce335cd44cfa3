"""What a new user meets first: a base model in chat and behind the server, eval's progress total, demo's report."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from conftest import save_tiny_model_with_tokenizer

from moelm.cli import main
from moelm.cli.generation import EMPTY_ANSWER_NOTE
from moelm.eval.lm import EvalModel
from moelm.infer.text import TextGenerator
from moelm.model.transformer import MoELM


@pytest.fixture(scope="module")
def silent_base_model(tmp_path_factory):
    """A base model (no chat template) that ends every turn at once: a zero head makes every logit equal, greedy
    takes the first id, and the config names that id as its EOS."""
    directory = tmp_path_factory.mktemp("base")
    save_tiny_model_with_tokenizer(directory)
    model = MoELM.from_pretrained(directory)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.config = model.config.replace(bos_token_id=None, eos_token_id=0)
    model.save_pretrained(directory)
    return directory


def test_chat_with_a_base_model_says_it_has_no_template_and_that_the_answer_was_empty(
    silent_base_model, monkeypatch, capsys
):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n"))
    assert main(["chat", "--model", str(silent_base_model), "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "has no chat template (it was never chat-tuned)" in err
    assert EMPTY_ANSWER_NOTE in err


def test_the_server_states_an_empty_reply_and_logs_it(silent_base_model, caplog):
    from fastapi.testclient import TestClient

    from moelm.serve.app import ServerConfig, create_app

    generator = TextGenerator.from_pretrained(silent_base_model)
    assert not generator.chat_tuned
    with caplog.at_level(logging.WARNING, logger="moelm.serve"):
        with TestClient(create_app(generator, ServerConfig("base"))) as http:
            body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
            reply = http.post("/v1/chat/completions", json=body).json()
    choice = reply["choices"][0]
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop"
    assert choice["moelm_note"].startswith("empty reply") and "never chat-tuned" in choice["moelm_note"]
    assert any("empty reply" in r.getMessage() for r in caplog.records)
    assert any("no chat template" in r.getMessage() for r in caplog.records)


def test_eval_announces_each_call_s_request_count_before_running_it(silent_base_model):
    announced, finished = [], []
    model = EvalModel(TextGenerator.from_pretrained(silent_base_model), 2, finished.append)
    model.expect = announced.append
    model.generate(["a", "b", "c"], max_new_tokens=2)
    assert announced == [3] and sum(finished) == 3 and finished  # the total is known before the first finishes
    model.loglikelihood([("a", " b"), ("c", " d")])
    assert announced == [3, 2] and sum(finished) == 5


def test_demo_prints_one_line_of_integer_counts_per_layer(capsys):
    assert main(["demo", "--seq-len", "16"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("layer ")]
    assert [line.split(":")[0].strip() for line in lines] == ["layer 1", "layer 2", "layer 3", "layer 4"]
    counts = lines[0].split(":")[1].split("(")[0].split()
    assert len(counts) == 8 and sum(int(c) for c in counts) == 2 * 16 * 2  # batch x tokens x top-k, all integers
