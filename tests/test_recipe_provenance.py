"""One config system: declared constraints over every key, typed sources, composition, provenance and resume
checks, legacy checkpoints, BOS consistency and the newcomer's defects."""

from __future__ import annotations

import hashlib
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from hypothesis import given, settings
from hypothesis import strategies as st

from moelm import ConfigError, MoELM, MoEOptions
from moelm.cli import main
from moelm.config import ModelConfig, load_config
from moelm.data.source_specs import BuiltinSource, JsonlSource
from moelm.data.sources import DataError, jsonl_records
from moelm.files import write_manifest
from moelm.schema import constraints, field_hints
from moelm.train.recipe import SECTIONS, Recipe, load_recipe, recipe_from_dict

FIXTURES = Path(__file__).parent / "fixtures"
# The recipe of the legacy fixtures (config.json and recipe.json written by moelm at 32d6d62), as its command line.
LEGACY_ARGS = [
    "model.hidden_size=16",
    "model.num_hidden_layers=2",
    "model.moe_intermediate_size=8",
    "model.intermediate_size=32",
    "model.kv_lora_rank=8",
    "model.n_routed_experts=4",
    "model.num_attention_heads=2",
    "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=4",
    "model.v_head_dim=8",
    "moe.bias_update_rate=0.01",
    "data.builtin_records=300",
    "data.vocab_size=280",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.save_every=2",
    "train.keep_last=1",
    "train.eval_every=2",
    "log.progress=false",
    "log.sample_tokens=0",
]

SCOPES: dict[str, type] = {"model": ModelConfig, **SECTIONS}
KEYS = [(scope, name) for scope, cls in SCOPES.items() for name, _, _ in constraints(cls)]


def _wrong_type(hint: typing.Any) -> st.SearchStrategy:
    """Values that no field of this type hint accepts."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, __import__("types").UnionType) and len(args) == 1:
        hint, origin = args[0], typing.get_origin(args[0])
    if hint in (int, float):
        return st.text(min_size=1, max_size=5) | st.booleans() | st.lists(st.integers(), max_size=2)
    if hint is int:
        return st.text(min_size=1)
    if hint is bool:
        return st.integers() | st.text(min_size=1, max_size=5)
    if hint is str:
        return st.integers() | st.floats(allow_nan=False) | st.lists(st.text(max_size=3), max_size=2)
    if origin in (list, dict):
        return st.integers() | st.floats(allow_nan=False) | st.booleans()
    return st.nothing()


def _build(scope: str, name: str, value: typing.Any) -> Recipe:
    section = {"preset": "tiny", name: value} if scope == "model" else {name: value}
    return recipe_from_dict({scope: section})


@pytest.mark.parametrize(("scope", "name"), KEYS, ids=[f"{s}.{n}" for s, n in KEYS])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_every_key_rejects_wrong_types_and_out_of_range_values_in_one_line_naming_it(scope, name, data):
    hint = field_hints(SCOPES[scope])[name]
    constraint = dict((n, c) for n, _, c in constraints(SCOPES[scope]))[name]
    strategies = [_wrong_type(hint)]
    if constraint is not None and hint in (int, float, int | None, float | None):
        numbers = st.integers(-(10**6), 10**6) if int in typing.get_args(hint) or hint is int else st.floats(-1e6, 1e6)
        strategies.append(numbers.filter(lambda v: not constraint.test(v)))
    value = data.draw(st.one_of(*strategies))
    with pytest.raises(ConfigError) as error:
        _build(scope, name, value)
    message = str(error.value)
    assert "\n" not in message
    assert f"{scope}.{name}" in message, message


def test_cross_field_rules_name_the_key_and_the_other_side():
    cases = {
        ("model.num_experts_per_tok=9",): "invalid model.num_experts_per_tok=9: must be at most n_routed_experts=8",
        ("data.seq_len=4096",): "invalid data.seq_len=4096: must be 2..model.max_position_embeddings=2048",
        ("parallel.expert_degree=3",): "invalid parallel.expert_degree=3: must be a divisor of model.n_routed_experts",
        ("moe.load_loss_coef=0.1",): "invalid moe.load_loss_coef=0.1: must be 0 unless model.noisy_gating is true",
        ("grpo.overlong_cache_tokens=32",): "invalid grpo.overlong_cache_tokens=32: must be 0 (off) or fewer",
    }
    for overrides, expected in cases.items():
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_recipe(None, list(overrides))


def test_run_settings_moved_out_of_the_model_are_named_with_their_new_key():
    with pytest.raises(ConfigError, match=r"model.bias_update_rate is a run setting.*moe.bias_update_rate"):
        load_recipe(None, ["model.bias_update_rate=0.01"])
    with pytest.raises(ConfigError, match="run settings, not architecture"):
        ModelConfig.from_dict({"capacity_factor": 1.25})
    assert "bias_update_rate" not in load_config("tiny").to_hf_dict()["moelm"]


def test_sources_are_typed_specs_and_errors_name_the_entry():
    recipe = load_recipe(
        None, ["sft.sources=[{format: builtin, domains: [logic], weight: 2}, {format: jsonl, path: a}]"]
    )
    first, second = recipe.sft.sources
    assert isinstance(first, BuiltinSource) and first.domains == ["logic"] and first.weight == 2.0
    assert isinstance(second, JsonlSource) and second.path == "a"
    bad = {
        "sft.sources=[]": r"invalid sft.sources=\[\]",
        "sft.sources=[{path: a}]": r"invalid sft.sources\[0\]=.*must be a mapping with a format",
        "sft.sources=[{format: builtin, num_records: -1}]": r"invalid sft.sources\[0\].num_records=-1",
        "sft.sources=[{format: builtin, domains: [poetry]}]": r"invalid sft.sources\[0\].domains=\['poetry'\]",
        "sft.sources=[{format: gsm8k}]": r"sft.sources\[0\] \(gsm8k\) needs a path",
        "grpo.sources=[{format: mbpp, path: x}]": r"invalid grpo.sources\[0\].format='mbpp'",
        "sft.sources=[{format: jsonl, path: a, colour: red}]": r"unknown key\(s\) \['sft.sources\[0\].colour'\]",
    }
    for override, expected in bad.items():
        with pytest.raises(ConfigError, match=expected):
            load_recipe(None, [override])


def test_recipes_compose_and_round_trip_through_yaml_and_their_dict(tmp_path):
    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "sft-tiny.yaml")
    changed = recipe.replace(train={"max_steps": 7}, moe={"aux_loss_alpha": 0.01}, model={"n_group": 2})
    assert (changed.train.max_steps, changed.moe.aux_loss_alpha, changed.model.n_group) == (7, 0.01, 2)
    assert recipe.train.max_steps == 300  # the original is untouched
    assert changed.train.batch_size == recipe.train.batch_size
    with pytest.raises(ConfigError, match="invalid train.max_steps=0"):
        recipe.replace(train={"max_steps": 0})
    with pytest.raises(ConfigError, match="unknown recipe section 'trian'"):
        recipe.replace(trian={"max_steps": 1})
    (tmp_path / "r.yaml").write_text(changed.to_yaml())
    assert load_recipe(tmp_path / "r.yaml") == changed
    assert recipe_from_dict(json.loads(json.dumps(changed.to_dict()))) == changed
    for name in ("pretrain-tiny.yaml", "grpo-tiny.yaml", "pretrain-small-8gpu.yaml"):
        shipped = load_recipe(Path(__file__).parents[1] / "configs" / name)
        assert recipe_from_dict(shipped.to_dict()) == shipped


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _pretrain(out: Path, *extra: str, resume: bool = False, allow: bool = False) -> int:
    args = ["pretrain", "--out", str(out)]
    for item in [*TINY_RUN, "train.save_every=2", "log.sample_tokens=0", *extra]:
        args += ["--set", item]
    return main(args + (["--resume"] if resume else []) + (["--allow-recipe-change"] if allow else []))


def test_resume_refuses_a_changed_recipe_unchanged_files_and_records_an_allowed_change(tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(tmp_path / "new", "train.max_steps=2", allow=True) == 2  # a new run has nothing to change
    assert "--allow-recipe-change applies to --resume only" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert _pretrain(out, "train.max_steps=2") == 0
    record = json.loads((out / "checkpoints" / "step-2" / "run.json").read_text())
    assert record["recipe"]["optim"]["lr"] == 3e-3 and record["seeds"] == {"train.seed": 0}
    assert record["torch_version"] == torch.__version__ and record["world"]["world_size"] == 1
    assert json.loads((out / "model" / "run.json").read_text())["recipe"] == record["recipe"]
    recorded = recipe_from_dict(record["recipe"])  # the recipe round-trips through the checkpoint's run.json
    assert recorded == load_recipe(None, [*TINY_RUN, "train.save_every=2", "log.sample_tokens=0", "train.max_steps=2"])
    before = _tree_digest(out)
    capsys.readouterr()
    assert _pretrain(out, "train.max_steps=4", "optim.lr=1e-3", resume=True) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr: 0.003 recorded, 0.001 now" in err and "--allow-recipe-change" in err
    assert _tree_digest(out) == before  # nothing written, nothing removed
    # Cadence and length may change; they are printed.
    assert _pretrain(out, "train.max_steps=3", "train.log_every=1", resume=True) == 0
    assert "resume: train.max_steps 2 -> 3 (from step 2)" in capsys.readouterr().out
    assert _pretrain(out, "train.max_steps=4", "train.log_every=1", "optim.lr=1e-3", resume=True, allow=True) == 0
    changes = json.loads((out / "checkpoints" / "step-4" / "run.json").read_text())["recipe_changes"]
    assert {"step": 3, "key": "optim.lr", "recorded": 3e-3, "now": 1e-3} in changes
    assert {"step": 2, "key": "train.max_steps", "recorded": 2, "now": 3} in changes
    assert json.loads((out / "run.json").read_text())["recipe"]["optim"]["lr"] == 1e-3
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(out / "checkpoints" / "step-4"), "--out", str(exported)]) == 0
    assert json.loads((exported / "run.json").read_text())["recipe_changes"] == changes


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def legacy_run(out: Path) -> Path:
    """A 4-step run as moelm at 32d6d62 left it. Weights, optimizer state and data come from today's code (their
    formats did not change); the files whose format did are put back as that version wrote them for this recipe
    (kept as text fixtures): config.json with the run settings under 'moelm', recipe.json with them in the model
    section, and no run.json. Returns the checkpoint directory."""
    assert main(["pretrain", "--out", str(out), *_sets([*LEGACY_ARGS, "train.max_steps=4"])]) == 0
    checkpoint = out / "checkpoints" / "step-4"
    for newer in (checkpoint / "run.json", out / "run.json"):
        newer.unlink()
    shutil.rmtree(out / "model")
    shutil.copyfile(FIXTURES / "legacy-config.json", checkpoint / "model" / "config.json")
    shutil.copyfile(FIXTURES / "legacy-recipe.json", out / "recipe.json")
    write_manifest(checkpoint)
    return checkpoint


def test_a_checkpoint_and_config_json_from_an_older_moelm_still_load_and_resume(tmp_path, capsys):
    out = tmp_path / "legacy"
    checkpoint = legacy_run(out)
    capsys.readouterr()
    model = MoELM.from_pretrained(checkpoint / "model")
    assert model.options.bias_update_rate == 0.01  # the legacy run setting is applied
    assert "carries run settings from an older moelm" in capsys.readouterr().err
    assert MoELM.from_pretrained(checkpoint / "model", options=MoEOptions()).options == MoEOptions()
    args = ["pretrain", "--out", str(out), "--resume"]
    # The legacy recipe.json recorded model.bias_update_rate; today's moe.bias_update_rate compares equal to it.
    assert main([*args, *_sets([*LEGACY_ARGS, "train.max_steps=5", "optim.lr=0.01"])]) == 2
    assert "optim.lr: 0.003 recorded, 0.01 now" in capsys.readouterr().err
    assert main([*args, *_sets([*LEGACY_ARGS, "train.max_steps=5"])]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (out / "checkpoints" / "step-5" / "run.json").is_file()


def test_trained_models_carry_no_bos_end_to_end(tmp_path):
    """Packing inserts no BOS, so the saved config and tokenizer_config name none and the empty-context prefix
    (lm-eval's rule: BOS when the tokenizer has one, else EOS) is EOS, the token every document followed."""
    from transformers import AutoTokenizer

    from moelm.eval.lm import EvalModel
    from moelm.infer.text import TextGenerator

    out = tmp_path / "run"
    assert _pretrain(out, "train.max_steps=2") == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] == 1
    assert json.loads((out / "model" / "tokenizer_config.json").read_text())["bos_token"] is None
    tokens = next((out / "cache").glob("*-tokens.npy"))
    import numpy as np

    rows = np.load(tokens)
    assert not (rows == 0).any()  # <s> (id 0) never occurs in the packed training data
    hf = AutoTokenizer.from_pretrained(out / "model")
    assert hf.bos_token_id is None
    model = EvalModel(TextGenerator.from_pretrained(out / "model"))
    assert model.prefix_token_id == 1 == (hf.bos_token_id or hf.eos_token_id)


def test_a_jsonl_line_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xff"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xff at column 14\)"):
        list(jsonl_records(path))
    skipped: list[str] = []
    assert [n for n, _ in jsonl_records(path, skipped.append)] == [1]
    assert "data.jsonl:2: not UTF-8" in skipped[0]


def test_a_source_s_task_and_weight_reach_the_sft_mixture(tmp_path):
    from conftest import save_tiny_model_with_tokenizer

    from moelm.train.sft import SFTTrainer

    save_tiny_model_with_tokenizer(tmp_path / "base")
    sources = "[{format: builtin, num_records: 40, domains: [math], task: arith, weight: 3}, {format: builtin, num_records: 40, domains: [logic]}]"  # noqa: E501
    recipe = load_recipe(None, [f"sft.sources={sources}"])
    trainer = SFTTrainer(recipe, tmp_path / "out", echo=lambda _: None, base_model=tmp_path / "base")
    examples, weights = trainer.load_examples()
    assert weights == {"arith": 3.0}
    assert {e.task for e in examples[:40]} == {"arith"} and "arith" not in {e.task for e in examples[40:]}
