"""Weight-only int8: per-channel rounding, the float model's logits within the rounding, decode equal to full
forwards of the same int8 model, the compiled step equal to the eager one, and what refuses int8 weights."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_model_with_tokenizer, tiny_config

from moelm import MoELM
from moelm.cli import main
from moelm.infer.compiled import compile_decode
from moelm.infer.generate import generate
from moelm.infer.text import TextGenerator
from moelm.model.hf import CheckpointError
from moelm.model.quantize import int8_channels, is_quantized, quantize_int8


def test_int8_channels_round_each_value_to_within_half_its_channel_step():
    weight = torch.randn(6, 40) * torch.logspace(-3, 1, 6).unsqueeze(1)  # channels of very different sizes
    values, scale = int8_channels(weight)
    assert values.dtype == torch.int8 and scale.shape == (6,)
    assert values.abs().amax(dim=1).tolist() == [127] * 6  # the largest magnitude uses the full range
    assert torch.all((values.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7)


def quantized_pair(**overrides) -> tuple[MoELM, MoELM]:
    model = MoELM(tiny_config(initializer_range=0.1, vocab_size=211, **overrides)).eval()
    twin = MoELM(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return model, quantize_int8(twin)


def test_int8_model_quantizes_projections_and_keeps_router_embeddings_and_kv_b_in_float():
    _, model = quantized_pair(n_routed_experts=8, first_k_dense_replace=1)
    assert is_quantized(model)
    assert model.layers[1].mlp.experts.gate_up_proj.dtype == torch.int8
    assert model.layers[1].mlp.shared_experts.down_proj.weight.dtype == torch.int8
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.int8 and model.lm_head.weight.dtype == torch.int8
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_int8_logits_stay_near_float_and_cached_decode_equals_full_forwards(attention):
    # dense layers: an expert choice flipped by rounding would dominate the difference being bounded
    reference, model = quantized_pair(attention=attention, first_k_dense_replace=2)
    ids = torch.randint(2, 211, (2, 12))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
        assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()
        out = generate(model, ids, max_new_tokens=8)
        full = ids
        for _ in range(8):
            full = torch.cat((full, model(full).logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(out, full)


def test_int8_moe_prefill_and_decode_agree():
    """Routed experts in int8 through every path: prefill (grouped / per-expert slabs) and gathered decode."""
    _, model = quantized_pair(n_routed_experts=8, first_k_dense_replace=1)
    ids = torch.randint(2, 211, (3, 10))
    with torch.no_grad():
        out = generate(model, ids, max_new_tokens=6)
        full = ids
        for _ in range(6):
            full = torch.cat((full, model(full).logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(out, full)


def test_int8_is_inference_only_and_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="inference"):
        quantize_int8(MoELM(tiny_config()).train())
    _, model = quantized_pair()
    with pytest.raises(CheckpointError, match="int8"):
        model.save_pretrained(tmp_path)


def test_quantize_flag_reaches_the_model(monkeypatch, tmp_path, capsys):
    save_tiny_model_with_tokenizer(tmp_path)
    seen = []
    original = TextGenerator.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        generator = original(cls, *args, **kwargs)
        seen.append(is_quantized(generator.model))
        return generator

    monkeypatch.setattr(TextGenerator, "from_pretrained", classmethod(spy))
    argv = ["generate", "--model", str(tmp_path), "--prompt", "the", "--max-new-tokens", "3"]
    assert main(argv) == 0 and main([*argv, "--quantize", "int8"]) == 0
    assert seen == [False, True]
    with pytest.raises(ValueError, match="quantize"):
        TextGenerator.from_pretrained(tmp_path, quantize="int4")


@pytest.mark.slow
def test_compiled_int8_decode_equals_eager_int8_decode():
    """The compiled step streams the int8 weights in a fused multiply-reduce; its tokens equal eager decode's."""
    _, model = quantized_pair(n_routed_experts=8, first_k_dense_replace=1)
    ids = torch.randint(2, 211, (1, 9))
    with torch.no_grad():
        eager = generate(model, ids, max_new_tokens=12)
        compiled = generate(model, ids, max_new_tokens=12, compiled=compile_decode(model))
    assert torch.equal(eager, compiled)
