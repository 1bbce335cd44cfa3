"""Exact interoperability with transformers' DeepseekV3ForCausalLM, both directions, on random tiny weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moelm import MoELM
from moelm.infer import generate
from moelm.model.hf import CheckpointError

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install moelm[dev])")

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=256,
    num_mtp_layers=0,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
CASES = {
    "q_lora+groups": dict(q_lora_rank=48, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1),
    "no_q_lora": dict(q_lora_rank=None, n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=0),
    "2_shared+2_dense": dict(q_lora_rank=32, n_group=2, topk_group=1, n_shared_experts=2, first_k_dense_replace=2),
    "yarn+scaling": dict(
        q_lora_rank=48,
        n_group=2,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        rope_parameters=YARN,
    ),
    "no_norm_topk": dict(q_lora_rank=None, n_group=4, topk_group=1, norm_topk_prob=False, first_k_dense_replace=1),
}


def random_hf_model(**overrides):
    """A transformers DeepseekV3 with non-trivial expert weights and a random selection bias."""
    config = transformers.DeepseekV3Config(**{**BASE, **overrides})
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
                module.weight.normal_(0, 0.3)
            if getattr(module, "gate_up_proj", None) is not None and module.gate_up_proj.dim() == 3:
                module.gate_up_proj.normal_(0, 0.1)
                module.down_proj.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_on_its_weights(case, tmp_path):
    hf = random_hf_model(**CASES[case])
    hf.save_pretrained(tmp_path)
    ours = MoELM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("case", ["q_lora+groups", "yarn+scaling"])
def test_transformers_loads_what_moelm_saves(case, tmp_path):
    hf = random_hf_model(**CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    ours = MoELM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        diff = (reloaded(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_saved_directory_uses_per_expert_keys_and_can_be_sharded(tmp_path):
    model = MoELM(tiny_config(num_nextn_predict_layers=1))
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.2.eh_proj.weight" in names and "model.layers.2.shared_head.head.weight" in names
    reloaded = MoELM.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, labels=ids).loss, model.eval()(ids, labels=ids).loss)


def test_fused_expert_keys_are_read_too(tmp_path):
    model = MoELM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    fused["model.layers.1.mlp.experts.gate_up_proj"] = model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    fused["model.layers.1.mlp.experts.down_proj"] = model.layers[1].mlp.experts.down_proj.detach().clone()
    save_file(fused, tmp_path / "model.safetensors")
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(MoELM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_missing_tensor_is_named(tmp_path):
    MoELM(tiny_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.self_attn.kv_b_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.kv_b_proj.weight"):
        MoELM.from_pretrained(tmp_path)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path):
    MoELM(tiny_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(31,\).*\(32,\)"):
        MoELM.from_pretrained(tmp_path)


def test_pickled_checkpoints_are_refused(tmp_path):
    MoELM(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loads pickled"):
        MoELM.from_pretrained(tmp_path)


@pytest.mark.parametrize(("option", "value"), [("scoring_func", "softmax"), ("attention", "gqa")])
def test_plain_hf_export_refuses_options_hf_cannot_represent(option, value, tmp_path):
    model = MoELM(tiny_config(**{option: value}))
    with pytest.raises(CheckpointError, match=f"{option}='{value}'"):
        model.save_pretrained(tmp_path / "strict", strict_hf=True)
    model.save_pretrained(tmp_path / "moelm")  # moelm's own directory keeps the option
    reloaded = MoELM.from_pretrained(tmp_path / "moelm")
    assert getattr(reloaded.config, option) == value


def test_router_tensors_stay_float32_when_loading_bfloat16(tmp_path):
    MoELM(tiny_config()).save_pretrained(tmp_path)
    model = MoELM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32


def test_greedy_generation_matches_transformers_token_for_token(tmp_path):
    from moelm.infer import left_pad

    hf = random_hf_model(q_lora_rank=48, n_group=2, topk_group=1, first_k_dense_replace=1, initializer_range=0.2)
    hf.save_pretrained(tmp_path)
    ours = MoELM.from_pretrained(tmp_path)
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22]])
    eos = hf.config.eos_token_id
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0)
    ours_out = generate(ours, ids, 64, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours_out[:, : expected.shape[1]], expected)
    assert (ours_out[:, expected.shape[1] :] == 0).all()  # HF trims columns once every row has stopped
