"""The OpenAI-compatible server: the official `openai` client against a server started here on a tiny model."""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time

import pytest
import torch
from conftest import RunningServer, save_tiny_model_with_tokenizer, tiny_config

pytest.importorskip("fastapi", reason="serving needs the serve extra (pip install moelm[serve])")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client (moelm[dev])")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from moelm import MoELM  # noqa: E402
from moelm.cli import main  # noqa: E402
from moelm.data.tokenizer import train_tokenizer  # noqa: E402
from moelm.infer.engine import Engine, EngineOverloadedError, EngineRequest  # noqa: E402
from moelm.infer.text import TextGenerator  # noqa: E402
from moelm.serve.app import Server, ServerConfig, create_app  # noqa: E402
from moelm.serve.text_stream import TextStream  # noqa: E402

PROMPTS = ["the quick brown", "two plus", "the lazy dog", "fox jumps over", "two", "quick", "the", "lazy brown fox"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served")
    save_tiny_model_with_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def generator(model_dir):
    return TextGenerator.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    running = RunningServer(create_app(TextGenerator.from_pretrained(model_dir), ServerConfig("tiny", max_batch=16)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(generator: TextGenerator, prompt: str, max_tokens: int, stop=()) -> str:  # noqa: ANN001
    return "".join(generator.stream(prompt, max_tokens, stop_strings=stop))


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


# ---------------------------------------------------------------------------------------------- behaviour
def test_greedy_completion_equals_moelm_generate(client, model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "12"]) == 0
    expected = capsys.readouterr().out.removesuffix("\n")
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason in ("length", "stop")
    assert response.object == "text_completion" and response.model == "tiny"


def test_chat_full_and_streamed_agree_with_exact_usage(client, generator):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two plus two"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt_tokens = len(generator.tokenizer.encode(generator.chat_prompt(messages)).ids)
    assert full.usage.prompt_tokens == prompt_tokens
    assert full.usage.total_tokens == prompt_tokens + full.usage.completion_tokens
    assert 1 <= full.usage.completion_tokens <= 10
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_n_choices_with_a_seed_are_reproducible_and_the_first_matches_a_single_request(client, generator):
    def ask(n: int):  # noqa: ANN202
        return client.completions.create(model="tiny", prompt="the", max_tokens=8, temperature=1.0, seed=7, n=n)

    first, again, single = ask(3), ask(3), ask(1)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts[0] == single.choices[0].text
    assert len(set(texts)) > 1  # different seeds per choice
    assert first.usage.prompt_tokens == len(generator.tokenizer.encode("the").ids)


def test_stop_strings_end_the_text_before_them(client, generator):
    text = greedy(generator, PROMPTS[2], 16)
    stop = text[4:6]
    assert stop and stop in text
    response = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop])
    assert response.choices[0].text == text[: text.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_logprobs_describe_the_sampled_tokens(client):
    response = client.completions.create(model="tiny", prompt="two plus", max_tokens=5, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == response.usage.completion_tokens
    assert all(value <= 0 for value in logprobs.token_logprobs) and len(logprobs.top_logprobs) == 5
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "two plus"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:  # greedy: the sampled token is the most likely one
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_echo_returns_the_prompt_and_its_token_logprobs_from_the_model(server, generator):
    """What lm-eval's local-completions sends to score a continuation: echo, logprobs, max_tokens 0 or 1."""
    prompt = "the quick brown fox jumps"
    ids = generator.tokenizer.encode(prompt).ids
    with torch.no_grad():
        expected = generator.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "logprobs": 2, "echo": True, "temperature": 0}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith(prompt) and reply["usage"]["completion_tokens"] == 1
    assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    scores = logprobs["token_logprobs"][1 : len(ids)]
    assert scores == pytest.approx([expected[i, t].item() for i, t in enumerate(ids[1:])], abs=1e-5)
    for position, top in enumerate(logprobs["top_logprobs"][1 : len(ids)]):
        assert max(top.values()) == pytest.approx(expected[position].max().item(), abs=1e-5) and len(top) <= 2
    offsets = logprobs["text_offset"]  # each token's text starts where the previous one's ends
    assert [choice["text"][a:b] for a, b in zip(offsets, offsets[1:], strict=False)] == logprobs["tokens"][:-1]
    scoring = {**body, "prompt": ids, "max_tokens": 0}  # token ids in, nothing generated
    zero = httpx.post(f"{server.url}/v1/completions", json=scoring, timeout=60).json()
    assert zero["choices"][0]["text"] == generator.tokenizer.decode(ids) and zero["usage"]["completion_tokens"] == 0
    assert zero["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx([None, *scores], abs=1e-6)


def test_logit_bias_min_tokens_and_stop_token_ids_reach_the_engine(client, generator):
    forced = generator.tokenizer.encode(" fox").ids[0]
    body = {"logit_bias": {str(forced): 100}, "stop_token_ids": [forced], "min_tokens": 2}
    reply = client.completions.create(model="tiny", prompt="two", max_tokens=8, temperature=0, extra_body=body)
    choice = reply.choices[0]
    # the first two tokens cannot end the choice, so the forced token ends it at the third; as in vLLM, a
    # stop token that is not a special token stays in the text
    assert reply.usage.completion_tokens == 3 and choice.finish_reason == "stop"
    assert choice.text.endswith(generator.tokenizer.decode([forced]))
    run = {"model": "tiny", "prompt": "the", "max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}
    penalised = client.completions.create(**run, frequency_penalty=2.0, presence_penalty=2.0)
    plain = client.completions.create(**run)
    assert penalised.choices[0].text != plain.choices[0].text


def test_tokenize_add_special_tokens_runs_the_tokenizers_post_processor(tmp_path):
    from tokenizers import processors

    _, tokenizer = save_tiny_model_with_tokenizer(tmp_path)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with TestClient(create_app(TextGenerator.from_pretrained(tmp_path), ServerConfig("tiny"))) as http:
        plain = http.post("/tokenize", json={"prompt": "two", "add_special_tokens": False}).json()["tokens"]
        special = http.post("/tokenize", json={"prompt": "two"}).json()["tokens"]
    assert special == [0, *plain]


def test_include_stop_str_in_output_and_skip_special_tokens(client):
    run = {"model": "tiny", "prompt": "the", "max_tokens": 16, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**run).choices[0].text
    stop = whole[4:6]
    first = whole.index(stop)
    cut = client.completions.create(**run, stop=[stop]).choices[0].text
    kept = client.completions.create(**{**run, "extra_body": {"include_stop_str_in_output": True}}, stop=[stop])
    assert cut == whole[:first] and kept.choices[0].text == whole[: first + len(stop)]
    forced = {"logit_bias": {"0": 100}}  # "<s>", a special token
    hidden = client.completions.create(model="tiny", prompt="the", max_tokens=2, extra_body=forced)
    shown = client.completions.create(
        model="tiny", prompt="the", max_tokens=2, extra_body={**forced, "skip_special_tokens": False}
    )
    assert hidden.choices[0].text == "" and shown.choices[0].text == "<s><s>"


def test_tokenize_detokenize_and_tokenizer_info_speak_vllms_protocol(server, generator):
    ids = generator.tokenizer.encode("two plus two").ids
    tokenized = httpx.post(f"{server.url}/tokenize", json={"prompt": "two plus two"}).json()
    assert tokenized["tokens"] == ids and tokenized["count"] == len(ids) and tokenized["max_model_len"] > 0
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json() == {"prompt": "two plus two"}
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == generator.tokenizer.encode(generator.chat_prompt(messages)).ids
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["chat_template"] == generator.chat_template
    for endpoint, body in [("tokenize", {}), ("tokenize", {"prompt": 3}), ("detokenize", {"tokens": [10**9]})]:
        response = httpx.post(f"{server.url}/{endpoint}", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] in ("prompt", "tokens")


def test_sixteen_concurrent_streams_each_equal_their_single_request_output(server, generator):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
    expected = [greedy(generator, p, 24) for p in prompts]

    async def one(client, prompt: str) -> str:  # noqa: ANN001
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(run_all()) == expected
    assert metric(server.url, "moelm_num_requests_running") == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = metric(server.url, 'moelm_request_success_total{finished_reason="abort"')
    # ignore_eos: the request must outlive the disconnect, whatever this random model says first
    body = {"model": "tiny", "prompt": "the", "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.time() + 20
    while metric(server.url, 'moelm_request_success_total{finished_reason="abort"') == before:
        assert time.time() < deadline, "the abandoned request never finished"
        time.sleep(0.05)
    assert metric(server.url, "moelm_num_requests_running") == 0
    assert metric(server.url, "moelm_num_requests_waiting") == 0


MALFORMED = [
    ("completions", b"{not json"),
    ("completions", b"[1, 2]"),
    ("completions", {"model": "tiny"}),
    ("completions", {"prompt": 5}),
    ("completions", {"prompt": ""}),
    ("completions", {"prompt": []}),
    ("completions", {"prompt": [10**9]}),
    ("completions", {"prompt": "hi", "max_tokens": "ten"}),
    ("completions", {"prompt": "hi", "max_tokens": 0}),
    ("completions", {"prompt": "hi", "max_tokens": 10**12}),
    ("completions", {"prompt": "hi", "temperature": -1}),
    ("completions", {"prompt": "hi", "temperature": "hot"}),
    ("completions", {"prompt": "hi", "top_p": 0}),
    ("completions", {"prompt": "hi", "n": 0}),
    ("completions", {"prompt": "hi", "n": 1000}),
    ("completions", {"prompt": "hi", "stop": 3}),
    ("completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
    ("completions", {"prompt": "hi", "seed": 1.5}),
    ("completions", {"prompt": "hi", "stream": "yes"}),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}),
    ("completions", {"prompt": "hi", "logprobs": 99}),
    ("completions", {"prompt": "hi", "max_tokens": 0}),  # 0 only with echo
    ("completions", {"prompt": "hi", "echo": True, "stream": True}),
    ("completions", {"prompt": "hi", "echo": "yes"}),
    ("completions", {"prompt": "hi", "unknown_field": 1}),
    ("completions", {"prompt": "hi", "model": "other"}),
    ("completions", {"prompt": "x " * 500_000}),
    ("chat/completions", {"messages": []}),
    ("chat/completions", {"messages": "hello"}),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("chat/completions", {"messages": [{"role": "user"}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "max_completion_tokens": 1},
    ),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3.0}),
    ("completions", {"prompt": "hi", "logit_bias": {"x": 1}}),
    ("completions", {"prompt": "hi", "logit_bias": {"5": 101}}),
    ("completions", {"prompt": "hi", "logit_bias": {"100000000": 1}}),  # outside the vocabulary
    ("completions", {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}),
    ("completions", {"prompt": "hi", "stop_token_ids": [-1]}),
    ("completions", {"prompt": "hi", "stop_token_ids": "1"}),
    ("chat/completions", {}),
]


@pytest.mark.parametrize(("endpoint", "body"), MALFORMED)
def test_malformed_requests_get_a_4xx_with_the_openai_envelope(server, endpoint, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/{endpoint}", content=content, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_random_fuzz_never_gets_a_5xx_and_the_server_stays_alive(server):
    rng = random.Random(0)
    values = [None, True, -1, 0, 1.5, 10**20, "", "x", [], [1], {}, {"a": 1}, [{"role": "user"}], float("nan")]
    keys = ["prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs"]
    for _ in range(120):
        body = {key: rng.choice(values) for key in rng.sample(keys, rng.randint(1, 4))}
        endpoint = rng.choice(["completions", "chat/completions"])
        response = httpx.post(f"{server.url}/v1/{endpoint}", content=json.dumps(body), timeout=60)
        assert response.status_code < 500, (body, response.text)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "tiny"
    unknown = httpx.get(f"{server.url}/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------------------------------------- app, in process
def test_api_key_and_unknown_model(generator):
    app = create_app(generator, ServerConfig("tiny", api_key="secret"))
    with TestClient(app) as http:
        body = {"model": "tiny", "prompt": "the", "max_tokens": 2}
        assert http.post("/v1/completions", json=body).status_code == 401
        wrong = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer secret"}
        assert http.post("/v1/completions", json=body, headers=auth).status_code == 200
        missing = http.post("/v1/completions", json={**body, "model": "gpt-4"}, headers=auth)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_expert_token_metrics_count_every_routed_token(generator):
    app = create_app(generator, ServerConfig("tiny"))
    with TestClient(app) as http:
        usage = [
            http.post("/v1/completions", json={"prompt": p, "max_tokens": 5, "temperature": 0}).json()["usage"]
            for p in PROMPTS[:3]
        ]
        text = http.get("/metrics").text
    fed = sum(u["prompt_tokens"] + u["completion_tokens"] - 1 for u in usage)  # the last token is never fed back
    per_layer: dict[str, float] = {}
    for layer, value in re.findall(r'moelm_expert_tokens_total\{expert="\d+",layer="(\d+)"\} ([\d.]+)', text):
        per_layer[layer] = per_layer.get(layer, 0) + float(value)
    k = generator.model.config.num_experts_per_tok
    assert per_layer and all(total == k * fed for total in per_layer.values())
    assert (
        f'moelm_generation_tokens_total{{model_name="tiny"}} {float(sum(u["completion_tokens"] for u in usage))}'
        in text
    )


def test_a_repeated_prompt_is_served_from_the_prefix_cache_with_the_same_text(generator):
    """The second request with a long prompt reuses its stored blocks (counted in /metrics) and answers the same
    text as a server without prefix caching."""
    prompt = " ".join(PROMPTS) * 2
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    answers, hits = {}, {}
    for caching in (True, False):
        with TestClient(create_app(generator, ServerConfig("tiny", prefix_caching=caching))) as http:
            answers[caching] = [http.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in "ab"]
            text = http.get("/metrics").text
        found = re.search(r'moelm_prefix_cache_hits_total\{model_name="tiny"\} ([\d.]+)', text)
        hits[caching] = float(found.group(1)) if found else 0.0
    prompt_tokens = len(generator.tokenizer.encode(prompt).ids)
    assert answers[True] == answers[False] and answers[True][0] == answers[True][1]
    assert hits[True] == (prompt_tokens - 1) // 16 * 16 and hits[False] == 0


def test_a_dead_engine_answers_503(generator):
    app = create_app(generator, ServerConfig("tiny"))
    with TestClient(app) as http:
        app.state.server.engine.stop()
        assert http.get("/health").status_code == 503
        response = http.post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"


# ---------------------------------------------------------------------------------------------- engine and text
def naive_greedy(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """The reference: a full forward over the whole sequence for every token (no cache, no engine)."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([prompt + tokens])).logits[0, -1].argmax())
            tokens.append(token)
            if token == eos:
                break
    return tokens


def test_engine_joins_and_retires_rows_through_compaction_token_exactly(monkeypatch):
    """3 rows, a cache of 2 x 30 slots and 16 requests queued at once, so rows never empty and the shared slot
    count outgrows the cache: compaction and row moves happen, and every request's tokens equal greedy decoding
    by full forwards."""
    import moelm.infer.rows

    model = MoELM(tiny_config(initializer_range=0.2)).eval()
    prompts = [torch.randint(2, 90, (n,)).tolist() for n in (3, 7, 5, 12, 4, 9, 6, 2, 15, 8, 1, 11, 6, 3, 9, 4)]
    expected = [naive_greedy(model, prompt, 15, 1) for prompt in prompts]
    engine = Engine(model, [1], max_batch=3, max_model_len=30).start()
    results: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finished = threading.Semaphore(0)

    def sink(i: int):  # noqa: ANN202
        def on_event(event) -> None:  # noqa: ANN001
            if event.token is not None:
                results[i].append(event.token)
            if event.finish_reason:
                finished.release()

        return on_event

    compactions = 0
    original = moelm.infer.rows.compact

    def counting_compact(cache, rows: int) -> None:  # noqa: ANN001
        nonlocal compactions
        compactions += 1
        original(cache, rows)

    monkeypatch.setattr(moelm.infer.rows, "compact", counting_compact)
    for i, prompt in enumerate(prompts):
        engine.submit(EngineRequest(prompt, 15, sink(i)))
    for _ in prompts:
        assert finished.acquire(timeout=60)
    engine.stop()
    assert [results[i] for i in range(len(prompts))] == expected
    assert compactions > 0


def test_engine_refuses_when_the_waiting_queue_is_full():
    """One row and one waiting place: of three requests submitted back to back, one cannot be queued."""
    engine = Engine(MoELM(tiny_config()).eval(), [], max_batch=1, max_waiting=1, max_model_len=128).start()
    refused = []
    for _ in range(3):
        try:
            engine.submit(EngineRequest([5, 6], 100, lambda event: None))
        except EngineOverloadedError as error:
            refused.append(str(error))
    engine.stop()
    assert refused and "1 requests are already waiting" in refused[0]


def test_reasoning_is_split_from_the_answer_whole_and_streamed_in_any_chunking():
    tokenizer = train_tokenizer(["two plus two is four\nso the answer is 4"] * 30, vocab_size=300)
    model = MoELM(tiny_config(vocab_size=tokenizer.get_vocab_size()))
    generator = TextGenerator(model, tokenizer)
    text = "<think>\ntwo plus two\nis four\n</think>\nthe answer is 4"
    tokens = tokenizer.encode(text).ids
    full = TextStream(generator, split_reasoning=True).full(tokens)
    assert (full.reasoning, full.content) == ("two plus two\nis four", "the answer is 4")
    rng = random.Random(1)
    for _ in range(5):
        stream, reasoning, content, at = TextStream(generator, split_reasoning=True), "", "", 0
        while at < len(tokens):
            at = min(len(tokens), at + rng.randint(1, 3))
            delta = stream.delta(tokens[:at], final=at == len(tokens))
            reasoning, content = reasoning + delta.reasoning, content + delta.content
        assert (reasoning, content) == (full.reasoning, full.content)
    inside = TextStream(generator, split_reasoning=True, starts_in_reasoning=True)
    assert inside.full(tokenizer.encode("plan\n</think>\nanswer").ids).reasoning == "plan"
    stopped = TextStream(generator, stop=["answer"], split_reasoning=True)
    assert stopped.full(tokens).content == "the " and stopped.stopped(tokens)


def test_repetition_penalty_reaches_the_engine_and_equals_generate(generator):
    """The server used to accept repetition_penalty and ignore it: now a request with it equals moelm's own
    penalised greedy decoding token for token, and differs from the unpenalised text."""
    from moelm.infer.sampling import SamplingParams

    app = create_app(generator, ServerConfig("tiny"))
    changed = 0
    with TestClient(app) as http:
        for prompt in PROMPTS:
            expected = "".join(generator.stream(prompt, 24, SamplingParams(repetition_penalty=3.0)))
            changed += expected != greedy(generator, prompt, 24)
            body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "repetition_penalty": 3.0}
            assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == expected
    assert changed  # the penalty changes some continuation, so equality above is not the unpenalised text


def test_serve_flags_reach_the_engine(model_dir, monkeypatch):
    """`moelm serve --compile --no-prefix-caching`: the engine gets a compiled step and no prefix cache (the
    server itself is not started)."""
    import moelm.serve.app

    engines = []
    monkeypatch.setattr(
        moelm.serve.app, "serve", lambda generator, config, *a: engines.append(Server(generator, config).engine)
    )
    for flags in ([], ["--compile", "--no-prefix-caching"]):
        assert main(["serve", "--model", str(model_dir), *flags]) == 0
    plain, changed = engines
    assert plain.compiled is None and plain.prefix_cache is not None
    assert changed.compiled is not None and changed.compiled.model is changed.model and changed.prefix_cache is None


def test_openapi_describes_exactly_the_fields_the_server_accepts(generator):
    from moelm.serve import openapi, protocol

    assert openapi.described_fields(openapi.COMPLETION_REQUEST) == protocol.COMPLETION_FIELDS
    assert openapi.described_fields(openapi.CHAT_REQUEST) == protocol.CHAT_FIELDS
    with TestClient(create_app(generator, ServerConfig("tiny"))) as http:
        spec = http.get("/openapi.json").json()
        assert http.get("/docs").status_code == 200
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == openapi.COMPLETION_REQUEST
    assert {"/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models", "/version"} <= set(spec["paths"])


def test_method_not_allowed_names_the_allowed_ones_and_small_protocol_endpoints(generator):
    import moelm

    with TestClient(create_app(generator, ServerConfig("tiny"))) as http:
        wrong = http.get("/v1/completions")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert wrong.json()["error"]["type"] == "invalid_request_error"
        assert http.get("/version").json() == {"version": moelm.__version__}
        assert http.get("/v1/models/tiny").json()["id"] == "tiny"
        assert http.get("/v1/models/other").status_code == 404
        # JSON Schema's integers include integral floats
        reply = http.post("/v1/completions", json={"prompt": "two", "max_tokens": 2.0, "n": 1.0, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 2
        assert http.post("/v1/completions", json={"prompt": "two", "n": 1.5}).status_code == 400


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_response_off_the_schema(generator):
    """Requests generated from /openapi.json (schema-valid bodies, 60 per operation) never get a 5xx, and every
    response's status, content type and body conform to what the schema documents."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        allow_header_conformance,
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    running = RunningServer(create_app(generator, ServerConfig("tiny", max_batch=4)))
    schema = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        allow_header_conformance,
    ]
    failures = []

    def check(case) -> None:  # noqa: ANN001 - a schemathesis Case
        case.call_and_validate(checks=checks)

    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            strategy = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            checked = strategy(given(case=operation.as_strategy())(check))
            try:
                checked()
            except Exception as error:  # noqa: BLE001 - every operation runs; failures are reported together
                failures.append(f"{operation.label}: {error}")
        assert httpx.get(f"{running.url}/health").status_code == 200
    finally:
        running.stop()
    assert not failures, "\n".join(failures[:5])
