"""Fine-tuning: chat template, assistant-only loss, record loaders, curriculum pacing, a tiny SFT run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_resume_is_exact, tiny_config

from moelm import MoELM
from moelm.config import ConfigError
from moelm.constants import IGNORE_INDEX
from moelm.data.builtin import builtin_corpus
from moelm.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatFormatError,
    encode_chat,
    load_chat_template,
    render_chat,
    save_chat_template,
)
from moelm.data.sft import builtin_example, load_bbh, load_gsm8k, load_jsonl, load_mbpp, load_mmlu
from moelm.data.sources import DataError
from moelm.data.tokenizer import train_tokenizer
from moelm.eval.exact_match import chat_exact_match, final_answer
from moelm.train.curriculum import CurriculumSampler, mixture_probabilities, pacing_fraction
from moelm.train.sft import EncodedExample, collate

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5", "reasoning": "2 + 3 = 5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([r.text for r in builtin_corpus(400, seed=3)], vocab_size=700)


def test_template_renders_r1_reasoning_and_generation_prompt():
    text = render_chat(CONVERSATION)
    assert "<|assistant|>\n<think>\n2 + 3 = 5\n</think>\n5</s>\n" in text
    assert text.endswith("<|assistant|>\n8</s>\n")
    prompt = render_chat(CONVERSATION[:2], add_generation_prompt=True)
    assert prompt.endswith("What is 2 + 3?\n<|assistant|>\n")
    with pytest.raises(ChatFormatError, match="role"):
        render_chat([{"role": "robot", "content": "hi"}])


def test_template_round_trips_through_tokenizer_and_model_directory(tokenizer, tmp_path):
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    assert tokenizer.decode(ids, skip_special_tokens=False) == render_chat(CONVERSATION)
    assert len(ids) == len(mask)
    custom = DEFAULT_CHAT_TEMPLATE.replace("<|", "<<|")
    save_chat_template(tmp_path, custom)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == custom
    assert load_chat_template(tmp_path) == custom
    assert load_chat_template(tmp_path / "missing") == DEFAULT_CHAT_TEMPLATE


def test_loss_only_on_assistant_tokens(tokenizer):
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    assistant = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert assistant == "<think>\n2 + 3 = 5\n</think>\n5</s>\n8</s>\n"
    example = EncodedExample(np.asarray(ids), np.asarray(mask), "t", 1.0)
    inputs = collate([[example]], None, pad_id=2)
    kept = inputs["labels"][0] != IGNORE_INDEX
    assert kept.tolist() == mask
    prompt_text = tokenizer.decode(inputs["input_ids"][0][~kept].tolist(), skip_special_tokens=False)
    assert "What is 2 + 3?" in prompt_text and "Answer briefly." in prompt_text


def test_packed_examples_do_not_see_each_other(tokenizer):
    model = MoELM(tiny_config(vocab_size=tokenizer.get_vocab_size())).eval()
    examples = []
    for record in builtin_corpus(2, seed=5, domains=("math",)):
        ids, mask = encode_chat(tokenizer, builtin_example(record).messages)
        examples.append(EncodedExample(np.asarray(ids), np.asarray(mask), "m", 1.0))
    packed = collate([examples], 128, pad_id=2)
    alone = collate([[examples[1]]], None, pad_id=2)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        alone_logits = model(**{k: v for k, v in alone.items() if k != "labels"}).logits
    n0, n1 = len(examples[0].ids), len(examples[1].ids)
    torch.testing.assert_close(packed_logits[0, n0 : n0 + n1], alone_logits[0], atol=1e-5, rtol=1e-5)
    assert packed["position_ids"][0, n0].item() == 0


def test_pacing_functions():
    assert pacing_fraction("none", 0.0) == 1.0
    assert pacing_fraction("linear", 0.0, start=0.2, full_at=0.8) == pytest.approx(0.2)
    assert pacing_fraction("linear", 0.4, start=0.2, full_at=0.8) == pytest.approx(0.6)
    assert pacing_fraction("linear", 0.9, start=0.2, full_at=0.8) == 1.0
    assert pacing_fraction("root", 0.4, start=0.2, full_at=0.8) == pytest.approx((0.04 + 0.96 * 0.5) ** 0.5)
    assert [pacing_fraction("step", p, start=0.1, full_at=1.0, steps=4) for p in (0, 0.3, 0.6, 0.99)] == [
        0.25,
        0.5,
        0.75,
        1.0,
    ]
    with pytest.raises(ConfigError, match="pacing"):
        pacing_fraction("exponential", 0.5)


def test_sampler_order_follows_pacing():
    difficulties = list(range(100))
    sampler = CurriculumSampler(difficulties, ["t"] * 100, pacing="linear", start=0.1, full_at=1.0, seed=1)
    for progress in (0.0, 0.25, 0.5, 1.0):
        unlocked = pacing_fraction("linear", progress, start=0.1, full_at=1.0)
        drawn = [difficulties[sampler.draw((i,), progress)] for i in range(300)]
        assert max(drawn) < np.ceil(unlocked * 100)  # only the easiest g(p) share is ever drawn
        assert max(drawn) >= np.ceil(unlocked * 100) - 10  # and all of it is reachable
    anti = CurriculumSampler(difficulties, ["t"] * 100, pacing="linear", start=0.1, full_at=1.0, anti=True)
    assert min(difficulties[anti.draw((i,), 0.0)] for i in range(100)) >= 90
    baseline = CurriculumSampler(difficulties, ["t"] * 100, pacing="none")
    assert max(difficulties[baseline.draw((i,), 0.0)] for i in range(300)) > 90
    assert sampler.draw((7,), 0.3) == sampler.draw((7,), 0.3)  # a pure function of (seed, index, progress)


def test_mixture_weights_and_temperature():
    probs = mixture_probabilities({"a": 900, "b": 100})
    assert probs == pytest.approx({"a": 0.9, "b": 0.1})
    flat = mixture_probabilities({"a": 900, "b": 100}, temperature=1e6)
    assert flat["a"] == pytest.approx(0.5, abs=1e-3)
    assert mixture_probabilities({"a": 1, "b": 1}, {"a": 3.0, "b": 1.0}) == pytest.approx({"a": 0.75, "b": 0.25})
    with pytest.raises(ConfigError, match="unknown task"):
        mixture_probabilities({"a": 1}, {"z": 1.0})
    sampler = CurriculumSampler([1.0] * 20, ["a"] * 10 + ["b"] * 10, weights={"a": 1.0, "b": 0.0})
    assert all(sampler.draw((i,), 0.5) < 10 for i in range(100))


def test_jsonl_loader_reports_malformed_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"prompt": "Hi", "response": "Hello"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps({"prompt": "only a prompt"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    examples, report = load_jsonl(path)
    assert len(examples) == 2 and report.loaded == 2
    assert [reason.split(":")[1] for reason in report.skipped] == ["2", "4", "5"]
    assert "invalid JSON" in report.skipped[0] and "wizard" in report.skipped[1]
    with pytest.raises(DataError, match=r"data.jsonl:2"):
        load_jsonl(path, strict=True)


def test_benchmark_converters(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    answer = "He buys 3*2=<<3*2=6>>6.\nThen 6+1=<<6+1=7>>7.\n#### 1,007"
    gsm.write_text(json.dumps({"question": "How many?", "answer": answer}) + "\n")
    (example,), _ = load_gsm8k(gsm)
    assert example.answer == "1007" and example.difficulty == 2.0
    assert example.messages[-1]["reasoning"] == "He buys 3*2=6.\nThen 6+1=7."

    mbpp = tmp_path / "mbpp.jsonl"
    row = {"text": "Add.", "code": "def f(a):\r\n  return a", "test_list": ["assert f(1)==1"]}
    rows = [{"task_id": t, **row} for t in (5, 11, 600)]
    mbpp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = load_mbpp(mbpp)
    assert len(examples) == 2  # 5 (prompting split) and 600 (train); 11 is a test task
    assert "Your code should pass these tests:\n\nassert f(1)==1" in examples[0].messages[0]["content"]

    bbh = tmp_path / "tracking_shuffled_objects_seven_objects.json"
    bbh.write_text(json.dumps({"canary": "x", "examples": [{"input": "Q?", "target": "(A)"}]}))
    (example,), _ = load_bbh(bbh)
    assert example.task == "bbh/tracking_shuffled_objects_seven_objects" and example.difficulty == 3.0

    headerless = tmp_path / "astronomy_dev.csv"
    headerless.write_text('"What orbits Earth?",Sun,Moon,Mars,Venus,B\n')
    header = tmp_path / "anatomy_dev.csv"
    header.write_text("question,choice0,choice1,choice2,choice3,answer\nBones?,1,206,3,4,1\n")
    examples, _ = load_mmlu(tmp_path)
    assert {(e.task, e.answer) for e in examples} == {("mmlu/astronomy", "B"), ("mmlu/anatomy", "B")}
    astronomy = next(e for e in examples if e.task == "mmlu/astronomy")
    assert astronomy.messages[1]["content"] == "What orbits Earth?\nA. Sun\nB. Moon\nC. Mars\nD. Venus"
    assert astronomy.messages[0]["content"].endswith("about astronomy.")


def test_final_answer_extraction():
    assert final_answer("<think>\n2 + 3 = 5\n</think>\n5") == "5"
    assert final_answer("<think>a</think> x </think> 1,234.") == "1234"
    assert final_answer("True") == "True"


def test_tiny_sft_run_raises_held_out_exact_match(tmp_path, tokenizer):
    from moelm.infer.text import TextGenerator
    from moelm.train.recipe import load_recipe
    from moelm.train.sft import SFTTrainer

    base = tmp_path / "base"
    config = tiny_config(vocab_size=tokenizer.get_vocab_size(), bos_token_id=0, eos_token_id=1, pad_token_id=2)
    MoELM(config).save_pretrained(base)
    tokenizer.save(str(base / "tokenizer.json"))
    overrides = [
        "sft.sources=[{format: builtin, num_records: 1200, domains: [logic], max_difficulty: 1}]",
        "sft.pacing=linear",
        "sft.val_examples=40",
        "sft.max_new_tokens=6",
        "data.seq_len=64",
        "train.max_steps=100",
        "train.batch_size=16",
        "train.eval_every=50",
        "train.save_every=1000",
        "optim.lr=0.003",
        "optim.warmup_steps=10",
        "log.progress=false",
    ]
    trainer = SFTTrainer(load_recipe(None, overrides), tmp_path / "out", echo=lambda _: None, base_model=base)
    tuned = trainer.run()
    template = trainer.chat_template()
    base_model = MoELM.from_pretrained(base).eval()
    before, _ = chat_exact_match(TextGenerator(base_model, tokenizer, template), trainer.batches.val_examples, 6)
    after, samples = chat_exact_match(TextGenerator(tuned.eval(), tokenizer, template), trainer.batches.val_examples, 6)
    assert after["exact_match"] >= before["exact_match"] + 0.3, (before, after, samples[:3])
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["unlocked_frac"] < records[-1]["unlocked_frac"] == 1.0
    assert "difficulty_mean" in records[0] and "exact_match/builtin/logic" in records[-1]
    assert load_chat_template(tmp_path / "out" / "model") == template


@pytest.mark.parametrize("batching", ["pack", "pad"])
def test_sft_resume_is_exact(tmp_path, tokenizer, batching):

    from moelm.train.recipe import load_recipe
    from moelm.train.sft import SFTTrainer

    base = tmp_path / "base"
    MoELM(tiny_config(vocab_size=tokenizer.get_vocab_size(), eos_token_id=1)).save_pretrained(base)
    tokenizer.save(str(base / "tokenizer.json"))
    overrides = [
        "sft.sources=[{format: builtin, num_records: 300, domains: [math, logic]}]",
        f"sft.batching={batching}",
        "sft.bucket_batches=4",
        "sft.pacing=step",
        "sft.eval_exact_match=false",
        "sft.val_examples=4",
        "sft.max_new_tokens=4",
        "data.seq_len=96",
        "train.max_steps=6",
        "train.batch_size=4",
        "train.save_every=3",
        "train.eval_every=3",
        "log.progress=false",
    ]
    recipe = load_recipe(None, overrides)
    interrupted = assert_resume_is_exact(SFTTrainer, recipe, tmp_path, base, last_step=6, saved_step=3)
    assert len((interrupted / "metrics.jsonl").read_text().splitlines()) == 6 // recipe.train.log_every + 2


def test_sft_config_errors_name_the_field(tmp_path):
    from moelm.train.recipe import load_recipe
    from moelm.train.sft import SFTTrainer

    with pytest.raises(ConfigError, match="sft.pacing"):
        load_recipe(None, ["sft.pacing=fast"])
    with pytest.raises(ConfigError, match="sft.batching"):
        load_recipe(None, ["sft.batching=stack"])
    with pytest.raises(ConfigError, match="config.json"):
        SFTTrainer(load_recipe(None, []), tmp_path, base_model=tmp_path / "nothing")


def test_loss_difficulty_is_each_examples_own_assistant_loss(tokenizer):
    from moelm.train.sft import loss_difficulty

    model = MoELM(tiny_config(vocab_size=tokenizer.get_vocab_size())).eval()
    examples = []
    for record in builtin_corpus(5, seed=9, domains=("math", "logic")):
        ids, mask = encode_chat(tokenizer, builtin_example(record).messages)
        examples.append(EncodedExample(np.asarray(ids), np.asarray(mask), "t", 1.0))
    scores = loss_difficulty(model, examples, pad_id=2, batch_size=2)  # batched with right padding
    with torch.no_grad():
        alone = [model(**collate([[e]], None, pad_id=2)).lm_loss.item() for e in examples]
    assert scores == pytest.approx(alone, rel=1e-4)
