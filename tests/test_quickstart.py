"""`moelm quickstart` with a seconds-long budget: every stage runs, the report and its figures are written."""

from __future__ import annotations

import json
import re

import pytest

from moelm.cli import main
from moelm.quickstart import budget


def test_budgets_scale_with_minutes_and_keep_floors():
    steps, problems = budget(15)
    assert steps == {"pretrain": 300, "sft": 200, "grpo": 150} and problems == 200
    small, few = budget(0.1)
    assert all(value == 2 for value in small.values()) and few == 20


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "run"
    assert main(["quickstart", "--out", str(out), "--minutes", "0.1"]) == 0
    return out


def test_quickstart_runs_every_stage_and_writes_a_report(quick, capsys):
    for stage in ("pretrain", "sft", "grpo"):
        assert (quick / stage / "model" / "config.json").is_file()
        assert json.loads((quick / f"eval-{stage}.json").read_text())["n"] == 20
    page = (quick / "report.html").read_text()
    for target in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert (quick / target).is_file(), target
    report = json.loads((quick / "report.json").read_text())
    assert set(report["evaluations"]) == {"pretrain", "sft", "grpo"}
    for stage in ("sft", "grpo"):  # sampled math accuracy of the chat-format stages: pass@8 covers pass@1
        sampled = report["evaluations"][stage]
        assert 0 <= sampled["math_pass@1"] <= sampled["math_pass@8"] <= 1
    assert "math_pass@1" not in report["evaluations"]["pretrain"] and "math pass@8" in page
    assert {"mi_bits", "mi_shuffled_bits", "load_max_over_mean"} <= set(report["analysis"])


def test_quickstart_refuses_a_used_directory_and_resumes_finished_stages_without_rerunning(quick, capsys):
    assert main(["quickstart", "--out", str(quick), "--minutes", "0.1"]) == 2
    assert "--resume" in capsys.readouterr().err
    before = (quick / "pretrain" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(["quickstart", "--out", str(quick), "--minutes", "0.1", "--resume"]) == 0
    output = capsys.readouterr().out
    assert "pretrain: done already" in output and output.strip().splitlines()[-1].startswith("report: ")
    assert (quick / "pretrain" / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_quickstart_records_its_seed_and_refuses_to_resume_with_another(quick, capsys):
    assert json.loads((quick / "report.json").read_text())["run"] == {"seed": 0, "minutes": 0.1}
    assert main(["quickstart", "--out", str(quick), "--minutes", "0.1", "--resume", "--seed", "1"]) == 2
    assert "--seed 1 differs from this quickstart's 0" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(quick), "--minutes", "0.2", "--resume"]) == 2
    assert "--minutes 0.2 differs" in capsys.readouterr().err


def test_the_seed_reaches_every_stage_recipe_and_each_recipe_round_trips_through_yaml(tmp_path):
    from moelm.quickstart import stage_recipe
    from moelm.train.recipe import load_recipe

    for stage in ("pretrain", "sft", "grpo"):
        recipe = stage_recipe(stage, 10, seed=7)
        assert recipe.train.seed == 7 and recipe.train.max_steps == 10
        (tmp_path / f"{stage}.yaml").write_text(recipe.to_yaml())
        assert load_recipe(tmp_path / f"{stage}.yaml") == recipe  # what `moelm pretrain|sft|grpo` would run
    assert stage_recipe("pretrain", 10).moe.bias_update_rate == 0.001
    assert [s.domains for s in stage_recipe("sft", 10).sft.sources] == [["math", "code", "logic", "language"]]
