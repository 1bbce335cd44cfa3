"""Inference: sampling rules, cached decode == full recompute, batched generation, stopping, speculation."""

from __future__ import annotations

import pytest
import torch
from conftest import expert_forward, tiny_config, tiny_setup

from moelm import MoELM
from moelm.infer import GenerationStats, SamplingParams, left_pad, sample, stream
from moelm.infer.aot import AotDecodeStep, package_cache_dir, package_key
from moelm.infer.compiled import compile_decode
from moelm.infer.engine import slot_bucket
from moelm.infer.generate import generate
from moelm.infer.sampling import apply_repetition_penalty, filter_logits
from moelm.model.cache import CacheCapacityError, KVCache


def naive_greedy(model: MoELM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Full recompute every step, no cache: the reference the engine must reproduce."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat((ids, model(ids).logits[:, -1:].argmax(-1)), dim=1)
    return ids


# ---------------------------------------------------------------------------------------------- sampling
def test_greedy_is_argmax_and_repetition_penalty_follows_the_ctrl_rule():
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.0]])
    assert sample(logits, SamplingParams()).item() == 0
    penalised = apply_repetition_penalty(logits, torch.tensor([[0, 1, -1]]), 2.0)
    torch.testing.assert_close(penalised, torch.tensor([[1.0, -2.0, 1.5, 0.0]]))
    assert sample(logits, SamplingParams(repetition_penalty=2.0), history_BS=torch.tensor([[0]])).item() == 2


def test_top_k_top_p_and_min_p_keep_the_expected_tokens():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    logits = probs.log()
    kept = lambda masked: torch.isfinite(masked[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.7)) == [0, 1]  # 0.5 < 0.7 <= 0.75
    assert kept(filter_logits(logits, top_p=0.75)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.76)) == [0, 1, 2]
    assert kept(filter_logits(logits, min_p=0.3)) == [0, 1, 2]  # 0.15 >= 0.3 * 0.5
    assert kept(filter_logits(logits, top_p=0.01)) == [0]


def test_seeded_sampling_is_reproducible_and_per_row_generators_are_independent():
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0)
    first = sample(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    second = sample(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert torch.equal(first, second)
    alone = sample(logits[1:2], params, [torch.Generator().manual_seed(2)])
    assert alone.item() == first[1].item()


@pytest.mark.parametrize(("field", "value"), [("temperature", -1.0), ("top_p", 0.0), ("min_p", 1.0), ("top_k", -2)])
def test_invalid_sampling_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"invalid {field}="):
        SamplingParams(**{field: value})


# ---------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_cached_decode_logits_equal_full_recompute(attention):
    model = MoELM(tiny_config(attention=attention, num_key_value_heads=2 if attention == "gqa" else 4)).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config, 2, 16)
        pieces = [model(ids[:, :5], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("attention", "batch", "experts_per_token", "eval_capacity_factor"),
    [("mla", 1, 2, None), ("mla", 3, 2, None), ("mla", 3, 4, None), ("gqa", 3, 2, None), ("mla", 3, 2, 1.0)],
)
def test_fixed_shape_decode_step_equals_the_cached_forward(attention, batch, experts_per_token, eval_capacity_factor):
    """decode_step (what the compiled graph runs) against the eager cached forward, on left-padded prompts,
    through every expert dispatch it can take: gathered (1 token), every expert (3 tokens x 2 or 4 choices)
    and capacity drops."""
    config, options = tiny_setup(
        attention=attention,
        num_key_value_heads=2 if attention == "gqa" else 4,
        num_experts_per_tok=experts_per_token,
        topk_group=2 if experts_per_token > 2 else 1,
        eval_capacity_factor=eval_capacity_factor,
        initializer_range=0.2,
    )
    model = MoELM(config, options).eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]][:batch])
    steps = torch.randint(3, 97, (batch, 6))
    with torch.no_grad():
        reference, fixed = KVCache(config, batch, 16), KVCache(config, batch, 32)  # capacity differs too
        model(ids, attention_mask=mask, cache=reference)
        model(ids, attention_mask=mask, cache=fixed)
        for t in range(steps.shape[1]):
            expected = model(steps[:, t : t + 1], cache=reference).logits[:, -1]
            torch.testing.assert_close(model.decode_step(steps[:, t : t + 1], fixed), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fixed.next_position, reference.next_position, atol=0, rtol=0)
    assert fixed.length == reference.length and fixed.max_next_position == int(reference.next_position.max())


def test_every_fixed_shape_expert_dispatch_equals_the_expert_definition():
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    moe = model.layers[1].mlp
    for tokens in (1, 3, 9):
        x = torch.randn(tokens, 32)
        with torch.no_grad():
            routing = moe.gate(x)
            expected = torch.zeros_like(x)
            for t in range(tokens):
                for e, w in zip(routing.expert_ids_TK[t].tolist(), routing.weights_TK[t], strict=True):
                    expected[t] += w * expert_forward(moe.experts, e, x[t : t + 1])[0]
            for fused in (False, True):
                torch.testing.assert_close(moe.experts.decode(x, routing, fused=fused), expected, atol=1e-5, rtol=1e-5)


def test_decode_step_refuses_a_full_cache_or_positions_past_the_model():
    model = MoELM(tiny_config(max_position_embeddings=8)).eval()
    with torch.no_grad():
        cache = KVCache(model.config, 1, 6)
        model(torch.randint(3, 97, (1, 5)), cache=cache)
        model.decode_step(torch.tensor([[4]]), cache)
        with pytest.raises(CacheCapacityError, match="cache slots"):
            model.decode_step(torch.tensor([[4]]), cache)
        cache = KVCache(model.config, 1, 16)
        model(torch.randint(3, 97, (1, 7)), cache=cache)
        model.decode_step(torch.tensor([[4]]), cache)  # position 7, the last one
        with pytest.raises(CacheCapacityError, match="max_position_embeddings=8"):
            model.decode_step(torch.tensor([[4]]), cache)
        assert cache.length == 8  # the refused step claimed nothing


def test_compiled_decode_is_rebuilt_when_dtype_or_mode_change():
    """The compiled step skips dynamo's module guards, so CompiledDecode itself must notice what they caught
    (torch.compile is lazy: nothing is compiled here). The state lives beside the model, not on it."""
    model = MoELM(tiny_config()).eval()
    compiled = compile_decode(model)
    first = compiled.step()
    assert compiled.step() is first
    model.double()
    second = compiled.step()
    assert second is not first
    model.train()
    third = compiled.step()
    assert third is not second
    inductor = compile_decode(model, "inductor")
    assert inductor.step() is not third and inductor.key[-1] == "inductor"
    assert not any(name.startswith("compiled") for name in vars(model))
    with pytest.raises(ValueError, match="'auto', 'aot', 'inductor'"):
        compile_decode(model, "tensorrt")
    with pytest.raises(ValueError, match="another model"):
        generate(MoELM(tiny_config()), torch.tensor([[3, 4]]), 2, compiled=compiled)


def test_compiled_capacity_rounds_up_to_shared_buckets():
    assert [slot_bucket(n) for n in (1, 64, 65, 192, 257)] == [64, 64, 128, 256, 512]


def test_absorbed_and_expanded_mla_agree_over_the_latent_cache():
    model = MoELM(tiny_config()).eval()
    ids = torch.randint(0, 97, (1, 9))
    attn = model.layers[0].self_attn
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        cache = KVCache(model.config, 1, 16)
        model(ids, cache=cache)
        start, positions = cache.reserve(torch.ones(1, 3, dtype=torch.bool))
        cos, sin = model.rotary(positions, x.dtype)
        mask = cache.attention_mask(start, 3)
        absorbed = attn(x, cos, sin, mask, cache, 0, start, absorb=True)
        expanded = attn(x, cos, sin, mask, cache, 0, start, absorb=False)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_mla_cache_stores_only_latent_and_rope_key():
    config = tiny_config()
    cache = KVCache(config, batch_size=1, capacity=4)
    per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    assert cache.bytes_per_token == config.num_hidden_layers * per_layer * 4


def test_requests_beyond_cache_or_positions_fail_clearly():
    model = MoELM(tiny_config(max_position_embeddings=16)).eval()
    with pytest.raises(CacheCapacityError, match="cache slots"):
        model(torch.randint(0, 97, (1, 9)), cache=KVCache(model.config, 1, 8))
    with pytest.raises(CacheCapacityError, match="max_position_embeddings=16"):
        generate(model, torch.randint(0, 97, (1, 10)), max_new_tokens=10)


# ---------------------------------------------------------------------------------------------- generation
def test_batched_left_padded_generation_matches_each_prompt_alone():
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    ids, mask = left_pad(prompts)
    batched = generate(model, ids, 12, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = naive_greedy(model, torch.tensor([prompt]), 12)
        assert batched[row, -12:].tolist() == alone[0, -12:].tolist()


def test_each_sequence_stops_on_its_own_eos_and_then_pads():
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    ids = torch.randint(3, 97, (2, 4))
    free = generate(model, ids, 8)
    eos = int(free[0, 6])  # row 0's 3rd new token becomes its EOS
    out = generate(model, ids, 8, eos_token_id=eos, pad_token_id=0)
    stop_at = (free[0, 4:] == eos).nonzero()[0].item()
    assert out[0, 4 + stop_at].item() == eos
    assert (out[0, 5 + stop_at :] == 0).all()
    if eos not in free[1, 4:].tolist():
        assert torch.equal(out[1], free[1])


def test_stream_yields_the_same_tokens_as_generate_and_stop_callbacks_end_a_row():
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    ids = torch.randint(3, 97, (1, 5))
    streamed = [step.tokens_BN[0, 0].item() for step in stream(model, ids, 6)]
    assert streamed == generate(model, ids, 6)[0, 5:].tolist()
    stopped = list(stream(model, ids, 6, stop=lambda row, tokens: len(tokens) == 2))
    assert len(stopped) == 2 and stopped[-1].finished_B.all()


def test_greedy_generation_is_reproducible_with_seeded_sampling():
    model = MoELM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 5))
    first = generate(model, ids, 8, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(first, generate(model, ids, 8, temperature=1.0, top_p=0.9, seed=7))


# ---------------------------------------------------------------------------------------------- speculation
def test_cached_mtp_draft_logits_equal_uncached():
    model = MoELM(tiny_config(num_nextn_predict_layers=1)).eval()
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        hidden = model(ids).hidden_states
        positions = torch.arange(7)[None]
        full = model.mtp_logits(hidden[:, :-1], ids[:, 1:], positions)
        cache = KVCache(model.config, 1, 8)
        model(ids, cache=cache)
        head = model.mtp_logits(hidden[:, :4], ids[:, 1:5], positions[:, :4], cache, 0)
        tail = [
            model.mtp_logits(hidden[:, t : t + 1], ids[:, t + 1 : t + 2], positions[:, t : t + 1], cache, t)
            for t in range(4, 7)
        ]
    torch.testing.assert_close(torch.cat([head] + tail, dim=1), full, atol=1e-5, rtol=1e-5)


def test_speculative_greedy_equals_plain_greedy_and_accepts_drafts_of_a_trained_head():
    torch.manual_seed(0)
    model = MoELM(*tiny_setup(num_nextn_predict_layers=1, mtp_loss_weight=1.0))
    pattern = torch.tensor([5, 9, 2, 7, 3, 11])
    data = pattern.repeat(4)[None].expand(4, -1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(data, labels=data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    prompt = pattern[None, :4]
    stats = GenerationStats()
    speculative = generate(model, prompt, 20, speculative=True, stats=stats)
    assert torch.equal(speculative, naive_greedy(model, prompt, 20))
    assert stats.acceptance_rate > 0.8
    assert stats.steps < 15  # accepted drafts emit two tokens per model step


def test_speculative_sampling_runs_and_respects_max_new_tokens():
    model = MoELM(tiny_config(num_nextn_predict_layers=1)).eval()
    out = generate(model, torch.randint(0, 97, (1, 4)), 9, temperature=0.8, speculative=True, seed=1)
    assert out.shape == (1, 13)
    with pytest.raises(ValueError, match="MTP"):
        generate(MoELM(tiny_config()), torch.zeros(1, 3, dtype=torch.long), 2, speculative=True)


def test_text_stream_stops_at_stop_strings_and_thinking_is_dimmed_or_hidden(tmp_path):
    from conftest import save_tiny_model_with_tokenizer

    from moelm.infer.text import TextGenerator, render_thinking

    model, tokenizer = save_tiny_model_with_tokenizer(tmp_path)
    generator = TextGenerator(model.eval(), tokenizer)
    full = "".join(generator.stream("the quick", 12))
    assert full == generator.generate(["the quick"], 12)[0]
    if len(full) > 3:
        stop = full[2:4]
        assert stop not in "".join(generator.stream("the quick", 12, stop_strings=[stop]))
    shown, inside = render_thinking("a<think>b", show=True, inside=False)
    assert shown == "a\033[2mb\033[0m" and inside
    hidden, inside = render_thinking("c</think>d", show=False, inside=True)
    assert hidden == "d" and not inside


@pytest.mark.slow  # compiling takes about a minute per backend on 2 cores
@pytest.mark.parametrize("backend", ["aot", "inductor"])
def test_compiled_decode_gives_the_same_tokens(backend):
    """One token (matrix-vector kernels, gathered experts) and a left-padded batch of three (GEMMs, every
    expert): the compiled step must pick the same tokens as the eager engine."""
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    compiled = compile_decode(model, backend)
    ids = torch.randint(3, 97, (1, 6))
    assert torch.equal(generate(model, ids, 8, compiled=compiled), generate(model, ids, 8))
    batch, mask = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]])
    out = generate(model, batch, 8, attention_mask=mask, compiled=compiled)
    assert torch.equal(out, generate(model, batch, 8, attention_mask=mask))
    # Module guards are skipped for speed: weights changed in place must still be read, and another model of
    # the same shape must get its own graph, not this one.
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    assert torch.equal(generate(model, ids, 8, compiled=compiled), generate(_eager_copy(model), ids, 8))
    # A parameter replaced by a new tensor: AOT packages hold pointers to the old one and must be rebuilt.
    model.norm.weight = torch.nn.Parameter(torch.rand_like(model.norm.weight) * 2)
    assert torch.equal(generate(model, ids, 8, compiled=compiled), generate(_eager_copy(model), ids, 8))
    assert compiled.key[-1] == backend
    other = MoELM(tiny_config(initializer_range=0.2, n_routed_experts=4, n_group=1)).eval()
    other_compiled = compile_decode(other, backend)
    assert torch.equal(generate(other, ids, 8, compiled=other_compiled), generate(_eager_copy(other), ids, 8))


@pytest.mark.slow  # two package builds, about half a minute each
def test_decode_packages_are_reused_across_models_and_rebuilt_when_damaged(tmp_path):
    """A package holds no weights, so a second model of the same config (a later process, another checkpoint)
    loads it instead of compiling, and still decodes with its own weights."""
    config = tiny_config(initializer_range=0.2)
    first, second = MoELM(config).eval(), MoELM(config).eval()
    cache = KVCache(config, 1, 64)
    ids = torch.randint(3, 97, (1, 5))
    with torch.inference_mode():
        second(ids, cache=cache)
        token = ids[:, -1:]
        expected = second.decode_logits(token, cache)[0]
        builder = AotDecodeStep(first, cache_dir=tmp_path)
        builder(token, cache)
        assert builder.built == 1 and len(list(tmp_path.glob("decode-*.pt2"))) == 1
        reuser = AotDecodeStep(second, cache_dir=tmp_path)
        torch.testing.assert_close(reuser(token, cache)[0], expected)
        assert reuser.built == 0
        next(tmp_path.glob("decode-*.pt2")).write_bytes(b"not a package")
        repaired = AotDecodeStep(second, cache_dir=tmp_path)
        with pytest.warns(UserWarning, match="rebuilding decode package"):
            torch.testing.assert_close(repaired(token, cache)[0], expected)
        assert repaired.built == 1


def test_decode_package_key_depends_on_architecture_and_shapes_not_on_weights(monkeypatch, tmp_path):
    config = tiny_config()
    model = MoELM(config).eval()
    cache = KVCache(config, 1, 64)
    inputs = (
        torch.zeros(1, 1, dtype=torch.long),
        cache.latent_or_keys,
        cache.rope_key_or_values,
        cache.valid,
        cache.next_position,
    )
    key = package_key(model, inputs)
    assert key == package_key(MoELM(config).eval(), inputs)  # other weights, same package
    wider = KVCache(config, 1, 128)
    assert key != package_key(
        model, inputs[:1] + (wider.latent_or_keys, wider.rope_key_or_values, wider.valid, wider.next_position)
    )
    assert key != package_key(MoELM(tiny_config(n_routed_experts=4, n_group=1)).eval(), inputs)
    assert key != package_key(MoELM(config).eval().to(torch.bfloat16), inputs)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert key != package_key(model, inputs)  # the thread count is compiled into the kernels
    finally:
        torch.set_num_threads(threads)

    class Foreign(torch.nn.Module):  # code the key cannot fingerprint: never cached
        def forward(self, x):
            return x

    model.norm = Foreign()
    assert package_key(model, inputs) is None
    monkeypatch.setenv("MOELM_AOT_CACHE", "off")
    assert package_cache_dir() is None
    monkeypatch.setenv("MOELM_AOT_CACHE", str(tmp_path))
    assert package_cache_dir() == tmp_path
    monkeypatch.delenv("MOELM_AOT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert package_cache_dir() == tmp_path / "moelm" / "aot"


def _eager_copy(model: MoELM) -> MoELM:
    copy = MoELM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def test_generation_runs_one_forward_per_sampled_token_and_none_after_the_last(monkeypatch):
    torch.manual_seed(0)
    model = MoELM(tiny_config()).eval()
    calls = []
    forward = MoELM.forward
    monkeypatch.setattr(
        MoELM, "forward", lambda self, ids, **kw: calls.append(ids.shape[1]) or forward(self, ids, **kw)
    )
    step = MoELM.decode_step
    monkeypatch.setattr(MoELM, "decode_step", lambda self, ids, *a: calls.append(ids.shape[1]) or step(self, ids, *a))
    out = generate(model, torch.tensor([[5, 6, 7]]), 4)
    assert out.shape == (1, 7)
    assert calls == [3, 1, 1, 1]  # prefill, then a decode step for each of tokens 2..4
