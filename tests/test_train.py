"""Recipes, schedules, the trainer end to end, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_RUN, pretrain_command, reproducible_env
from safetensors.torch import load_file

from moelm import ConfigError
from moelm.cli import main
from moelm.train.recipe import load_recipe
from moelm.train.trainer import Trainer, learning_rate


def test_unknown_keys_and_bad_values_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="train.max_step"):
        load_recipe(None, ["train.max_step=5"])
    with pytest.raises(ConfigError, match="unknown recipe section"):
        load_recipe(None, ["trian.max_steps=5"])
    with pytest.raises(ConfigError, match=r"invalid data.seq_len=9999"):
        load_recipe(None, ["data.seq_len=9999"])
    with pytest.raises(ConfigError, match="n_routed_experts"):
        load_recipe(None, ["model.n_routed_experts=7"])
    assert main(["pretrain", "--out", str(tmp_path), "--set", "optim.schedule=linear"]) == 2


def test_schedules_warm_up_then_decay_to_the_floor():
    recipe = load_recipe(
        None, ["optim.warmup_steps=10", "train.max_steps=100", "optim.lr=1.0", "optim.min_lr_ratio=0.1"]
    )
    assert learning_rate(0, recipe) == pytest.approx(0.1)
    assert learning_rate(9, recipe) == pytest.approx(1.0)
    assert learning_rate(100, recipe) == pytest.approx(0.1)
    wsd = load_recipe(None, ["optim.schedule=wsd", "train.max_steps=100", "optim.lr=1.0", "optim.decay_fraction=0.2"])
    assert learning_rate(50, wsd) == pytest.approx(1.0)
    assert learning_rate(90, wsd) == pytest.approx(0.55)


def test_training_lowers_loss_logs_metrics_and_saves_a_loadable_model(tmp_path):
    recipe = load_recipe(None, [*TINY_RUN, "train.max_steps=40", "train.save_every=20", "moe.bias_update_rate=0.001"])
    trainer = Trainer(recipe, tmp_path, echo=lambda _: None)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 40
    assert records[-1]["lm_loss"] < 0.7 * records[0]["lm_loss"]
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "moe/load_max_over_mean", "val_ppl", "skipped_steps"):
        assert key in records[-1]
    assert records[-1]["moe/bias_abs_mean"] > 0  # the balancing hook ran
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-20", "step-40"]
    from moelm.infer.text import TextGenerator

    assert isinstance(TextGenerator.from_pretrained(tmp_path / "model").generate(["Q:"], 3)[0], str)


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("   \n")
    argv = ["pretrain", "--out", str(tmp_path / "run"), "--set", f"data.source={tmp_path / 'empty.txt'}"]
    assert main([*argv, "--set", "data.tokenizer=null", "--set", "log.progress=false"]) == 2
    assert "error" in capsys.readouterr().err


def test_sigkill_then_resume_gives_bitwise_identical_weights(tmp_path):
    steps = 20
    env = reproducible_env()
    subprocess.run(pretrain_command(tmp_path / "straight", steps), check=True, capture_output=True, env=env)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        pretrain_command(interrupted, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (interrupted / "checkpoints" / "step-10").is_dir():
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model").exists(), "the run was meant to die before finishing"
    subprocess.run([*pretrain_command(interrupted, steps), "--resume"], check=True, capture_output=True, env=env)
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(interrupted / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert straight[name].equal(resumed[name]), name


def test_second_run_reuses_the_tokenised_cache_and_bf16_autocast_trains(tmp_path):
    import math

    overrides = [*TINY_RUN, "train.max_steps=3", "train.save_every=3"]
    Trainer(load_recipe(None, overrides), tmp_path, echo=lambda _: None).run()
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 2 and all(p.suffix == ".npy" for p in cached)
    stamps = [p.stat().st_mtime_ns for p in cached]
    bf16 = Trainer(load_recipe(None, [*overrides, "train.dtype=bfloat16"]), tmp_path, echo=lambda _: None)
    bf16.run(overwrite=True)  # a new run in the same directory: the old run goes, the keyed data cache stays
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").iterdir())] == stamps
    assert math.isfinite(bf16.history[-1]["loss"])


@pytest.mark.slow  # torch.compile of forward and backward takes a minute or more on 2 cores
def test_compiled_training_matches_eager_losses(tmp_path):
    steps = [*TINY_RUN, "train.max_steps=3", "train.eval_every=100", "train.log_every=1", "train.save_every=100"]
    eager = Trainer(load_recipe(None, steps), tmp_path / "eager", echo=lambda _: None)
    eager.run()
    compiled = Trainer(load_recipe(None, [*steps, "train.compile=true"]), tmp_path / "compiled", echo=lambda _: None)
    compiled.run()
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)


FAULTS_PER_FRESH_BUFFER = """
import resource, sys, torch
from moelm.train.allocator import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
def step():  # a step's activations and gradients (MiB), all freed when it ends; all above the 32 MiB that
    # glibc's own adaptive threshold reaches, so by default every one is a fresh mapping every step
    buffers = [torch.empty(mib * 2**18).fill_(1.0) for mib in (40, 48, 36, 40, 64)]
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_reused_memory_spares_each_step_the_page_faults_of_fresh_buffers():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_FRESH_BUFFER, mode], capture_output=True, text=True)
        applied, per_step = out.stdout.split()
        return applied, float(per_step)

    applied, tuned = faults("reuse")
    if applied != "True":
        pytest.skip("not glibc: nothing to tune")
    _, default = faults("default")
    assert default > 50_000  # 228 MiB of fresh 4 KiB pages every step
    # Reused buffers fault only where the kernel reclaimed pages in between (2k-7k per step seen on this
    # machine, which runs a proactive reclaimer); without the tuning every page faults every step.
    assert tuned < default / 2


def test_train_step_can_be_driven_with_other_batches_and_losses(tmp_path):
    """GRPO and distributed training call train_step with their own micro-batches and loss."""
    import torch

    recipe = load_recipe(None, [*TINY_RUN, "train.max_steps=5", "train.max_skipped=2"])
    trainer = Trainer(recipe, tmp_path, echo=lambda _: None)
    trainer.setup()
    ids = torch.randint(3, 200, (2, 16))
    calls = []

    def custom_loss(model, inputs):
        calls.append(inputs["input_ids"].shape)
        out = model(**inputs)
        return out.lm_loss * 2, {"loss": out.lm_loss.item(), "custom": 1.0}, out.routing

    before = trainer.model.lm_head.weight.detach().clone()
    record = trainer.train_step([({"input_ids": ids, "labels": ids}, {"tokens": 32.0})] * 2, custom_loss)
    assert record["step"] == 1 == trainer.state.step and record["custom"] == 1.0 and len(calls) == 2
    assert not torch.equal(before, trainer.model.lm_head.weight)

    def broken(model, inputs):
        out = model(**inputs)
        return out.loss * float("nan"), {"loss": float("nan")}, out.routing

    assert trainer.train_step([({"input_ids": ids, "labels": ids}, {"tokens": 32.0})], broken) is None
    assert trainer.state.skipped == 1 and trainer.state.step == 2
    with pytest.raises(RuntimeError, match="2 consecutive non-finite steps"):
        trainer.train_step([({"input_ids": ids, "labels": ids}, {"tokens": 32.0})], broken)
    assert (tmp_path / "checkpoints" / "step-2").is_dir()  # saved before giving up
