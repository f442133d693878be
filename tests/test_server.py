"""The OpenAI-compatible server, end to end: real uvicorn on loopback, the official openai client, tiny models on CPU."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hetero.make_model import make_model
from hetero.runtime import RuntimeOptions, load_runtime
from hetero.tokenizer import Tokenizer
from server import BackgroundServer, ServerConfig, create_app
from server.generation import ChatShape, ChoiceOutput
from server.text import (
    ReasoningSplitter,
    StopMatcher,
    extract_json,
    parse_deepseek_tool_calls,
    parse_qwen_tool_calls,
    parse_tool_calls,
)
from server.worker import Delta

API_KEY = "sk-test-key"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek-v3-tiny")
    make_model("deepseek-v3", path, tiny=True, progress=False)
    return path


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-tiny")
    make_model("qwen3-30b-a3b", path, tiny=True, progress=False)
    return path


def _serve(model_dir, config: ServerConfig, **options):
    runtime = load_runtime(model_dir, RuntimeOptions(device="cpu", **options))
    server = BackgroundServer(create_app(runtime, config)).start()
    return server, runtime


def _stop(server: BackgroundServer) -> None:
    worker = server.app.state.hetero.worker
    server.stop()
    assert not server._thread.is_alive(), "uvicorn is still running"
    assert worker is None or not worker._thread.is_alive(), "the engine thread is still running"


@pytest.fixture(scope="module")
def ds(deepseek_dir):
    server, runtime = _serve(
        deepseek_dir,
        ServerConfig(model_name="tiny-ds", default_max_tokens=16),
        max_model_len=256,
        max_batch=16,
    )
    server.runtime = runtime
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def guarded(qwen_dir):
    """Qwen3 with an API key, one sequence at a time and a queue of one."""
    config = ServerConfig(model_name="tiny-qwen", api_key=API_KEY, max_queue=1, default_max_tokens=8)
    server, runtime = _serve(qwen_dir, config, max_model_len=384, max_batch=1)
    server.runtime = runtime
    yield server
    _stop(server)


def client(server: BackgroundServer, key: str = "unused", timeout: float = 30.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=timeout)


def metrics(server: BackgroundServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def wait_until_idle(server: BackgroundServer, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = (
            m["hetero_requests_running"] == m["hetero_requests_waiting"] == m["hetero_kv_blocks_in_use"] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def read_stream(http: httpx.AsyncClient, path: str, body: dict) -> dict:
    """One streaming request: its text, finish reasons, chunks, and whether it ended with [DONE]."""
    out = {"text": "", "finish": None, "done": False, "error": None, "status": None, "chunks": []}
    async with http.stream("POST", path, json={**body, "stream": True}) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["error"] = json.loads(await r.aread())["error"]
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
                continue
            out["chunks"].append(chunk)
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
                out["text"] += piece or ""
                out["finish"] = choice["finish_reason"] or out["finish"]
    return out


# --------------------------------------------------------------------------- basics


def test_health_models_and_prometheus(ds):
    assert httpx.get(f"{ds.url}/health").status_code == 200
    models = client(ds).models.list()
    assert [m.id for m in models.data] == ["tiny-ds"]
    m = metrics(ds)
    for name in (
        "hetero_requests_running",
        "hetero_requests_waiting",
        "hetero_kv_cache_usage_ratio",
        "hetero_kv_blocks_in_use",
        "hetero_max_batch_size",
        "hetero_prompt_tokens_total",
        "hetero_generation_tokens_total",
        "hetero_batch_size_count",
        "hetero_time_to_first_token_seconds_count",
        "hetero_inter_token_latency_seconds_count",
    ):
        assert name in m


def test_health_is_503_while_loading(deepseek_dir):
    gate = threading.Event()

    def slow_load():
        gate.wait(10)
        return load_runtime(deepseek_dir, RuntimeOptions(device="cpu", max_model_len=64, max_batch=2))

    server = BackgroundServer(create_app(slow_load, ServerConfig())).start()
    try:
        assert httpx.get(f"{server.url}/health").status_code == 503
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "x", "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        gate.set()
        _stop(server)


def test_chat_non_streaming_and_usage(ds):
    tok = ds.runtime.tokenizer
    r = client(ds).chat.completions.create(
        model="tiny-ds",
        messages=user("Hello there"),
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.content
    prompt = tok.apply_chat_template(user("Hello there"), tokenize=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == len(prompt) + 6
    assert r.model == "tiny-ds" and r.object == "chat.completion"


def test_chat_streaming_matches_non_streaming_with_usage_last(ds):
    c = client(ds)
    args = dict(model="tiny-ds", messages=user("Tell me a story"), max_tokens=10, temperature=0)
    whole = c.chat.completions.create(**args).choices[0].message.content
    chunks = list(c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10


def test_completions_streaming_and_not(ds):
    c = client(ds)
    args = dict(model="tiny-ds", prompt="The capital of France is", max_tokens=8, temperature=0)
    r = c.completions.create(**args)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 8
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**args, stream=True) if ch.choices)
    assert streamed == r.choices[0].text
    # Token-id prompts are accepted as well.
    ids = ds.runtime.tokenizer.encode("The capital of France is")
    assert c.completions.create(**{**args, "prompt": ids}).choices[0].text == r.choices[0].text


def test_stop_strings_cut_the_output_streaming_or_not(ds):
    c = client(ds)
    args = dict(model="tiny-ds", messages=user("Count for me"), max_tokens=16, temperature=0)
    full = c.chat.completions.create(**args).choices[0].message.content
    assert len(full) > 8
    stop = full[5:8]
    expected = full[: full.find(stop)]
    r = c.chat.completions.create(**args, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(**args, stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    rc = c.completions.create(model="tiny-ds", prompt="abc", max_tokens=12, temperature=0)
    cut = rc.choices[0].text[3:5]
    rs = c.completions.create(model="tiny-ds", prompt="abc", max_tokens=12, temperature=0, stop=cut)
    assert rs.choices[0].text == rc.choices[0].text[: rc.choices[0].text.find(cut)]


def test_max_tokens_and_max_completion_tokens(ds):
    c = client(ds)
    body = dict(model="tiny-ds", messages=user("hi"), temperature=0, extra_body={"ignore_eos": True})
    assert c.chat.completions.create(**body, max_tokens=3).usage.completion_tokens == 3
    assert c.chat.completions.create(**body, max_completion_tokens=5).usage.completion_tokens == 5
    # With none named, the server's default applies.
    assert c.chat.completions.create(**body).usage.completion_tokens == 16


def test_seed_reproducibility_and_n(ds):
    c = client(ds)
    args = dict(model="tiny-ds", messages=user("Surprise me"), max_tokens=12, temperature=1.0, top_p=0.95)
    a = c.chat.completions.create(**args, seed=1234, n=2)
    b = c.chat.completions.create(**args, seed=1234, n=2)
    assert [ch.index for ch in a.choices] == [0, 1]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    assert a.usage.completion_tokens <= 24
    other = c.chat.completions.create(**args, seed=99)
    assert other.choices[0].message.content != a.choices[0].message.content


def test_n_streaming_counts_both_choices(ds):
    out = asyncio.run(
        _stream_one(
            ds,
            "/v1/completions",
            {
                "model": "tiny-ds",
                "prompt": "x",
                "max_tokens": 5,
                "n": 2,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            },
        )
    )
    assert out["done"] and {c["index"] for ch in out["chunks"] for c in ch["choices"]} == {0, 1}
    assert out["chunks"][-1]["usage"]["completion_tokens"] == 10


async def _stream_one(server, path, body):
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        return await read_stream(http, path, body)


def test_logprobs_chat_and_completions(ds):
    c = client(ds)
    r = c.chat.completions.create(
        model="tiny-ds", messages=user("hi"), max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    rc = c.completions.create(model="tiny-ds", prompt="hi", max_tokens=4, temperature=0, logprobs=2)
    lp = rc.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


# --------------------------------------------------------------------------- errors


def test_unknown_model_is_404(ds):
    with pytest.raises(openai.NotFoundError) as e:
        client(ds).chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"


def test_too_long_is_400(ds):
    c = client(ds)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-ds", prompt="hello " * 400, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-ds", messages=user("hi"), max_tokens=1000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "tiny-ds", "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
        {"model": "tiny-ds", "messages": [{"role": "user", "content": "hi"}], "n": 0},
        {"model": "tiny-ds", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
        {"model": "tiny-ds", "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": "tiny-ds", "messages": []},
        {"model": "tiny-ds"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"model": "tiny-ds", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        {"model": "tiny-ds", "messages": "hi"},
    ],
)
def test_bad_fields_are_400(ds, body):
    r = httpx.post(f"{ds.url}/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_malformed_json_is_400(ds):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(
            f"{ds.url}{path}",
            content=b'{"model": "tiny-ds", "prompt": ',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{ds.url}/v1/completions", json={"model": "tiny-ds", "prompt": [10**9]})
    assert r.status_code == 400


def test_auth(guarded):
    with pytest.raises(openai.AuthenticationError):
        client(guarded, key="wrong").models.list()
    r = httpx.post(f"{guarded.url}/v1/chat/completions", content=b"not json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client(guarded, key=API_KEY).models.list().data[0].id == "tiny-qwen"
    # Health and metrics stay open for probes.
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/metrics").status_code == 200


def test_queue_full_is_429_with_retry_after(guarded):
    c = client(guarded, key=API_KEY)
    # One running and one waiting sequence fill a batch of 1 plus a queue of 1.
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model="tiny-qwen", prompt="hi", max_tokens=2, n=3)
    assert e.value.response.headers["retry-after"] == "1"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {
        "model": "tiny-qwen",
        "prompt": "hi",
        "max_tokens": 50,
        "n": 2,
        "stream": True,
        "ignore_eos": True,
    }
    # Hold the engine from its second step on, so both sequences stay in flight while we knock.
    gate, steps = threading.Event(), []
    hook = lambda scheduled: steps.append(1) or (len(steps) > 1 and gate.wait(10))
    guarded.runtime.engine.on_step.append(hook)
    url = f"{guarded.url}/v1/completions"
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=30) as held:
            assert held.status_code == 200
            r = httpx.post(url, json={**body, "n": 1, "stream": False}, headers=headers)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            gate.set()
    finally:
        gate.set()
        guarded.runtime.engine.on_step.remove(hook)
    m = wait_until_idle(guarded)
    assert m["hetero_kv_blocks_in_use"] == 0
    assert c.completions.create(model="tiny-qwen", prompt="hi", max_tokens=2).choices


def test_tools_and_thinking_switch_end_to_end(guarded):
    c = client(guarded, key=API_KEY)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = c.chat.completions.create(
        model="tiny-qwen", messages=user("Weather in Paris?"), tools=tools, max_tokens=4
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = c.chat.completions.create(
        model="tiny-qwen",
        messages=user("hi"),
        max_tokens=4,
        response_format={"type": "json_object"},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert r.usage.prompt_tokens > 10
    # A follow-up turn carrying the earlier tool call and its result renders too.
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    assert c.chat.completions.create(model="tiny-qwen", messages=history, tools=tools, max_tokens=2).choices


def test_serve_command_fails_fast_on_a_missing_model(tmp_path, capsys):
    from hetero.cli import main

    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# --------------------------------------------------------------------------- batching and resilience


def test_engine_failure_ends_requests_with_an_error_and_the_server_recovers(ds):
    def explode(scheduled):
        ds.runtime.engine.on_step.remove(explode)
        raise RuntimeError("injected")

    ds.runtime.engine.on_step.append(explode)
    r = httpx.post(f"{ds.url}/v1/completions", json={"model": "tiny-ds", "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
    assert wait_until_idle(ds)["hetero_kv_blocks_in_use"] == 0
    assert client(ds).completions.create(model="tiny-ds", prompt="hi", max_tokens=2).choices[0].text


PROMPTS = [
    f"Request number {i}: please describe {w}"
    for i, w in enumerate(
        "cats dogs rivers mountains clouds trains ships stars apples bread rain snow music paint books glass".split()
    )
]


def test_concurrent_greedy_streams_match_solo_runs_and_batch(ds):
    c = client(ds)
    solo = [
        c.chat.completions.create(model="tiny-ds", messages=user(p), max_tokens=12, temperature=0)
        .choices[0]
        .message.content
        for p in PROMPTS
    ]

    async def together():
        async with httpx.AsyncClient(base_url=ds.url, timeout=60) as http:
            bodies = [
                {"model": "tiny-ds", "messages": user(p), "max_tokens": 12, "temperature": 0} for p in PROMPTS
            ]
            return await asyncio.gather(*(read_stream(http, "/v1/chat/completions", b) for b in bodies))

    outs = asyncio.run(together())
    assert all(o["done"] for o in outs)
    assert [o["text"] for o in outs] == solo
    assert metrics(ds)["hetero_max_batch_size"] >= 8


def test_load_of_64_streams_loses_none(ds):
    async def load():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=ds.url, timeout=60, limits=limits) as http:
            bodies = [
                {
                    "model": "tiny-ds",
                    "prompt": f"item {i}",
                    "max_tokens": 8 + i % 8,
                    "temperature": 0.8,
                    "seed": i,
                }
                for i in range(64)
            ]
            return await asyncio.wait_for(
                asyncio.gather(*(read_stream(http, "/v1/completions", b) for b in bodies)), 60
            )

    outs = asyncio.run(load())
    assert all(o["done"] and o["error"] is None and o["finish"] in ("stop", "length") for o in outs)
    m = wait_until_idle(ds)
    assert m["hetero_kv_blocks_in_use"] == 0


def test_disconnects_abort_and_free_blocks(ds):
    async def leave_early():
        async with httpx.AsyncClient(base_url=ds.url, timeout=60) as http:
            body = {
                "model": "tiny-ds",
                "prompt": "go on",
                "max_tokens": 200,
                "ignore_eos": True,
                "stream": True,
            }

            async def stream_then_leave():
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            return

            async def wait_then_leave():
                with pytest.raises(httpx.ReadTimeout):
                    await http.post("/v1/completions", json={**body, "stream": False}, timeout=0.5)

            await asyncio.gather(
                *[stream_then_leave() for _ in range(6)], *[wait_then_leave() for _ in range(2)]
            )

    before = metrics(ds)["hetero_generation_tokens_total"]
    t0 = time.monotonic()
    asyncio.run(leave_early())
    m = wait_until_idle(ds, timeout=10)
    assert m["hetero_requests_running"] == 0 and m["hetero_requests_waiting"] == 0
    assert m["hetero_kv_blocks_in_use"] == 0 and m["hetero_kv_cache_usage_ratio"] == 0
    # Nobody ran to 200 tokens: 8 sequences x 200 would be 1600.
    assert m["hetero_generation_tokens_total"] - before < 800, time.monotonic() - t0


def test_fuzz_openapi_schema_finds_no_5xx(guarded):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{guarded.url}/openapi.json")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    failures = []

    def fuzz(operation, mode) -> None:
        # Valid bodies name the served model, or nearly all of them would stop at the 404.
        fix_model = mode is schemathesis.GenerationMode.POSITIVE

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            if fix_model and isinstance(case.body, dict):
                case.body["model"] = "tiny-qwen"
            response = case.call(base_url=guarded.url, headers=headers, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text))

        try:
            run()
        except Unsatisfiable:  # no invalid input exists for routes without parameters
            assert not fix_model

    for result in schema.get_all_operations():
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz(result.ok(), mode)
    assert not failures, failures[:3]
    assert wait_until_idle(guarded)["hetero_kv_blocks_in_use"] == 0


# --------------------------------------------------------------------------- parsing, on crafted text


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["</end>", "xyz"])
    assert m.feed("hello </") == "hello "
    assert m.feed("en") == ""
    assert m.feed("tirely") == "</entirely"
    assert m.feed(" and x") == " and "
    assert m.feed("yz tail") == "" and m.matched
    m = StopMatcher(["abc"])
    assert m.feed("xxab") == "xx" and m.finish() == "ab"


def test_reasoning_split_qwen_and_r1():
    s = ReasoningSplitter()
    parts = [s.feed(t) for t in ["<th", "ink>\nLet me ", "think</th", "ink>\n\nThe answer", " is 4."]]
    reasoning = "".join(r for r, _ in parts)
    content = "".join(c for _, c in parts)
    assert reasoning == "\nLet me think" and content == "The answer is 4."
    # DeepSeek-R1's template opens the block in the prompt.
    s = ReasoningSplitter("<｜Assistant｜><think>\n")
    assert s.feed("hmm</think>Yes") == ("hmm", "Yes")
    s = ReasoningSplitter()
    assert s.feed("<b>plain</b>") == ("", "<b>plain</b>")
    assert s.finish() == ("", "")


def test_deepseek_tool_calls():
    text = (
        "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n'
        '```json\n{"tz": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
    v31 = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>search<｜tool▁sep｜>{"q": "x"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    (call,) = parse_deepseek_tool_calls(v31)
    assert call.name == "search" and json.loads(call.arguments) == {"q": "x"}


def test_qwen_tool_calls():
    text = (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("noop", {}),
    ]
    assert parse_qwen_tool_calls("<tool_call>\nnot json\n</tool_call>") == []
    assert parse_tool_calls("<tool_call>\nnot json") == ("<tool_call>\nnot json", [])


def _stream_text_through(tokenizer: Tokenizer, text: str, prompt_text: str = "", tools: bool = True):
    out = ChoiceOutput(0, tokenizer, [], ChatShape(prompt_text, tools))
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [
        out.feed(Delta(0, [t], finish_reason="stop" if i == len(ids) - 1 else None))
        for i, t in enumerate(ids)
    ]
    return (
        "".join(p.reasoning for p in pieces),
        "".join(p.text for p in pieces),
        [c for p in pieces for c in p.tool_calls],
        pieces[-1].finish_reason,
    )


def test_streamed_qwen_thinking_and_tool_call_token_by_token(qwen_dir):
    tok = Tokenizer.from_pretrained(qwen_dir)
    text = (
        "<think>\nThe user wants weather.\n</think>\n\nChecking.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    )
    reasoning, content, calls, finish = _stream_text_through(tok, text)
    assert reasoning.strip() == "The user wants weather." and content == "Checking.\n"
    assert [c.name for c in calls] == ["get_weather"] and finish == "tool_calls"
    # Without tools in the request, the markup is just text.
    _, content, calls, finish = _stream_text_through(tok, "Checking.\n<tool_call>\n{}", tools=False)
    assert content == "Checking.\n<tool_call>\n{}" and not calls and finish == "stop"


def test_streamed_deepseek_tool_call_token_by_token(deepseek_dir):
    tok = Tokenizer.from_pretrained(deepseek_dir)
    text = (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>lookup\n```json\n"
        '{"id": 7}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
    )
    reasoning, content, calls, finish = _stream_text_through(tok, text)
    assert reasoning == "" and content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("lookup", {"id": 7})]
    assert finish == "tool_calls"


def test_extract_json():
    assert extract_json(' {"a": 1} ') == '{"a": 1}'
    assert extract_json('Here you go:\n```json\n{"a": [1, 2]}\n```') == '{"a": [1, 2]}'
    assert extract_json("no json at all") == "no json at all"


def test_speculative_server_matches_plain_and_reports_acceptance(ds, deepseek_dir):
    """A server drafting with the model's MTP layer returns the plain server's greedy text."""
    from hetero.speculative import enable_speculation

    server, runtime = _serve(deepseek_dir, ServerConfig(model_name="tiny-ds"))
    try:
        enable_speculation(runtime, "mtp", "2")
        body = dict(model="tiny-ds", messages=user("count to five"), max_tokens=12, temperature=0)
        spec_text = client(server).chat.completions.create(**body).choices[0].message.content
        plain_text = client(ds).chat.completions.create(**body).choices[0].message.content
        assert spec_text == plain_text
        text = httpx.get(f"{server.url}/metrics").text
        drafted = [
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "hetero_speculation" and s.labels.get("stat") == "drafted"
        ]
        assert drafted and drafted[0] > 0
    finally:
        _stop(server)
