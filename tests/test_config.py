"""ModelConfig: validation names the field and the allowed values; YAML / HF config.json round trips."""

from __future__ import annotations

import json

import pytest
import torch

from moelm import ConfigError, ModelConfig, MoELM, load_config
from moelm.config import preset_names


@pytest.mark.parametrize(
    ("changes", "field", "allowed"),
    [
        ({"num_experts_per_tok": 9, "n_routed_experts": 8}, "num_experts_per_tok", "at most n_routed_experts"),
        ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts", "multiple of n_group"),
        ({"n_group": 2, "topk_group": 3}, "topk_group", "at most n_group"),
        ({"scoring_func": "relu"}, "scoring_func", "one of ['sigmoid', 'softmax']"),
        ({"attention": "mqa"}, "attention", "one of ['mla', 'gqa']"),
        ({"rope_scaling": {"type": "ntk", "factor": 2}}, "rope_scaling.type", "one of ['default', 'yarn']"),
        ({"qk_rope_head_dim": 5}, "qk_rope_head_dim", "even"),
        ({"attention": "gqa", "hidden_size": 30, "num_attention_heads": 4}, "hidden_size", "divisible"),
        ({"attention": "gqa", "num_key_value_heads": 3}, "num_key_value_heads", "divisor"),
        ({"hidden_size": 0}, "hidden_size", "positive integer"),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace", "0..4"),
        ({"eos_token_id": 5000}, "eos_token_id", "token id"),
    ],
)
def test_invalid_values_name_the_field_and_what_is_allowed(changes, field, allowed):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**changes)
    message = str(info.value)
    assert f"invalid {field}=" in message
    assert allowed in message


def test_unknown_yaml_field_is_rejected_by_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hidden_size: 64\nnum_expert: 4\n")
    with pytest.raises(ConfigError, match="num_expert"):
        ModelConfig.from_yaml(path)


def test_yaml_round_trip_preserves_every_field(tmp_path):
    config = ModelConfig(q_lora_rank=24, rope_scaling={"type": "yarn", "factor": 4.0}, scoring_func="softmax")
    config.to_yaml(tmp_path / "c.yaml")
    assert ModelConfig.from_yaml(tmp_path / "c.yaml") == config


def test_hf_dict_round_trip_keeps_moelm_only_options():
    config = ModelConfig(attention="gqa", head_dim=16, scoring_func="softmax", num_nextn_predict_layers=1)
    data = json.loads(json.dumps(config.to_hf_dict()))
    assert data["model_type"] == "deepseek_v3"
    assert data["moelm"]["attention"] == "gqa"
    assert ModelConfig.from_hf_dict(data) == config


def test_reads_transformers_4_style_rope_scaling():
    data = ModelConfig().to_hf_dict()
    data.pop("rope_parameters")
    data.pop("moelm")
    data["rope_theta"] = 5000.0
    data["rope_scaling"] = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}
    config = ModelConfig.from_hf_dict(data)
    assert config.rope_theta == 5000.0
    assert config.rope_type == "yarn"
    assert config.rope_scaling["factor"] == 40


def test_presets_ship_with_the_package():
    assert {"tiny", "small", "v2-lite-shape", "v3-shape"} <= set(preset_names())


def test_v3_shape_reports_671b_total_and_37b_active_on_meta():
    with torch.device("meta"):
        model = MoELM(load_config("v3-shape"))
    assert 665e9 < model.num_parameters() < 675e9
    assert 36e9 < model.num_active_parameters() < 38.5e9


def test_small_preset_is_about_100m_total_and_20m_active():
    with torch.device("meta"):
        model = MoELM(load_config("small"))
    assert 80e6 < model.num_parameters() < 130e6
    assert 15e6 < model.num_active_parameters() < 30e6


def test_layer_placement_follows_first_k_dense_replace():
    model = MoELM(ModelConfig(num_hidden_layers=4, first_k_dense_replace=2))
    assert [block.is_moe for block in model.layers] == [False, False, True, True]
