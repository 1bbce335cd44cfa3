"""`moelm plan`: the table, the verdict, fitting layouts and one-line errors (the per-rank figures are checked
against real gloo steps in test_dist.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moelm.config import load_config
from moelm.dist.plan import Layout, in_flight, make_plan


def moelm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelm", *args], capture_output=True, text=True, timeout=120)


def test_plan_prints_one_row_per_pipeline_rank_and_a_verdict():
    result = moelm(
        "plan",
        "--model",
        "tiny",
        "--gpus",
        "4",
        "--set",
        "parallel.pipeline_degree=2",
        "--set",
        "parallel.expert_degree=2",
        "--set",
        "train.grad_accum=4",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "PP2 (1f1b) x EP2 x DP2 (fsdp)" in lines[0]
    assert [line.split()[0] for line in lines[2:4]] == ["0", "1"]
    assert lines[4].startswith("fits: peak")


def test_a_layout_that_does_not_fit_says_by_how_much_and_what_fits():
    result = moelm(
        "plan",
        "--model",
        "v2-lite-shape",
        "--gpus",
        "8",
        "--gpu",
        "a100",
        "--json",
        "--set",
        "data.seq_len=1024",
        "--set",
        "train.batch_size=8",
        "--set",
        "parallel.fsdp=false",
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["fits"] is False and plan["peak_memory_bytes"] > plan["gpu"]["memory_bytes"]
    assert plan["fitting_layouts"] and all(layout["sharding"] == "fsdp" for layout in plan["fitting_layouts"])


def test_sharding_divides_what_each_rank_keeps():
    config = load_config("tiny")
    whole = make_plan(config, Layout(gpus=4, sharding="none", batch_size=8)).ranks[0].state
    zero1 = make_plan(config, Layout(gpus=4, sharding="zero1", batch_size=8)).ranks[0].state
    fsdp = make_plan(config, Layout(gpus=4, sharding="fsdp", batch_size=8)).ranks[0].state
    assert zero1.parameters == whole.parameters and zero1.optimizer == pytest.approx(whole.optimizer / 4)
    assert fsdp.total == pytest.approx(whole.total / 4)


def test_one_f_one_b_keeps_fewer_micro_batches_on_later_stages():
    layout = Layout(gpus=4, pipeline_degree=4, grad_accum=8, batch_size=8)
    assert [in_flight(layout, rank) for rank in range(4)] == [4, 3, 2, 1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "parallel.expert_degree=3"], "parallel.expert_degree=3"),
        (["--set", "parallel.pipeline_degree=3"], "parallel.pipeline_degree=3 must divide --gpus 4"),
        (["--gpu", "tpu"], "invalid choice: 'tpu'"),
        (["--set", "train.batch_size=2"], "train.batch_size=2 must be a multiple"),
    ],
)
def test_impossible_layouts_fail_with_one_line(flags, message):
    result = moelm("plan", "--model", "tiny", "--gpus", "4", *flags)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
