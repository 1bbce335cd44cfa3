"""GRPO: the loss against a float64 transcription of the formula, rewards on adversarial strings, a tiny run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import addition_task

from moelm.train.grpo_loss import group_advantages, grpo_loss, k3_kl
from moelm.train.rewards import (
    accuracy_reward,
    code_reward,
    combine,
    format_reward,
    overlong_penalty,
    tag_count_reward,
)


def test_k3_kl_is_non_negative_and_zero_at_the_reference():
    logp = torch.randn(3, 5)
    assert (k3_kl(logp, logp + torch.randn(3, 5)) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3, 5))


def test_identical_rewards_give_no_advantage_and_no_gradient():
    advantages = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), group_size=3)
    assert torch.equal(advantages[:3], torch.zeros(3)) and advantages[3] < 0 < advantages[4]
    logp = torch.randn(3, 4, requires_grad=True)
    loss = grpo_loss(logp, logp.detach(), None, torch.zeros(3), torch.ones(3, 4))
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(3, 4))
    assert torch.allclose(group_advantages(torch.tensor([0.0, 2.0]), 2, "none"), torch.tensor([-1.0, 1.0]))


def test_one_update_per_batch_starts_at_beta_kl_with_a_gradient():
    torch.manual_seed(1)
    logp = torch.randn(2, 6, requires_grad=True)
    ref = logp.detach() + 0.3
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 6)
    loss = grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.1, aggregation="bnpo")
    kl = k3_kl(logp.detach(), ref).mean()
    assert loss.item() == pytest.approx(0.1 * kl.item(), rel=1e-5)
    loss.backward()
    assert logp.grad.abs().sum() > 0


def test_rewards_on_adversarial_strings():
    completions = [
        "<think>7 + 5 = 12</think> 12",  # right
        "<think>the answer is 12</think>",  # answer only in the reasoning
        "<think><think>nested</think></think> 12",  # nested tags
        "<think>a</think> 12 <think>b</think> 12",  # repeated tags
        "<think>x</think>",  # empty answer
        "12" + "0" * 400,  # a huge number
        "The answer is #### 12",  # no reasoning, right answer
    ]
    answers = ["12"] * len(completions)
    domains = ["math"] * len(completions)
    accuracy = accuracy_reward([""] * 7, completions, answer=answers, domain=domains)
    assert accuracy == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert format_reward([""] * 7, completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    tags = tag_count_reward([""] * 7, completions)
    assert tags[0] == 1.0 and tags[2] < 1.0 and tags[3] < 1.0 and tags[4] == 0.75 and tags[6] == 0.0
    assert accuracy_reward([""], ["12"], answer=[None], domain=["math"]) == [None]  # cannot judge
    penalty = overlong_penalty(max_tokens=10, cache_tokens=4)
    assert penalty([""] * 4, [""] * 4, completion_tokens=[6, 8, 10, 30]) == [0.0, -0.5, -1.0, -1.0]
    assert combine({"a": [1.0, None], "b": [0.5, 1.0]}, {"a": 2.0, "b": 1.0}) == [2.5, 1.0]
    unjudged = combine({"a": [1.0, None], "b": [None, None]}, {"a": 1.0, "b": 1.0})
    assert unjudged[0] == 1.0 and math.isnan(unjudged[1])  # no function could judge it: NaN, not 0


def test_code_reward_counts_passing_tests_and_an_early_exit_scores_nothing():
    prompt = 'def add(a, b):\n    """Return a plus b."""\n'
    tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 5) == 6"]] * 4
    completions = [
        "    return a + b\n",
        "    return 3\n",
        "    import sys\n    sys.exit(0)\n",
        "    import os\n    os._exit(0)\n",
    ]
    rewards = code_reward([prompt] * 4, completions, tests=tests)
    assert rewards == [pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0, 0.0]
    assert code_reward([prompt], ["    return a + b\n"], tests=[None]) == [None]


# ---------------------------------------------------------------------------------------------- the trainer
def test_a_tiny_grpo_run_raises_the_reward(tmp_path):
    import json

    from moelm.train.grpo import GRPOTrainer
    from moelm.train.recipe import load_recipe

    overrides = [*addition_task(tmp_path), "train.max_steps=40", "train.log_every=1", "train.eval_every=40"]
    trainer = GRPOTrainer(
        load_recipe(None, overrides), tmp_path / "run", echo=lambda _: None, base_model=tmp_path / "base"
    )
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward"] for r in records[:10]) / 10
    last = sum(r["reward"] for r in records[-10:]) / 10
    assert last >= first + 0.1, (first, last)
    for key in ("reward/accuracy", "frac_reward_zero_std", "entropy", "clip_low", "clip_high", "truncated_frac"):
        assert key in records[-1]
    assert records[-1]["entropy"] < records[0]["entropy"]


@pytest.mark.parametrize("iterations", [1, 2])
def test_grpo_resume_is_exact(tmp_path, iterations):
    from conftest import assert_resume_is_exact

    from moelm.train.grpo import GRPOTrainer
    from moelm.train.recipe import load_recipe

    overrides = [
        *addition_task(tmp_path),
        "train.max_steps=6",
        "train.save_every=3",
        "train.eval_every=100",
        f"grpo.num_iterations={iterations}",
        "grpo.beta=0.04",  # with a reference model and stored old log-probs when iterations > 1
    ]
    recipe = load_recipe(None, overrides)
    assert_resume_is_exact(GRPOTrainer, recipe, tmp_path, tmp_path / "base", last_step=6, saved_step=3)


# ---------------------------------------------------------------------------------------------- traces
class _ScriptedTeacher:
    """A generator stand-in whose completions are fixed, so the verification and keep rules are checked."""

    def __init__(self, completions):
        self.completions = completions

    def chat_prompt(self, messages):
        return messages[-1]["content"]

    def generate(self, prompts, max_new_tokens, **kwargs):
        return [self.completions[i % len(self.completions)] for i in range(len(prompts))]


def test_rejection_sampling_keeps_verified_traces_as_sft_records(tmp_path):
    from moelm.data.sft import load_jsonl
    from moelm.train.grpo import Prompt
    from moelm.train.traces import sample_traces, write_traces

    prompts = [Prompt("What is 2 + 2?", "4", "math"), Prompt("What is 3 + 3?", "6", "math")]
    teacher = _ScriptedTeacher(["<think>2 + 2 = 4</think> 4", "<think>guess</think> 5", "4", "<think>x</think> 6"])
    correct = list(sample_traces(teacher, prompts, 4, 1.0, 16, "correct", 0))
    assert [(r["prompt"], r["response"], r.get("reasoning")) for r in correct] == [
        ("What is 2 + 2?", "4", "2 + 2 = 4"),
        ("What is 2 + 2?", "4", None),
        ("What is 3 + 3?", "6", "x"),
    ]
    assert all(r["correct"] and r["verdict"] == 1.0 for r in correct)
    assert len(list(sample_traces(teacher, prompts, 4, 1.0, 16, "all", 0))) == 8
    best = list(sample_traces(teacher, prompts, 4, 1.0, 16, "best", 0))
    assert [r["correct"] for r in best] == [True, True]
    counts = write_traces(iter(correct), tmp_path / "traces.jsonl")
    assert counts == {"math/correct": 3}
    examples, report = load_jsonl(tmp_path / "traces.jsonl")
    assert len(examples) == 3 and not report.skipped  # the next `moelm sft` reads them as they are


def test_data_traces_command_end_to_end(tmp_path, capsys):
    import json

    from conftest import save_tiny_model_with_tokenizer

    from moelm.cli import main

    save_tiny_model_with_tokenizer(tmp_path)
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": "two plus two", "answer": "four"}) + "\n")
    out = tmp_path / "traces.jsonl"
    argv = ["data", "traces", "--model", str(tmp_path), "--source", str(source), "--samples", "3"]
    assert main([*argv, "--keep", "all", "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert "1 prompts x 3 samples -> 3 records" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3
