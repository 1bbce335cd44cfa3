"""MoELM forward: losses, masks, RoPE, MTP, tied weights, GQA and dtype behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_setup

from moelm import MoELM
from moelm.model.kernels.cpu import linear
from moelm.model.layers import RotaryEmbedding, apply_rope


def test_lm_loss_is_next_token_cross_entropy_ignoring_minus_100():
    model = MoELM(tiny_config())
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert out.mtp_loss is None


def test_mtp_loss_predicts_two_ahead_and_is_weighted_into_the_loss():
    model = MoELM(*tiny_setup(num_nextn_predict_layers=1, mtp_loss_weight=0.3))
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids)
    # Recompute depth 1 by hand: h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]) -> block -> head predicts t_{i+2}.
    mtp = model.mtp[0]
    h = out.hidden_states[:, :9]
    merged = mtp.eh_proj(torch.cat((mtp.enorm(model.embed_tokens(ids[:, 1:])), mtp.hnorm(h)), dim=-1))
    cos, sin = model.rotary(torch.arange(9).expand(2, -1), merged.dtype)
    hidden, _ = mtp.block(merged, cos, sin, None)
    logits = model.lm_head(mtp.shared_head_norm(hidden))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.mtp_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * expected)
    assert model.config.num_hidden_layers in out.routing, "the MTP block's routing is reported too"


def test_padding_mask_makes_real_tokens_independent_of_padding():
    model = MoELM(tiny_config()).eval()
    ids = torch.randint(0, 97, (1, 6))
    padded = torch.cat((torch.full((1, 3), 5), ids), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = torch.clamp(mask.cumsum(-1) - 1, min=0)
    with torch.no_grad():
        plain = model(ids).logits
        left = model(padded, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(left).all()
    torch.testing.assert_close(left[:, 3:], plain, atol=1e-5, rtol=1e-5)


def test_block_diagonal_mask_separates_packed_documents():
    model = MoELM(tiny_config()).eval()
    a, b = torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 5))
    packed = torch.cat((a, b), dim=1)
    doc = torch.tensor([0] * 4 + [1] * 5)
    same_doc = (doc[:, None] == doc[None, :]).unsqueeze(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(packed, attention_mask=same_doc, position_ids=positions).logits
        torch.testing.assert_close(logits[:, 4:], model(b).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[:, :4], model(a).logits, atol=1e-5, rtol=1e-5)


def test_rope_rotates_interleaved_pairs_like_complex_multiplication():
    config = tiny_config()
    rope = RotaryEmbedding(config, 8)
    x = torch.randn(1, 5, 2, 8)
    positions = torch.arange(5)[None]
    cos, sin = rope(positions, torch.float32)
    rotated = apply_rope(x, cos, sin)
    as_complex = torch.view_as_complex(x.reshape(1, 5, 2, 4, 2))
    angles = positions[..., None].float() * rope.inv_freq
    expected = torch.view_as_real(as_complex * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    torch.testing.assert_close(rotated, expected)


def test_attention_depends_only_on_relative_position():
    model = MoELM(tiny_config()).eval()
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        base = model(ids).logits
        shifted = model(ids, position_ids=torch.arange(7)[None] + 11).logits
    torch.testing.assert_close(base, shifted, atol=1e-4, rtol=1e-4)


def test_yarn_scales_softmax_by_mscale_squared():
    plain = MoELM(tiny_config())
    yarn = MoELM(tiny_config(rope_scaling={"type": "yarn", "factor": 4.0, "mscale_all_dim": 1.0, "mscale": 1.0}))
    mscale = 0.1 * math.log(4.0) + 1
    attn_plain, attn_yarn = plain.layers[0].self_attn, yarn.layers[0].self_attn
    assert attn_yarn.scale == pytest.approx(attn_plain.scale * mscale**2)
    assert (yarn.rotary.inv_freq <= plain.rotary.inv_freq + 1e-12).all()
    assert yarn.rotary.inv_freq[-1] == pytest.approx(plain.rotary.inv_freq[-1] / 4.0)


def test_tied_embeddings_share_one_tensor_and_count_once():
    tied = MoELM(tiny_config(tie_word_embeddings=True))
    untied = MoELM(tiny_config())
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32


def test_active_parameters_count_only_top_k_routed_experts():
    config = tiny_config(num_hidden_layers=3, first_k_dense_replace=1)
    model = MoELM(config)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    inactive = 2 * (config.n_routed_experts - config.num_experts_per_tok) * per_expert
    assert model.num_parameters() - model.num_active_parameters() == inactive


def test_gqa_model_trains_and_uses_kv_heads():
    model = MoELM(tiny_config(attention="gqa", num_key_value_heads=2))
    assert model.layers[0].self_attn.k_proj.out_features == 2 * 8
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_bfloat16_forward_is_close_to_float32():
    model = MoELM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05


def test_loss_decreases_when_fitting_a_fixed_batch():
    model = MoELM(tiny_config(num_nextn_predict_layers=1))
    ids = torch.randint(0, 97, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_for_a_few_rows_matches_the_float64_product(rows, bias):
    """Inference with 2-6 rows takes a transposed GEMM; every row count must give the same product."""
    torch.manual_seed(rows)
    weight, b = torch.randn(48, 32), torch.randn(48) if bias else None
    x = torch.randn(1, rows, 64)[..., ::2]  # non-contiguous rows, a batch dimension in front
    expected = x.double() @ weight.double().T + (0 if b is None else b.double())
    with torch.no_grad():
        out = linear(x, weight, b)
    assert out.shape == (1, rows, 48)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # bf16 takes the same path after its upcast
        low = linear(x.bfloat16(), weight.bfloat16(), None if b is None else b.bfloat16())
    torch.testing.assert_close(low.double(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_flex_attention_document_mask_equals_the_sdpa_mask(attention):
    """Packed documents through flex_attention's block mask give SDPA's logits and LM + MTP loss (forward: torch
    2.13's flex_attention has no CPU backward, so CPU training keeps SDPA; see the next test)."""
    torch.manual_seed(0)
    extra = {"num_key_value_heads": 2} if attention == "gqa" else {}
    model = MoELM(tiny_config(attention=attention, num_nextn_predict_layers=1, **extra)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    documents = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7, [0] * 40])
    positions = torch.cat([torch.arange(13), torch.arange(20), torch.arange(7)]).expand(1, -1)
    positions = torch.cat([positions, torch.arange(40)[None]])
    outputs = {}
    with torch.no_grad():
        for kernel in ("sdpa", "flex"):
            model.attention_kernel = kernel
            outputs[kernel] = model(ids, labels=ids, position_ids=positions, document_ids=documents)
    sdpa, flex = outputs["sdpa"], outputs["flex"]
    assert torch.allclose(flex.logits, sdpa.logits, atol=1e-5)
    assert float(flex.loss) == pytest.approx(float(sdpa.loss), rel=1e-6)
    assert float(flex.mtp_loss) == pytest.approx(float(sdpa.mtp_loss), rel=1e-6)
    model.attention_kernel = "sdpa"
    with torch.no_grad():  # the mask matters: one document over the whole row is another answer
        whole = model(ids, position_ids=positions, document_ids=torch.zeros_like(documents)).logits
    assert not torch.allclose(whole, sdpa.logits, atol=1e-3)


def test_train_attention_picks_flex_on_cuda_and_refuses_it_where_it_has_no_backward():
    from moelm.config import ConfigError
    from moelm.train.trainer import attention_kernel

    assert attention_kernel("auto", torch.device("cpu")) == "sdpa"
    assert attention_kernel("auto", torch.device("cuda", 0)) == "flex"
    assert attention_kernel("sdpa", torch.device("cuda", 0)) == "sdpa"
    with pytest.raises(ConfigError, match="train.attention=flex needs a CUDA device"):
        attention_kernel("flex", torch.device("cpu"))
