"""Bad input and accidents: one-line errors naming the problem, exit status != 0, and no earlier work lost."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_RUN, pretrain_command, reproducible_env, save_tiny_model_with_tokenizer
from safetensors.torch import load_file

from moelm import ConfigError, ModelConfig, MoELM
from moelm.cli import main
from moelm.train.recipe import SECTIONS, load_recipe
from moelm.train.trainer import Trainer

QUICK = [*TINY_RUN, "train.max_steps=10", "train.save_every=5", "train.keep_last=10", "train.eval_every=100"]


def _run(out: Path, *extra: str) -> int:
    argv = ["pretrain", "--out", str(out)]
    for item in [*QUICK, *extra]:
        argv += ["--set", item]
    return main(argv)


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- 1. output dir
def test_a_second_run_into_the_same_out_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    before = _tree(out)
    capsys.readouterr()
    assert _run(out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "--resume" in err and "--overwrite" in err
    assert _tree(out) == before


def test_overwrite_starts_over_and_clears_the_old_run(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "train.max_steps=15") == 0
    assert (out / "checkpoints" / "step-15").is_dir()
    (out / "notes.txt").write_text("mine")
    assert main(["pretrain", "--out", str(out), "--overwrite", *sum((["--set", s] for s in QUICK), [])]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-5"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]  # one run's metrics, not two runs appended
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the run's are left alone


def test_resume_and_overwrite_exclude_each_other(capsys, tmp_path):
    with pytest.raises(SystemExit) as usage_error:
        main(["pretrain", "--out", str(tmp_path), "--resume", "--overwrite"])
    assert usage_error.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 2-3. types
def test_scientific_notation_parses_in_yaml_and_overrides(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("optim:\n  lr: 3e-3\n  weight_decay: 1E-1\ntrain:\n  max_steps: 1e2\n")
    recipe = load_recipe(recipe_file, ["optim.min_lr_ratio=5e-2"])
    assert recipe.optim.lr == 0.003 and recipe.optim.weight_decay == 0.1 and recipe.optim.min_lr_ratio == 0.05
    assert recipe.train.max_steps == 100 and isinstance(recipe.train.max_steps, int)
    assert ModelConfig.from_dict({"rms_norm_eps": 1e-5}).rms_norm_eps == 1e-5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=abc", "invalid train.max_steps='abc': must be an integer"),
        ("optim.lr=abc", "invalid optim.lr='abc': must be a number"),
        ("data.seq_len=abc", "invalid data.seq_len='abc': must be an integer"),
        ("train.batch_size=1.5", "invalid train.batch_size=1.5: must be an integer (no fraction)"),
        ("model.hidden_size=64.5", "invalid model.hidden_size=64.5: must be an integer"),
        ("train.compile=maybe", "invalid train.compile='maybe': must be true or false"),
        ("log.sample_prompts=7", "invalid log.sample_prompts=7: must be a list of strings"),
        ("train.log_every=0", "invalid train.log_every=0: must be a positive integer"),
        ("optim.lr=[1", "not valid YAML"),
    ],
)
def test_wrong_types_fail_in_validation_naming_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_recipe(None, [override])
    assert message in str(error.value)


def test_a_fractional_batch_size_fails_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--set", "train.batch_size=1.5"]) == 2
    assert "train.batch_size=1.5" in capsys.readouterr().err
    assert not out.exists()


# Every key of every section gets values of the wrong type: the answer is always a ConfigError naming the key.
def _known_keys() -> list[tuple[str, type]]:
    from dataclasses import fields
    from typing import get_type_hints

    keys = [(f"model.{f.name}", get_type_hints(ModelConfig)[f.name]) for f in fields(ModelConfig)]
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        keys += [(f"{section}.{f.name}", hints[f.name]) for f in fields(cls)]
    return keys


def _fits(value: object, hint: object) -> bool:
    """Whether a value is of the field's type (then it is not a wrong-type case for the fuzz test)."""
    from moelm.config import coerce_value

    try:
        coerce_value("key", value, hint)
    except ConfigError:
        return False
    return True


def test_fuzzed_wrong_types_for_every_key_are_one_line_errors(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.one_of(
        st.text(max_size=8),
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.booleans(),
        st.lists(st.integers(0, 9), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
    )
    keys = _known_keys()
    recipe_file = tmp_path / "fuzz.yaml"

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(key=st.sampled_from(keys), value=values)
    def check(key, value):
        name, hint = key
        if _fits(value, hint):
            return
        section, field_name = name.split(".", 1)
        recipe_file.write_text(json.dumps({section: {field_name: value}}))  # JSON is YAML
        with pytest.raises(ConfigError) as error:
            load_recipe(recipe_file)
        message = str(error.value)
        assert field_name in message and "\n" not in message

    check()


# ---------------------------------------------------------------------------------------------- 4. damage
def _truncate(path: Path, keep: int = 20) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_resume_skips_a_damaged_newest_checkpoint_and_ends_bitwise_the_same(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    straight = load_file(out / "model" / "model.safetensors")
    _truncate(out / "checkpoints" / "step-10" / "model" / "model.safetensors")
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume", *sum((["--set", s] for s in QUICK), [])]) == 0
    captured = capsys.readouterr()
    assert "skipping damaged checkpoint step-10" in captured.err and "model.safetensors" in captured.err
    assert "resumed from" in captured.out and "step-5" in captured.out
    resumed = load_file(out / "model" / "model.safetensors")
    assert all(straight[name].equal(resumed[name]) for name in straight)


def test_resume_with_nothing_intact_names_each_damaged_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    _truncate(out / "checkpoints" / "step-10" / "trainer.pt")
    (out / "checkpoints" / "step-5" / "manifest.json").unlink()  # as written before manifests existed
    _truncate(out / "checkpoints" / "step-5" / "trainer.pt")
    before = _tree(out)
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume", *sum((["--set", s] for s in QUICK), [])]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("moelm: error: no intact checkpoint")
    assert "step-10/trainer.pt has" in last and "step-5/trainer.pt is unreadable" in last
    assert "Traceback" not in err
    assert _tree(out) == before


@pytest.mark.parametrize("damage", ["truncate", "garbage_config"])
def test_generate_on_a_damaged_model_directory_names_the_file(tmp_path, capsys, damage):
    save_tiny_model_with_tokenizer(tmp_path)
    if damage == "truncate":
        _truncate(tmp_path / "model.safetensors", 100)
        expected = "model.safetensors"
    else:
        (tmp_path / "config.json").write_text("{not json")
        expected = "config.json: not valid JSON"
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- 5. signals
def _wait_for_metrics(out: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and metrics.read_text().strip():
            return
        time.sleep(0.05)
    raise AssertionError("the run never logged a step")


@pytest.mark.slow  # ~60 s; test_train.py's SIGKILL resume covers bitwise resumption in the default suite
def test_sigterm_saves_a_checkpoint_and_resume_is_bitwise_identical(tmp_path):
    steps = 30
    env = reproducible_env()
    subprocess.run(pretrain_command(tmp_path / "straight", steps), check=True, capture_output=True, env=env)
    out = tmp_path / "stopped"
    process = subprocess.Popen(
        pretrain_command(out, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    _wait_for_metrics(out, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("moelm: interrupted at step ") and line.endswith("continue with --resume")
    step = int(line.split("at step ")[1].split()[0])
    assert 5 <= step < steps and (out / "checkpoints" / f"step-{step}" / "manifest.json").is_file()
    assert not (out / "model").exists()
    subprocess.run([*pretrain_command(out, steps), "--resume"], check=True, capture_output=True, env=env)
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(out / "model" / "model.safetensors")
    assert all(straight[name].equal(resumed[name]) for name in straight)


DOUBLE_SIGINT = """
import os, signal, time
from moelm.train.interrupt import StopOnSignal
with StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)  # the first one is only remembered: no KeyboardInterrupt
    print("requested", stop.requested, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("still running")
"""


def test_a_second_sigint_stops_at_once():
    result = subprocess.run([sys.executable, "-c", DOUBLE_SIGINT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert result.stdout == f"requested {int(signal.SIGINT)}\n"
    assert "second SIGINT: stopping now" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- 6. eval
def test_eval_checks_every_task_before_the_model_runs(tmp_path, capsys, monkeypatch):
    save_tiny_model_with_tokenizer(tmp_path)
    monkeypatch.setattr("moelm.cli.common.load_generator", lambda args: pytest.fail("the model was loaded"))
    assert main(["eval", "--model", str(tmp_path), "--tasks", "builtin,gsm8k"]) == 2
    assert "task gsm8k reads local benchmark files: pass --data-dir" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    argv = ["eval", "--model", str(tmp_path), "--tasks", "builtin,mbpp", "--data-dir", str(tmp_path / "data")]
    assert main(argv) == 2
    assert "mbpp/mbpp.jsonl" in capsys.readouterr().err


def test_a_task_failing_mid_run_keeps_the_finished_results(tmp_path, capsys, monkeypatch):
    from moelm.eval import harness

    save_tiny_model_with_tokenizer(tmp_path)

    def broken(model, data_dir, settings):
        raise RuntimeError("sandbox pool died")

    monkeypatch.setitem(harness.TASKS, "humaneval", broken)
    monkeypatch.setitem(harness.TASK_DATA, "humaneval", lambda data_dir: None)
    output = tmp_path / "results.json"
    argv = ["eval", "--model", str(tmp_path), "--tasks", "builtin,humaneval", "--limit", "2", "--output", str(output)]
    assert main([*argv, "--max-new-tokens", "4"]) == 1
    captured = capsys.readouterr()
    assert "task(s) humaneval failed (humaneval: RuntimeError: sandbox pool died)" in captured.err
    document = json.loads(output.read_text())
    assert list(document["results"]) == ["builtin"] and "humaneval" in document["failed"]
    n_line = next(line for line in captured.out.splitlines() if line.split()[1:2] == ["n"])
    assert n_line.split()[-1] == str(document["results"]["builtin"]["metrics"]["n"])  # a count, not 20.0000


# ---------------------------------------------------------------------------------------------- 7, 9. CLI
SUBCOMMANDS = [
    ["grpo"],
    ["info"],
    ["demo"],
    ["generate"],
    ["chat"],
    ["pretrain"],
    ["sft"],
    ["eval"],
    ["data", "builtin"],
    ["data", "traces"],
    ["tokenizer", "train"],
]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    probe = "import sys; from moelm.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
    probe += "    code = e.code\nprint('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH'); sys.exit(code)"
    return subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_help_and_bad_flags_answer_without_torch_or_traceback(command):
    shown = _cli(*command, "--help")
    assert shown.returncode == 0 and "usage: moelm" in shown.stdout and "NO_TORCH" in shown.stdout
    bad = _cli(*command, "--no-such-flag")
    assert bad.returncode == 2 and "usage: moelm" in bad.stderr and ": error: " in bad.stderr
    assert "Traceback" not in bad.stderr + shown.stderr and "NO_TORCH" in bad.stdout


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "-5"], "--max-new-tokens"),
        (["generate", "--model", "m", "--prompt", "p", "--top-p", "1.5"], "--top-p"),
        (["chat", "--model", "m", "--temperature", "-1"], "--temperature"),
        (["eval", "--model", "m", "--batch-size", "0"], "--batch-size"),
        (["demo", "--seq-len", "x"], "--seq-len"),
        (["data", "builtin", "--out", "f", "--num-records", "-1"], "--num-records"),
    ],
)
def test_numeric_flags_are_checked_by_the_parser(argv, flag):
    result = _cli(*argv)
    assert result.returncode == 2 and f"argument {flag}: must be" in result.stderr
    assert "Traceback" not in result.stderr and "NO_TORCH" in result.stdout


def test_version_answers_without_torch():
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("moelm 0.") and "NO_TORCH" in result.stdout


# ---------------------------------------------------------------------------------------------- 8, 10. small
def test_saved_files_get_the_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        MoELM(ModelConfig()).save_pretrained(tmp_path)
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_chat_colours_only_a_terminal(monkeypatch):
    import io

    from moelm.cli.generation import use_colour
    from moelm.infer.text import render_thinking

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour(Terminal()) and not use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(Terminal())
    assert render_thinking("<think>hmm</think>yes", True, False, dim=False) == ("<think>hmm</think>yes", False)
    assert render_thinking("<think>hmm</think>yes", False, False, dim=False) == ("yes", False)
    assert "\033[2m" in render_thinking("<think>hmm</think>yes", True, False)[0]


def test_chat_piped_output_has_no_escape_codes(tmp_path, monkeypatch, capsys):
    save_tiny_model_with_tokenizer(tmp_path)
    answers = iter(["<think> hmm </think> yes", ""])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(answers))
    assert main(["chat", "--model", str(tmp_path), "--max-new-tokens", "6"]) == 0
    assert "\033" not in capsys.readouterr().out


def test_the_log_says_when_the_tokenizer_got_fewer_tokens_than_asked(tmp_path):
    lines: list[str] = []
    recipe = load_recipe(None, [*QUICK, "data.vocab_size=4000", "train.max_steps=1"])
    trainer = Trainer(recipe, tmp_path, echo=lines.append)
    model = trainer.run()
    note = next(line for line in lines if line.startswith("tokenizer: "))
    assert f"tokenizer: {model.config.vocab_size} tokens of data.vocab_size=4000 asked" in note


def test_a_run_that_fails_during_set_up_leaves_nothing_that_blocks_the_rerun(tmp_path, capsys):
    save_tiny_model_with_tokenizer(tmp_path / "model")  # a tokenizer the run copies in before reading data
    out = tmp_path / "run"
    bad = ["--set", f"data.source={tmp_path / 'missing.jsonl'}", "--set", f"data.tokenizer={tmp_path / 'model'}"]
    assert main(["pretrain", "--out", str(out), *bad, "--set", "log.progress=false"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # the corrected command runs without --overwrite
    assert _run(out) == 0
