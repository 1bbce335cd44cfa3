"""A moelm model directory as one GGUF file, the format llama.cpp, Ollama and LM Studio read.

Written with the `gguf` package (llama.cpp's own writer) under llama.cpp's `deepseek2` architecture, in the layout
its loader expects, which differs from the HF directory in four places:
- routed experts are one 3-D tensor per projection (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`);
- `kv_b_proj` is split into `attn_k_b` (stored transposed, per head) and `attn_v_b`, the weight-absorbed form;
- `attention.q_lora_rank` is always written (0 for an uncompressed query), since the loader requires the key for
  every model whose depth is not one of DeepSeek-V2-Lite's;
- the vocabulary is byte-level BPE with the pre-tokenizer named "gpt-2", the split moelm's tokenizers use, so
  llama.cpp needs no hash of a known tokenizer to tokenise text as tokenizer.json does.
MTP layers are left out (llama.cpp's deepseek2 does not run them); `export_gguf` says so in its notes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moelm.files import atomic_path
from moelm.model.hf import CheckpointError
from moelm.model.transformer import MoELM

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFExport:
    """What was written: the file, its tensor count and bytes, and notes on what was left out."""

    path: Path
    tensors: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f32") -> GGUFExport:
    """Write the model in `model_dir` (config.json, weights, tokenizer.json) to the GGUF file `out`.

    outtype: the type of the projection matrices, as llama.cpp's converter names them; norms, the router and
    the correction bias stay float32 whatever it is (llama.cpp's loader expects them so)."""
    try:
        import gguf
    except ImportError:
        raise RuntimeError("GGUF export needs the gguf package: pip install 'moelm[gguf]'") from None
    if outtype not in OUTTYPES:
        raise ValueError(f"invalid GGUF outtype {outtype!r}: must be one of {', '.join(OUTTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer.json (a GGUF file carries its vocabulary)")
    model = MoELM.from_pretrained(model_dir, dtype=torch.float32, mtp=False)
    config = model.config
    _check_supported(config, model_dir)
    result = GGUFExport(out)
    mtp_layers = json.loads((model_dir / "config.json").read_text()).get("num_nextn_predict_layers") or 0
    if mtp_layers:
        result.notes.append(f"left out {mtp_layers} MTP layer(s): llama.cpp's deepseek2 does not run them")
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
    _write_hyperparameters(writer, config, outtype)
    _write_vocabulary(writer, model_dir, config)
    for name, tensor in _gguf_tensors(model):
        data, qtype = _encode(name, tensor, outtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        result.tensors += 1
        result.bytes += data.nbytes
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as partial:  # a reader never sees half a file
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return result


def _check_supported(config, model_dir: Path) -> None:  # noqa: ANN001 - ModelConfig
    problems = []
    if config.attention != "mla":
        problems.append(f"attention={config.attention!r} (llama.cpp's deepseek2 is multi-head latent attention)")
    if config.moe_layer_freq != 1:
        problems.append(f"moe_layer_freq={config.moe_layer_freq} (llama.cpp has leading dense layers only)")
    if config.attention_bias:
        problems.append("attention_bias=true (llama.cpp's deepseek2 has no attention biases)")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (llama.cpp's deepseek2 runs SwiGLU)")
    if problems:
        raise CheckpointError(f"{model_dir}: cannot be written as GGUF: " + "; ".join(problems))


def _write_hyperparameters(writer, config, outtype: str) -> None:  # noqa: ANN001 - GGUFWriter, ModelConfig
    import gguf

    writer.add_name(f"moelm {config.model_type}")
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[outtype]
    )
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(1)  # MLA runs as one shared latent "head" in llama.cpp
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_leading_dense_block_count(min(config.first_k_dense_replace, config.num_hidden_layers))
    writer.add_q_lora_rank(config.q_lora_rank or 0)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    writer.add_value_length(config.kv_lora_rank)
    writer.add_key_length_mla(config.qk_nope_head_dim + config.qk_rope_head_dim)
    writer.add_value_length_mla(config.v_head_dim)
    writer.add_rope_dimension_count(config.qk_rope_head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_weights_norm(config.norm_topk_prob)
    writer.add_expert_group_count(config.n_group)
    writer.add_expert_group_used_count(config.topk_group)
    gating = (
        gguf.ExpertGatingFuncType.SIGMOID if config.scoring_func == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX
    )
    writer.add_expert_gating_func(gating)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        if "beta_fast" in scaling:
            writer.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        if "beta_slow" in scaling:
            writer.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
        if scaling.get("mscale_all_dim"):
            # llama.cpp's loader divides this key by 0.1 for deepseek2 (its converter writes 0.1 * mscale_all_dim)
            writer.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])


def _write_vocabulary(writer, model_dir: Path, config) -> None:  # noqa: ANN001 - GGUFWriter, ModelConfig
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE" or not _is_gpt2_byte_level(spec.get("pre_tokenizer")):
        raise CheckpointError(
            f"{model_dir}/tokenizer.json: cannot be written as GGUF: only byte-level BPE with the GPT-2 split "
            "(what moelm trains unless data.split_digits) is supported"
        )
    by_id = {index: token for token, index in bpe["vocab"].items()}
    specials = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    for index, entry in specials.items():
        by_id[index] = entry["content"]
    tokens, types = [], []
    for index in range(config.vocab_size):  # the embedding may be wider than the tokenizer: padding entries
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif index in specials and specials[index].get("special", True):
            types.append(gguf.TokenType.CONTROL)
        elif index in specials:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    settings = _tokenizer_settings(model_dir)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(config, key)
        if value is not None:
            add(value)
    writer.add_add_bos_token(config.bos_token_id is not None and bool(settings.get("add_bos_token", False)))
    writer.add_add_eos_token(False)
    if settings.get("chat_template"):
        writer.add_chat_template(settings["chat_template"])


def _is_gpt2_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        parts = pre_tokenizer.get("pretokenizers", [])
        return len(parts) == 1 and _is_gpt2_byte_level(parts[0])
    return pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True)


def _tokenizer_settings(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def _gguf_tensors(model: MoELM):  # noqa: ANN202 - Iterator[tuple[str, torch.Tensor]]
    """(GGUF name, float32 tensor) for every trunk tensor, in llama.cpp's layout."""
    config = model.config
    yield "token_embd.weight", model.embed_tokens.weight
    yield "output_norm.weight", model.norm.weight
    if not config.tie_word_embeddings:
        yield "output.weight", model.lm_head.weight
    heads, nope, value = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    for index, block in enumerate(model.layers):
        prefix = f"blk.{index}."
        attention = block.self_attn
        yield prefix + "attn_norm.weight", block.input_layernorm.weight
        yield prefix + "ffn_norm.weight", block.post_attention_layernorm.weight
        if config.q_lora_rank:
            yield prefix + "attn_q_a.weight", attention.q_a_proj.weight
            yield prefix + "attn_q_a_norm.weight", attention.q_a_layernorm.weight
            yield prefix + "attn_q_b.weight", attention.q_b_proj.weight
        else:
            yield prefix + "attn_q.weight", attention.q_proj.weight
        yield prefix + "attn_kv_a_mqa.weight", attention.kv_a_proj_with_mqa.weight
        yield prefix + "attn_kv_a_norm.weight", attention.kv_a_layernorm.weight
        kv_b = attention.kv_b_proj.weight.view(heads, nope + value, -1)
        yield prefix + "attn_k_b.weight", kv_b[:, :nope].transpose(1, 2)  # [heads, latent, nope]
        yield prefix + "attn_v_b.weight", kv_b[:, nope:]  # [heads, value, latent]
        yield prefix + "attn_output.weight", attention.o_proj.weight
        mlp = block.mlp
        if hasattr(mlp, "experts"):
            yield prefix + "ffn_gate_inp.weight", mlp.gate.weight
            yield prefix + "exp_probs_b.bias", mlp.gate.e_score_correction_bias
            experts = mlp.experts
            gate, up = experts.gate_up_proj.split(experts.intermediate_size, dim=1)
            yield prefix + "ffn_gate_exps.weight", gate
            yield prefix + "ffn_up_exps.weight", up
            yield prefix + "ffn_down_exps.weight", experts.down_proj
            if mlp.shared_experts is not None:
                yield from _swiglu(prefix, "_shexp", mlp.shared_experts)
        else:
            yield from _swiglu(prefix, "", mlp)


def _swiglu(prefix: str, suffix: str, mlp):  # noqa: ANN001, ANN202 - SwiGLU, Iterator
    gate, up = mlp.gate_up_proj.weight.split(mlp.intermediate_size, dim=0)
    yield f"{prefix}ffn_gate{suffix}.weight", gate
    yield f"{prefix}ffn_up{suffix}.weight", up
    yield f"{prefix}ffn_down{suffix}.weight", mlp.down_proj.weight


def _encode(name: str, tensor: torch.Tensor, outtype: str):  # noqa: ANN202 - (ndarray, GGMLQuantizationType)
    """The tensor's bytes in the file's type; 1-D tensors, norms and the router stay float32, as llama.cpp's
    converter keeps them."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    keep_f32 = data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[outtype]
    if keep_f32:
        qtype = gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        qtype = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 values along a row; llama.cpp falls back too
    return np.ascontiguousarray(gguf.quants.quantize(data, qtype)), qtype


def load_with_llama_cpp(path: str | Path, n_ctx: int = 512, **options):  # noqa: ANN201 - llama_cpp.Llama
    """The GGUF file opened with llama-cpp-python (the `bench` extra) as moelm's checks open it: float32 KV cache
    (its f16 default adds an error of its own) and no extra CPU buffer types. Measured with 0.3.36 built for an
    AMX CPU: its AMX / repacked weight buffers abort on some small models' products (a q8_0 output projection,
    an f16 attn_k_b) and give wrong logits for an f16 attn_v_b; the plain CPU buffers run every file."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    defaults = bindings.llama_model_default_params

    def without_extra_buffers():  # noqa: ANN202 - llama_model_params
        chosen = defaults()
        chosen.use_extra_bufts = False
        return chosen

    bindings.llama_model_default_params = without_extra_buffers  # Llama() offers no argument for it
    try:
        # type 0 is GGML_TYPE_F32
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, type_k=0, type_v=0, verbose=False, **options)
    finally:
        bindings.llama_model_default_params = defaults
