"""The one decode loop: batched on-device sampling with per-row settings and seeds, row buckets, held rows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from moelm import MoELM
from moelm.infer.compiled import compile_decode
from moelm.infer.engine import Engine, EngineRequest, row_bucket
from moelm.infer.generate import generate, stream
from moelm.infer.prefix_cache import PrefixCache
from moelm.infer.row_sampling import RowSettings, counter_uniform, sample_rows
from moelm.infer.rows import left_pad
from moelm.infer.sampling import SamplingParams, token_distribution


def test_counter_uniforms_are_uniform_and_uncorrelated():
    steps = counter_uniform(torch.full((100_000,), 7), torch.arange(100_000))
    seeds = counter_uniform(torch.arange(100_000), torch.zeros(100_000, dtype=torch.long))
    for u in (steps, seeds):
        assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
        counts = torch.histc(u.float(), 10, 0, 1)
        assert float((counts - 10_000).abs().max()) < 500  # ~5 standard deviations
        assert abs(float(torch.corrcoef(torch.stack((u[:-1], u[1:])))[0, 1])) < 0.02
    assert torch.equal(steps[:5], counter_uniform(torch.full((5,), 7), torch.arange(5)))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(1.0),
        SamplingParams(0.7, top_k=4),
        SamplingParams(1.0, top_p=0.8),
        SamplingParams(1.3, top_k=6, top_p=0.9, min_p=0.1),
        SamplingParams(1.3, top_k=3, top_p=0.5, min_p=0.2),
    ],
)
def test_batched_draws_follow_the_filtered_distribution(params):
    """40k rows with different seeds draw from one row of logits: frequencies match the distribution that
    `token_distribution` (the row-by-row reference) defines, filters included."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    settings = RowSettings.for_batch(params, list(range(40_000)))
    tokens = sample_rows(logits.expand(40_000, -1), settings)
    frequencies = torch.bincount(tokens, minlength=12).double() / 40_000
    expected = token_distribution(logits, params)[0].double()
    assert float((frequencies - expected).abs().max()) < 0.012
    assert bool((frequencies[expected == 0] == 0).all())  # filtered tokens are never drawn


@pytest.mark.parametrize(
    "params",
    [SamplingParams(0.7, top_k=4), SamplingParams(1.0, top_p=0.8), SamplingParams(1.3, top_k=6, top_p=0.9, min_p=0.1)],
)
def test_the_filtered_distribution_is_transformers_warper_chain(params):
    """temperature -> top-k -> top-p -> min-p, in the order and with the rules transformers' generate applies
    them, on the same logits: the same probabilities."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(3)
    logits = torch.randn(5, 40) * 2
    warped = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        warped = TopKLogitsWarper(params.top_k)(None, warped)
    if params.top_p < 1:
        warped = TopPLogitsWarper(params.top_p)(None, warped)
    if params.min_p:
        warped = MinPLogitsWarper(params.min_p)(None, warped)
    torch.testing.assert_close(token_distribution(logits, params), warped.softmax(-1))


def test_rows_with_different_settings_sample_as_each_would_alone():
    logits = torch.randn(4, 50)
    params = [SamplingParams(), SamplingParams(0.8, top_k=5), SamplingParams(1.0, top_p=0.6), SamplingParams(0.5)]
    together = RowSettings(4)
    for row, p in enumerate(params):
        together.assign(row, p, seed=100 + row)
    batch = sample_rows(logits, together)
    for row, p in enumerate(params):
        alone = sample_rows(logits[row : row + 1], RowSettings.for_batch(p, [100 + row]))
        assert int(alone[0]) == int(batch[row])
    assert int(batch[0]) == int(logits[0].argmax())


def test_a_seeded_request_gives_the_same_tokens_alone_or_in_any_batch():
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
    params = SamplingParams(temperature=1.0, top_p=0.9)
    ids, mask = left_pad(prompts)
    together = generate(model, ids, 10, attention_mask=mask, temperature=1.0, top_p=0.9, seed=40)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), 10, temperature=1.0, top_p=0.9, seed=40 + row)
        assert together[row, -10:].tolist() == alone[0, -10:].tolist()
    # reversed order: the same seeds travel with their prompts
    steps = stream(
        model,
        *left_pad(prompts[::-1])[:1],
        10,
        params,
        attention_mask=left_pad(prompts[::-1])[1],
        seeds=[43, 42, 41, 40],
    )
    reversed_rows = torch.cat([s.tokens_BN for s in steps], dim=1)
    assert reversed_rows.flip(0).tolist() == together[:, -10:].tolist()


def test_repetition_penalty_in_a_batch_equals_the_reference_rule_per_row():
    """A batch mixing penalised and plain rows: each row equals decoding it alone by full forwards through
    transformers' own RepetitionPenaltyLogitsProcessor (prompt and completion tokens so far)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    prompts, penalties = [[5, 6, 5, 6], [7, 8, 9]], [1.8, 1.0]
    rows = []
    for prompt, penalty in zip(prompts, penalties, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                logits = model(torch.tensor([ids])).logits[:, -1]
                logits = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits)
                ids.append(int(logits.argmax()))
        rows.append(ids[len(prompt) :])
    engine = Engine(model, [], max_batch=2)
    results: list[list[int]] = [[], []]
    for row, (prompt, penalty) in enumerate(zip(prompts, penalties, strict=True)):
        on_event = lambda event, row=row: event.token is not None and results[row].append(event.token)  # noqa: E731
        engine.add(EngineRequest(prompt, 8, on_event, SamplingParams(repetition_penalty=penalty)))
    with torch.inference_mode():
        while engine.busy:
            engine.step()
    assert results == rows


def test_a_held_row_keeps_the_batch_stepping_to_max_new_tokens():
    """run_to_end (sharded rollouts): every row finishes early, yet the engine takes all max_new_tokens steps
    and reports nothing after each row's stop."""
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    ids = torch.randint(3, 90, (2, 4))
    stops = lambda row, tokens: len(tokens) == 2  # noqa: E731
    free = list(stream(model, ids, 9, stop=stops))
    held = list(stream(model, ids, 9, stop=stops, run_to_end=True))
    assert len(free) == 2 and len(held) == 9
    assert torch.equal(torch.cat([s.tokens_BN for s in held], dim=1)[:, :2], torch.cat([s.tokens_BN for s in free], 1))
    assert all(bool(s.finished_B.all()) for s in held[1:])


def test_row_buckets_are_powers_of_two_up_to_the_batch_limit():
    assert [row_bucket(n, 12) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]


@pytest.mark.slow  # builds a compiled step for each bucket the batch passes through (about a minute each)
def test_a_compiled_continuous_batch_moves_through_buckets_token_exactly(tmp_path, monkeypatch):
    """Requests joining and leaving a compiled engine grow it from 1 to 4 rows and past 64 slots and back:
    every request's tokens equal greedy decoding by full forwards."""
    monkeypatch.setenv("MOELM_AOT_CACHE", str(tmp_path))
    from test_serve import naive_greedy

    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    prompts = [torch.randint(2, 90, (n,)).tolist() for n in (3, 30, 5, 12, 40)]
    lengths = [20, 40, 8, 30, 20]
    expected = [naive_greedy(model, p, n, 1) for p, n in zip(prompts, lengths, strict=True)]
    engine = Engine(model, [1], max_batch=4, compiled=compile_decode(model, "aot"))
    results = [[] for _ in prompts]
    shapes = set()
    with torch.inference_mode():
        engine.add(EngineRequest(prompts[0], lengths[0], lambda e: e.token is not None and results[0].append(e.token)))
        engine.step()
        for i in range(1, len(prompts)):
            on_event = lambda e, i=i: e.token is not None and results[i].append(e.token)  # noqa: E731
            engine.add(EngineRequest(prompts[i], lengths[i], on_event))
        while engine.busy:
            engine.step()
            shapes.add((engine.cache.batch_size, engine.cache.capacity))
    assert results == expected
    assert {rows for rows, _ in shapes} >= {4} and max(slots for _, slots in shapes) > 64


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_prefix_cached_generation_equals_uncached_token_for_token(attention):
    """Shared, partly shared and repeated prompts, submitted across several engine steps so later ones find
    blocks stored by earlier ones: greedy tokens equal the uncached engine's, and blocks were really reused."""
    model = MoELM(tiny_config(initializer_range=0.2, attention=attention)).eval()
    torch.manual_seed(1)
    shared = torch.randint(3, 90, (37,)).tolist()
    prompts = [
        shared + [5, 6],
        shared + [7],
        shared[:20] + [8, 9, 10],  # shares one 16-token block
        shared + [5, 6],  # the same prompt again
        [11, 12, 13],  # nothing shared
        shared + [5, 6],
    ]

    def run(prefix_cache: PrefixCache | None) -> list[list[int]]:
        engine = Engine(model, [], max_batch=3, prefix_cache=prefix_cache)
        results: list[list[int]] = [[] for _ in prompts]
        with torch.inference_mode():
            for i, prompt in enumerate(prompts):
                on_event = lambda e, i=i: e.token is not None and results[i].append(e.token)  # noqa: E731
                engine.add(EngineRequest(prompt, 6, on_event))
                if i % 2:
                    engine.step()
            while engine.busy:
                engine.step()
        return results

    prefix = PrefixCache(block_size=16)
    assert run(prefix) == run(None)
    # the first two arrive together: their two shared blocks are prefilled once, then both find them; later the
    # partly shared prompt finds one block and the two later copies of `shared` both
    assert prefix.stats.hit_tokens == 32 + 32 + 16 + 32 + 32


def test_evicted_prefix_blocks_are_never_read():
    """A store that holds one block: every lookup after an eviction misses, and tokens stay exact."""
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    first, second = torch.randint(3, 90, (40,)).tolist(), torch.randint(3, 90, (40,)).tolist()
    probe = PrefixCache(block_size=16)
    reference = generate(model, torch.tensor([first]), 5)[0, 40:].tolist()
    list(stream(model, torch.tensor([first]), 1, prefix_cache=probe))
    block_bytes = probe.bytes // len(probe.blocks)
    small = PrefixCache(block_size=16, max_bytes=block_bytes)
    for prompt in (first, second, first):
        out = generate_with(model, prompt, small)
        if prompt is first:
            assert out == reference
    assert small.stats.evicted_blocks > 0 and len(small.blocks) == 1
    assert small.stats.hit_tokens == 0  # `first` was evicted by `second` before it came back


def generate_with(model, prompt: list[int], prefix_cache: PrefixCache) -> list[int]:  # noqa: ANN001
    steps = stream(model, torch.tensor([prompt]), 5, prefix_cache=prefix_cache)
    return torch.cat([s.tokens_BN for s in steps], dim=1)[0].tolist()


def test_identical_prompts_in_one_batch_are_prefilled_once(monkeypatch):
    """GRPO's G completions of a prompt: one prefill row for the group, and the same tokens as without."""
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    ids = torch.randint(3, 90, (1, 9)).expand(4, -1)
    rows = []
    forward = MoELM.forward
    monkeypatch.setattr(MoELM, "forward", lambda self, x, **kw: rows.append(x.shape[0]) or forward(self, x, **kw))
    plain = generate(model, ids, 4, temperature=1.0, seed=3)
    shared = torch.cat(
        [s.tokens_BN for s in stream(model, ids, 4, SamplingParams(1.0), seed=3, prefix_cache=PrefixCache())], 1
    )
    assert torch.equal(plain[:, 9:], shared)
    assert rows == [4, 1]


def test_greedy_generation_leaves_the_global_random_stream_alone():
    """A training run prints greedy samples between steps: they must not move torch's RNG, or a resumed run
    (whose RNG comes from the checkpoint) would diverge from a straight one."""
    model = MoELM(tiny_config()).eval()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    generate(model, torch.tensor([[3, 4, 5]]), 4)
    assert torch.equal(torch.get_rng_state(), before)


def _run(engine: Engine, requests: list[EngineRequest]) -> None:
    for request in requests:
        engine.add(request)
    with torch.inference_mode():
        while engine.busy:
            engine.step()


def test_openai_penalties_and_logit_bias_in_a_batch_equal_the_formula_per_row():
    """presence/frequency penalties (over the completion's own tokens) and logit_bias, in a batch with a plain
    row: each row equals decoding it alone by full forwards with OpenAI's formula written out."""
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    prompts = [[5, 6, 5, 6], [7, 8, 9], [10, 11]]
    rules = [
        dict(presence_penalty=1.5, frequency_penalty=0.7),
        dict(logit_bias={12: 5.0, 13: -100.0}, frequency_penalty=-0.5),
        {},
    ]
    expected = []
    for prompt, rule in zip(prompts, rules, strict=True):
        ids, counts = list(prompt), torch.zeros(model.config.vocab_size)
        with torch.no_grad():
            for _ in range(8):
                logits = model(torch.tensor([ids])).logits[0, -1].clone()
                for token, bias in rule.get("logit_bias", {}).items():
                    logits[token] += bias
                logits -= rule.get("frequency_penalty", 0.0) * counts + rule.get("presence_penalty", 0.0) * (counts > 0)
                ids.append(int(logits.argmax()))
                counts[ids[-1]] += 1
        expected.append(ids[len(prompt) :])
    engine = Engine(model, [], max_batch=3)
    results: list[list[int]] = [[], [], []]
    requests = [
        EngineRequest(prompt, 8, lambda e, row=row: e.token is not None and results[row].append(e.token), **rule)
        for row, (prompt, rule) in enumerate(zip(prompts, rules, strict=True))
    ]
    _run(engine, requests)
    assert results == expected
    assert len(set(expected[0])) > 2  # the penalties changed what greedy repeats


def test_min_tokens_bans_end_tokens_and_stop_token_ids_end_a_request():
    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    events: list = []
    eos = 1
    forced = EngineRequest([5, 6], 10, events.append, logit_bias={eos: 100.0}, min_tokens=3)  # EOS as soon as allowed
    _run(Engine(model, [eos], max_batch=1), [forced])
    tokens = [e.token for e in events if e.token is not None]
    assert tokens[-1] == eos and len(tokens) == 4 and eos not in tokens[:3]
    assert events[-1].finish_reason == "stop"
    events.clear()
    stopped = EngineRequest([5, 6], 10, events.append, logit_bias={42: 100.0}, stop_token_ids=(42,))
    _run(Engine(model, [eos], max_batch=1), [stopped])
    assert [e.token for e in events if e.token is not None] == [42] and events[-1].finish_reason == "stop"
