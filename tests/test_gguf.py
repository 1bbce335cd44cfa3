"""GGUF export: llama.cpp's deepseek2 keys and tensor layout, the vocabulary, and (slow, when llama-cpp-python is
installed) llama.cpp's own logits and greedy text against moelm's on the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomize_lora_b, save_tiny_model_with_tokenizer

from moelm.cli import main
from moelm.infer.generate import generate
from moelm.model.gguf_export import export_gguf, load_with_llama_cpp

gguf = pytest.importorskip("gguf")


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def values(tensor) -> np.ndarray:
    """A tensor's values as float32 in torch's (outermost-first) order, dequantised if stored quantised."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])


@pytest.mark.parametrize("q_lora_rank", [None, 8])
def test_f32_file_holds_llama_cpp_keys_and_exactly_moelm_weights(tmp_path, q_lora_rank):
    model, tokenizer = save_tiny_model_with_tokenizer(tmp_path, q_lora_rank=q_lora_rank, num_nextn_predict_layers=1)
    result = export_gguf(tmp_path, tmp_path / "model.gguf")
    assert result.notes == ["left out 1 MTP layer(s): llama.cpp's deepseek2 does not run them"]
    fields, tensors = read(tmp_path / "model.gguf")
    config = model.config
    assert fields["general.architecture"] == "deepseek2"
    assert fields["deepseek2.attention.q_lora_rank"] == (q_lora_rank or 0)  # required by llama.cpp's loader
    assert fields["deepseek2.attention.kv_lora_rank"] == config.kv_lora_rank
    assert fields["deepseek2.attention.head_count_kv"] == 1
    assert fields["deepseek2.expert_count"] == config.n_routed_experts
    assert fields["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert fields["deepseek2.leading_dense_block_count"] == config.first_k_dense_replace
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tokenizer.get_vocab()
    assert [vocab.get(t) for t in fields["tokenizer.ggml.tokens"][: tokenizer.get_vocab_size()]] == list(
        range(tokenizer.get_vocab_size())
    )
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert fields["tokenizer.ggml.eos_token_id"] == 1
    assert not any(name.startswith(f"blk.{config.num_hidden_layers}.") for name in tensors)  # no MTP
    assert len(tensors) == result.tensors

    ours = model.state_dict()
    assert np.array_equal(values(tensors["token_embd.weight"]), ours["embed_tokens.weight"].numpy())
    assert np.array_equal(values(tensors["output.weight"]), ours["lm_head.weight"].numpy())
    heads, nope = config.num_attention_heads, config.qk_nope_head_dim
    for layer in range(config.num_hidden_layers):
        k_b = torch.from_numpy(values(tensors[f"blk.{layer}.attn_k_b.weight"]).copy())  # [heads, latent, nope]
        v_b = torch.from_numpy(values(tensors[f"blk.{layer}.attn_v_b.weight"]).copy())  # [heads, value, latent]
        kv_b = torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, config.kv_lora_rank)
        assert torch.equal(kv_b, ours[f"layers.{layer}.self_attn.kv_b_proj.weight"])
        assert k_b.shape[2] == nope and k_b.shape[0] == heads
        if q_lora_rank:
            assert f"blk.{layer}.attn_q_a.weight" in tensors and f"blk.{layer}.attn_q.weight" not in tensors
    experts = ours["layers.1.mlp.experts.gate_up_proj"]
    gate, up = experts.split(config.moe_intermediate_size, dim=1)
    assert np.array_equal(values(tensors["blk.1.ffn_gate_exps.weight"]), gate.numpy())
    assert np.array_equal(values(tensors["blk.1.ffn_up_exps.weight"]), up.numpy())
    assert np.array_equal(values(tensors["blk.1.ffn_down_exps.weight"]), ours["layers.1.mlp.experts.down_proj"].numpy())
    bias = ours["layers.1.mlp.gate.e_score_correction_bias"].numpy()
    assert np.array_equal(values(tensors["blk.1.exp_probs_b.bias"]), bias)
    dense_gate = ours["layers.0.mlp.gate_up_proj.weight"][: config.intermediate_size]
    assert np.array_equal(values(tensors["blk.0.ffn_gate.weight"]), dense_gate.numpy())


def test_q8_0_file_quantises_matrices_and_keeps_norms_and_router_in_float32(tmp_path):
    model, _ = save_tiny_model_with_tokenizer(tmp_path, hidden_size=64)
    export_gguf(tmp_path, tmp_path / "q8.gguf", "q8_0")
    _, tensors = read(tmp_path / "q8.gguf")
    q8, f32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_kv_a_mqa.weight"].tensor_type == q8
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type == q8
    for name in ("blk.0.attn_norm.weight", "blk.1.ffn_gate_inp.weight", "blk.1.exp_probs_b.bias", "output_norm.weight"):
        assert tensors[name].tensor_type == f32, name
    original = model.state_dict()["layers.0.self_attn.o_proj.weight"].numpy()
    restored = values(tensors["blk.0.attn_output.weight"])
    step = np.abs(original).reshape(original.shape[0], -1, 32).max(-1, keepdims=True) / 127  # one q8_0 block
    # half a step of rounding, plus the block scale rounded to f16
    assert np.all(np.abs(restored - original).reshape(step.shape[0], -1, 32) <= 0.6 * step)


def test_export_command_writes_gguf_and_refuses_what_it_cannot_write(tmp_path, capsys):
    save_tiny_model_with_tokenizer(tmp_path / "model")
    out = tmp_path / "model.gguf"
    argv = ["export", "--model", str(tmp_path / "model"), "--format", "gguf", "--out", str(out), "--outtype", "bf16"]
    assert main(argv) == 0
    assert read(out)[1]["blk.0.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    save_tiny_model_with_tokenizer(tmp_path / "gqa", attention="gqa", num_key_value_heads=2)
    assert (
        main(["export", "--model", str(tmp_path / "gqa"), "--format", "gguf", "--out", str(tmp_path / "g.gguf")]) == 2
    )
    err = capsys.readouterr().err
    assert "cannot be written as GGUF: attention='gqa'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.gguf").exists()


def assert_same_greedy_text(llm, model, ids: list[int], tokens: int) -> None:  # noqa: ANN001 - llama_cpp.Llama
    """llama.cpp's greedy continuation of `ids` equals moelm's over `tokens` tokens."""
    llm.reset()
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == tokens:
            break
    with torch.no_grad():
        mine = generate(model, torch.tensor([ids]), max_new_tokens=tokens)[0, len(ids) :].tolist()
    assert theirs == mine


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "outtype"),
    [
        ({}, "f32"),
        ({"q_lora_rank": 16, "hidden_size": 64}, "f32"),
        (
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "beta_fast": 32,
                    "beta_slow": 1,
                    "mscale": 1.0,
                    "mscale_all_dim": 1.0,
                }
            },
            "f32",
        ),
        ({"hidden_size": 64}, "q8_0"),
    ],
)
def test_llama_cpp_runs_the_file_with_moelm_logits(tmp_path, overrides, outtype):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")

    model, tokenizer = save_tiny_model_with_tokenizer(tmp_path, max_position_embeddings=128, **overrides)
    export_gguf(tmp_path, tmp_path / "m.gguf", outtype)
    llm = load_with_llama_cpp(tmp_path / "m.gguf", n_ctx=128, logits_all=True, n_threads=2)
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog two plus two").ids
    assert llm.tokenize(b"the quick brown fox jumps over the lazy dog two plus two", add_bos=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids])).logits[0].numpy()
    if outtype == "f32":
        assert np.abs(theirs - ours).max() < 1e-4 * max(1.0, np.abs(ours).max())
        assert_same_greedy_text(llm, model, ids, 24)
    else:
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.8


@pytest.mark.slow
def test_llama_cpp_runs_the_small_preset_with_moelm_logits_and_greedy_text(tmp_path):
    """The `small` preset's shape (q-LoRA, 64 experts, shared experts, a dense first layer) through llama.cpp: f32
    logits within 1e-4 and 64 equal greedy tokens."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")
    from moelm.config import load_config

    local = (
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "max_position_embeddings",
        "initializer_range",
    )
    shape = {k: v for k, v in load_config("small").to_dict().items() if k not in local}
    torch.manual_seed(0)
    model, tokenizer = save_tiny_model_with_tokenizer(tmp_path, max_position_embeddings=256, **shape)
    export_gguf(tmp_path, tmp_path / "m.gguf", "f32")
    llm = load_with_llama_cpp(tmp_path / "m.gguf", n_ctx=256, logits_all=True, n_threads=2)
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog two plus two").ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-4 * max(1.0, np.abs(ours).max())
    assert_same_greedy_text(llm, model, ids, 64)


@pytest.mark.slow
def test_llama_cpp_runs_a_merged_lora_adapter_with_the_adapted_logits(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")
    from moelm.model.lora import TARGETS, LoraSpec, attach_lora
    from moelm.model.peft_format import save_adapter

    base, tokenizer = save_tiny_model_with_tokenizer(tmp_path / "base", max_position_embeddings=128)
    spec = LoraSpec(rank=4, alpha=8.0, targets=TARGETS)
    attach_lora(base, spec)
    randomize_lora_b(base, 0.3)
    save_adapter(base, spec, tmp_path / "adapter", tmp_path / "base")
    tokenizer.save(str(tmp_path / "adapter" / "tokenizer.json"))
    argv = ["export", "--model", str(tmp_path / "adapter"), "--merge-lora", "--format", "gguf"]
    assert main([*argv, "--out", str(tmp_path / "m.gguf")]) == 0
    llm = load_with_llama_cpp(tmp_path / "m.gguf", n_ctx=128, logits_all=True, n_threads=2)
    ids = tokenizer.encode("the quick brown fox jumps").ids
    llm.eval(ids)
    with torch.no_grad():
        ours = base.eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(llm.scores[: len(ids)]) - ours).max() < 1e-4 * max(1.0, np.abs(ours).max())
