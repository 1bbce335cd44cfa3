"""DeepseekV2 directories: moelm's logits equal transformers' DeepseekV2ForCausalLM both ways, on random weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from moelm import MoELM
from moelm.config import ConfigError, MoEOptions
from moelm.infer import generate, left_pad
from moelm.model.hf import CheckpointError

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install moelm[dev])")

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_shared_experts=1,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=256,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
CASES = {
    "greedy": dict(topk_method="greedy", q_lora_rank=None, first_k_dense_replace=1),
    "group_limited+q_lora": dict(
        topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=48, first_k_dense_replace=1
    ),
    "2_dense+2_shared": dict(topk_method="greedy", q_lora_rank=48, n_shared_experts=2, first_k_dense_replace=2),
    "yarn+scaling": dict(
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        q_lora_rank=None,
        routed_scaling_factor=16.0,
        first_k_dense_replace=1,
        rope_parameters=YARN,
    ),
}


def random_hf_v2(**overrides):
    """A transformers DeepseekV2 whose router and experts are far from their (zero) initialisation."""
    config = transformers.DeepseekV2Config(**{**BASE, **overrides})
    model = transformers.DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "DeepseekV2TopkRouter":
                module.weight.normal_(0, 0.5)
            if getattr(module, "gate_up_proj", None) is not None and module.gate_up_proj.dim() == 3:
                module.gate_up_proj.normal_(0, 0.1)
                module.down_proj.normal_(0, 0.1)
    return model


def max_logit_diff(hf, ours) -> float:
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(ids).logits - ours(ids).logits).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_v2_logits_match_transformers_both_ways(case, tmp_path):
    hf = random_hf_v2(**CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    ours = MoELM.from_pretrained(tmp_path / "hf")
    assert ours.config.model_type == "deepseek_v2" and ours.config.scoring_func == "softmax"
    assert max_logit_diff(hf, ours) < 1e-4

    ours.save_pretrained(tmp_path / "ours", strict_hf=True)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and config["topk_method"] == CASES[case]["topk_method"]
    assert not any("e_score_correction_bias" in name for name in load_file(tmp_path / "ours" / "model.safetensors"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded).__name__ == "DeepseekV2ForCausalLM"
    assert max_logit_diff(reloaded, ours) < 1e-4


def test_v2_greedy_generation_is_token_equal(tmp_path):
    hf = random_hf_v2(**CASES["group_limited+q_lora"], initializer_range=0.2)
    hf.save_pretrained(tmp_path)
    ours = MoELM.from_pretrained(tmp_path)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22]])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, pad_token_id=0)
    ours_out = generate(ours, ids, 48, attention_mask=mask, eos_token_id=hf.config.eos_token_id, pad_token_id=0)
    assert torch.equal(ours_out[:, : expected.shape[1]], expected)


def test_moe_layer_freq_follows_the_tensors_transformers_wrote(tmp_path, capsys):
    """transformers ignores moe_layer_freq (every layer past the dense ones is MoE); the tensors decide."""
    hf = random_hf_v2(**CASES["greedy"], moe_layer_freq=2)
    hf.save_pretrained(tmp_path / "hf")
    ours = MoELM.from_pretrained(tmp_path / "hf")
    assert "moe_layer_freq=2 calls dense" in capsys.readouterr().err
    assert all(block.is_moe for block in ours.layers[1:])
    assert max_logit_diff(hf, ours) < 1e-4


def test_moe_layer_freq_2_makes_alternate_layers_dense_and_round_trips(tmp_path):
    config = tiny_config(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    model = MoELM(config).eval()
    assert [block.is_moe for block in model.layers] == [False, False, True, False, True]
    model.save_pretrained(tmp_path)
    assert "model.layers.1.mlp.gate_proj.weight" in load_file(tmp_path / "model.safetensors")
    reloaded = MoELM.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(CheckpointError, match="moe_layer_freq=2"):
        model.save_pretrained(tmp_path / "strict", strict_hf=True)


def test_v2_refuses_a_selection_bias_it_cannot_store():
    config = tiny_config(model_type="deepseek_v2", scoring_func="softmax")
    with pytest.raises(ConfigError, match="moe.bias_update_rate=0.001: must be 0 for deepseek_v2"):
        MoELM(config, MoEOptions(bias_update_rate=1e-3))


def test_unknown_model_type_is_a_one_line_error(tmp_path):
    MoELM(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model_type='llama'"):
        MoELM.from_pretrained(tmp_path)
